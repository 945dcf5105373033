"""Fixtures for the B2MML tests: the examples and a fresh SQLite database with the plant."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from mes.db import make_engine, make_sessionmaker
from mes.masterdata import load_plant_file
from mes.migrate import upgrade
from mes.samples import plant_resource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "b2mml"
PLANT = Path(str(plant_resource()))


def example(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def plant_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated database holding the sample plant, made once and copied per test."""
    path = tmp_path_factory.mktemp("b2mml") / "plant.db"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    load_plant_file(make_sessionmaker(engine), PLANT)
    engine.dispose()  # the last connection closing folds the WAL back into the file
    return path


@pytest.fixture
def plant_db(plant_template: Path, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh SQLite database holding the sample plant."""
    target = tmp_path / "mes.db"
    shutil.copyfile(plant_template, target)
    engine = make_engine(f"sqlite:///{target}")
    yield make_sessionmaker(engine)
    engine.dispose()
