"""The wheel holds everything the product reads at run time, so an installed ``mes demo``,
``mes db upgrade`` or B2MML validation works outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mes", "workflows", "adapters", "migrations")

# What the product opens at run time, besides its Python modules: the sample plant
# (mes demo, mes dev), the Alembic environment and versions (mes db upgrade, the stack),
# the OPC 10031-4 nodeset (the PLC simulator, the OPC UA client's types) and MESA's XSDs
# (every B2MML message in and out).
RUN_TIME_FILES = [
    "mes/samples/plant.yaml",
    "migrations/env.py",
    "migrations/script.py.mako",
    "migrations/alembic.ini",
    "adapters/opcua/nodeset/opc.ua.isa95-jobcontrol.nodeset2.xml",
    "mes/b2mml/xsd/AllSchemas.xsd",
    "mes/b2mml/xsd/B2MML-OperationsSchedule.xsd",
    "mes/b2mml/xsd/LICENSE",
]
RUN_TIME_DIRS = ["migrations/versions", "mes/b2mml/xsd", "adapters/opcua/nodeset", "mes/samples"]


def _source_files(folder: str) -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [uv, "build", "--wheel", "--quiet", "-o", str(out), str(ROOT)],
        check=True,
        timeout=120,
    )
    [built] = out.glob("mes-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_every_run_time_file(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert set(RUN_TIME_FILES) <= names, sorted(set(RUN_TIME_FILES) - names)
    for folder in RUN_TIME_DIRS:
        source = _source_files(folder)
        assert source, folder
        assert source <= names, sorted(source - names)
    assert any(n.startswith("migrations/versions/0001_") for n in names)
    assert len([n for n in names if n.startswith("mes/b2mml/xsd/") and n.endswith(".xsd")]) > 30


def test_the_wheel_holds_every_package_file_and_nothing_from_outside(
    wheel: zipfile.ZipFile,
) -> None:
    names = set(wheel.namelist())
    for package in PACKAGES:
        missing = _source_files(package) - names
        assert not missing, sorted(missing)
    top = {n.split("/", 1)[0] for n in names}
    [dist_info] = [t for t in top if t.endswith(".dist-info")]
    assert top == {*PACKAGES, dist_info}, top
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "mes = mes.cli:main" in entry_points
