"""The `mes` command as an operator uses it: migrate, load master data, and refuse bad files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import yaml
from sqlalchemy import func, select

from mes.cli import main
from mes.db import make_engine, make_sessionmaker
from mes.models import Base
from mes.samples import plant_file, plant_text

MES = str(Path(sys.executable).parent / "mes")


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"MES_DATABASE_URL": f"sqlite:///{tmp / 'cli.db'}"}
    return subprocess.run([MES, *args], env=env, capture_output=True, text=True, timeout=120)


def run_here(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mes`` run in this process (as ``run`` does in a new one, without its start-up)."""
    out, err = io.StringIO(), io.StringIO()
    env = {"MES_DATABASE_URL": f"sqlite:///{tmp / 'cli.db'}"}
    with patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def row_counts(tmp: Path) -> dict[str, int]:
    engine = make_engine(f"sqlite:///{tmp / 'cli.db'}")
    with make_sessionmaker(engine)() as s:
        counts = {
            name: s.scalar(select(func.count()).select_from(table)) or 0
            for name, table in Base.metadata.tables.items()
        }
    engine.dispose()
    return counts


def test_upgrade_load_twice_and_a_bad_file(tmp_path: Path) -> None:
    assert run(tmp_path, "db", "upgrade").returncode == 0

    with plant_file() as sample:
        first = run(tmp_path, "load", str(sample))
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    counts = row_counts(tmp_path)
    assert counts["equipment"] >= 5
    assert counts["operations_definition"] >= 2

    with plant_file() as sample:
        again = run(tmp_path, "load", str(sample))
    assert again.returncode == 0
    assert "created 0, updated 0" in again.stdout
    assert row_counts(tmp_path) == counts

    plant = yaml.safe_load(plant_text())
    plant["materials"].append({"id": "NEW-THING", "unit": "kg", "material_class": "Raw"})
    plant["work_masters"][0]["parameters"][0]["default"] = 10_000
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(plant))
    refused = run(tmp_path, "load", str(bad))
    assert refused.returncode == 1
    assert plant["work_masters"][0]["id"] in refused.stderr
    assert "outside" in refused.stderr
    assert "nothing was written" in refused.stderr
    assert row_counts(tmp_path) == counts


def test_load_takes_b2mml_lot_messages(tmp_path: Path) -> None:
    assert run(tmp_path, "db", "upgrade").returncode == 0
    with plant_file() as sample:
        assert run(tmp_path, "load", str(sample)).returncode == 0
    fixtures = Path(__file__).resolve().parent / "b2mml" / "fixtures"
    stock = fixtures / "third-party-material-lot.xml"
    lots = row_counts(tmp_path)["material_lot"]
    first = run(tmp_path, "load", str(stock))
    assert first.returncode == 0, first.stderr
    assert "created 2, updated 0" in first.stdout
    assert row_counts(tmp_path)["material_lot"] == lots + 2
    again = run(tmp_path, "load", str(stock))
    assert "created 0, updated 0" in again.stdout


def test_openapi_check_and_help(tmp_path: Path) -> None:
    assert run(tmp_path, "openapi", "--check").returncode == 0
    helped = run(tmp_path, "--help")
    for command in ("demo", "dev", "serve", "worker", "db", "load", "sim", "openapi"):
        assert command in helped.stdout


def test_token_with_an_expiry(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from mes.auth import authenticate

    assert run_here(tmp_path, "db", "upgrade").returncode == 0
    made = run_here(
        tmp_path, "token", "create", "--role", "erp", "--name", "sap", "--expires-in", "30d"
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    until = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    at = run(
        tmp_path, "token", "create", "--role", "auditor", "--name", "aud", "--expires-at", until
    )
    assert at.returncode == 0, at.stderr
    forever = run_here(tmp_path, "token", "create", "--role", "admin", "--name", "ops")
    assert forever.returncode == 0, forever.stderr

    bad = run_here(
        tmp_path, "token", "create", "--role", "erp", "--name", "x", "--expires-in", "30y"
    )
    assert bad.returncode == 1
    assert "expires_in" in bad.stderr
    past = run(
        tmp_path,
        "token",
        "create",
        "--role",
        "erp",
        "--name",
        "y",
        "--expires-at",
        "2020-01-01T00:00:00Z",
    )
    assert past.returncode == 1
    assert "not in the future" in past.stderr
    naive = run(
        tmp_path,
        "token",
        "create",
        "--role",
        "erp",
        "--name",
        "z",
        "--expires-at",
        "2040-01-01T00:00",
    )
    assert naive.returncode == 1
    assert "time zone" in naive.stderr

    listed = {
        line.split()[0]: line for line in run_here(tmp_path, "token", "list").stdout.splitlines()
    }
    assert set(listed) == {"sap", "aud", "ops"}
    expiry = listed["sap"].split("expires ")[1][:16]
    in_30_days = datetime.fromisoformat(expiry).replace(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(days=29, hours=23) < in_30_days <= timedelta(days=30)
    assert "expires -" in listed["ops"]
    assert all(line.endswith("active") for line in listed.values())
    assert token not in run_here(tmp_path, "token", "list").stdout

    engine = make_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    with make_sessionmaker(engine)() as s:
        caller = authenticate(s, token)
    engine.dispose()
    assert caller is not None
    assert caller.name == "sap"
