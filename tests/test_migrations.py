"""The migrations build the schema the models describe, on PostgreSQL and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from mes.db import make_engine
from mes.migrate import upgrade
from mes.models import Base
from tests.conftest import fresh_pg_database


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            tables = set(inspect(conn).get_table_names())
            diff: list[object] = list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables
    return diff


def test_sqlite_upgrade_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)  # a second upgrade is a no-op
    assert _diff(url) == []


@pytest.mark.postgres
def test_postgres_upgrade_matches_models() -> None:
    for url in fresh_pg_database("mes_migr"):
        upgrade(url)
        assert _diff(url) == []
