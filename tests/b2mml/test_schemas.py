"""The shipped B2MML schemas: MESA's files unchanged, with the licence, loaded offline."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
from lxml import etree  # type: ignore[import-untyped, unused-ignore]  # lxml: no type hints

import mes.b2mml.parsing as parsing
from mes.b2mml.parsing import XSD_DIR, parse_xml, schema, schema_files
from tests.b2mml.conftest import EXAMPLES

# Beside the repository: the standards folder the schemas were copied from.
SHARED = Path(__file__).resolve().parents[3] / "shared" / "standards" / "b2mml"
MESA_LINE = (
    "The Business To Manufacturing Markup Language (B2MML) is used courtesy of MESA International."
)


def test_schema_loads_from_the_shipped_files_only() -> None:
    schema()
    files = schema_files()
    assert files[0].name == "AllSchemas.xsd"
    assert all(f.parent == XSD_DIR and f.is_file() for f in files)
    # Every include and import resolved, the ConfirmBOD and OperationsSchedule ones too.
    assert {"B2MML-ConfirmBOD.xsd", "B2MML-OperationsSchedule.xsd"} <= {f.name for f in files}


def test_readme_and_licence_carry_the_mesa_line() -> None:
    assert MESA_LINE in (XSD_DIR / "README.md").read_text(encoding="utf-8")
    licence = " ".join((XSD_DIR / "LICENSE").read_text(encoding="utf-8").split())
    assert MESA_LINE in licence


@pytest.mark.skipif(not SHARED.is_dir(), reason="the standards folder is not beside the repo")
def test_schemas_are_mesas_files_unchanged() -> None:
    names = sorted(p.name for p in SHARED.iterdir())
    assert sorted(p.name for p in XSD_DIR.iterdir() if p.name != "README.md") == names
    _, mismatch, errors = filecmp.cmpfiles(SHARED, XSD_DIR, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_a_schema_pointing_elsewhere_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "xsd"
    shutil.copytree(XSD_DIR, copy)
    confirm = copy / "B2MML-ConfirmBOD.xsd"
    text = confirm.read_text(encoding="utf-8")
    for target in ("http://example.invalid/B2MML-Common.xsd", "../elsewhere/B2MML-Common.xsd"):
        confirm.write_text(
            text.replace('schemaLocation = "B2MML-Common.xsd"', f'schemaLocation = "{target}"'),
            encoding="utf-8",
        )
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        shutil.copy(XSD_DIR / "B2MML-Common.xsd", tmp_path / "elsewhere")
        monkeypatch.setattr(parsing, "XSD_DIR", copy.resolve())
        with pytest.raises(etree.XMLSchemaParseError, match="Failed to parse"):
            parsing._load_schema()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.xml")), ids=lambda p: p.name)
def test_every_example_is_valid_b2mml(path: Path) -> None:
    root = parse_xml(path.read_bytes())
    assert root.get("releaseID") == "7.01"


def test_the_four_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES.glob("*.xml")} >= {
        "process-operations-schedule.xml",
        "change-operations-schedule.xml",
        "cancel-operations-schedule.xml",
        "sync-material-definition.xml",
    }
