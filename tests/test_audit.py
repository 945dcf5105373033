"""The audit trail is append-only and hash-chained: the database refuses changes, concurrent
writers keep one unbroken chain, and a row changed behind the guard's back is found."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from mes import audit
from mes.db import make_engine, make_sessionmaker
from mes.migrate import upgrade
from tests.conftest import fresh_pg_database


def _write(sessions: sessionmaker[Session], n: int, actor: str) -> None:
    for i in range(n):
        with sessions() as s:
            audit.record(
                s,
                actor=actor,
                action="test.event",
                object_type="thing",
                object_id=f"{actor}-{i}",
                before={"n": i},
                after={"n": i + 1, "note": "é ✓"},
                reason="because",
            )
            s.commit()


@pytest.mark.postgres
def test_postgres_guard_chain_and_tamper_detection() -> None:
    for url in fresh_pg_database("mes_audit"):
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(partial(_write, sessions, 25), ["a", "b", "c", "d"]))
            with sessions() as s:
                report = audit.verify(s)
                assert report.intact
                assert report.events == 100
                seqs = s.scalars(text("SELECT seq FROM audit_event ORDER BY seq")).all()
                assert seqs == list(range(1, 101))

            for statement in (
                "UPDATE audit_event SET reason = 'nothing happened' WHERE seq = 42",
                "DELETE FROM audit_event WHERE seq = 100",
                "TRUNCATE audit_event",
            ):
                with sessions() as s, pytest.raises(DBAPIError, match="append-only"):
                    s.execute(text(statement))

            # With the guard disabled (as only a database owner could), change one row.
            with engine.begin() as conn:
                conn.execute(
                    text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
                )
                conn.execute(text("UPDATE audit_event SET reason = 'edited' WHERE seq = 42"))
                conn.execute(text("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only"))
            with sessions() as s:
                report = audit.verify(s)
            assert not report.intact
            assert report.first_broken_seq == 42
            assert report.reason is not None
            assert "content" in report.reason
        finally:
            engine.dispose()


def test_sqlite_guard_and_deleted_tail(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    _write(sessions, 5, "solo")
    with sessions() as s:
        assert audit.verify(s).intact
        with pytest.raises(DBAPIError, match="append-only"):
            s.execute(text("DELETE FROM audit_event WHERE seq = 5"))
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_event_no_delete"))
        conn.execute(text("DELETE FROM audit_event WHERE seq = 5"))
    with sessions() as s:
        report = audit.verify(s)
    assert not report.intact
    assert report.first_broken_seq == 5
    engine.dispose()


def test_rolled_back_events_are_not_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        audit.record(s, action="x", object_type="t", object_id="1")
        s.rollback()
        s.commit()
    _write(sessions, 1, "after")
    with sessions() as s:
        report = audit.verify(s)
    assert report.intact
    assert report.events == 1
    engine.dispose()


def test_sqlite_chain_head_moves_only_forward(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    _write(sessions, 3, "solo")
    with sessions() as s:
        for statement in (
            "UPDATE audit_chain_head SET seq = 2",
            "UPDATE audit_chain_head SET last_hash = 'forged'",
            "DELETE FROM audit_chain_head",
            "INSERT INTO audit_chain_head (id, seq, last_hash) VALUES (2, 0, 'x')",
        ):
            with pytest.raises(DBAPIError, match="moves only forward"):
                s.execute(text(statement))
    _write(sessions, 2, "more")
    with sessions() as s:
        assert audit.verify(s).events == 5
    engine.dispose()
