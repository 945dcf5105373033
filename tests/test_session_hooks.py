"""The audit and outbox hooks ride on the session factory (``mes.db.make_sessionmaker``),
not on every SQLAlchemy session at import: what a session writes besides its rows is decided
by where it came from, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import sessionmaker

from mes import audit, reporting
from mes.db import make_engine, make_sessionmaker
from mes.migrate import upgrade
from mes.models import AuditEvent, MaterialClass


def test_the_factory_audits_master_data_and_a_plain_sessionmaker_does_not(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with sessionmaker(engine)() as plain:
            plain.add(MaterialClass(external_id="PLAIN"))
            plain.commit()
            assert plain.scalar(select(func.count()).select_from(AuditEvent)) == 0
            # An event queued where it could never be chained is refused, not lost.
            with pytest.raises(RuntimeError, match="make_sessionmaker"):
                audit.record(plain, action="x", object_type="t", object_id="1")

        with make_sessionmaker(engine)() as wired:
            wired.add(MaterialClass(external_id="WIRED"))
            wired.commit()
            events = wired.scalars(select(AuditEvent)).all()
            assert [(e.action, e.object_id) for e in events] == [("master_data.created", "WIRED")]
            assert audit.verify(wired).intact
    finally:
        engine.dispose()


def test_each_factory_carries_both_hooks_and_only_its_own(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hooks.db'}")
    try:
        wired = make_sessionmaker(engine)
        plain = sessionmaker(engine)
        assert event.contains(wired, "before_flush", reporting._outbox)
        assert event.contains(wired, "before_commit", audit._chain_pending)
        assert not event.contains(plain, "before_flush", reporting._outbox)
        assert not event.contains(plain, "before_commit", audit._chain_pending)
    finally:
        engine.dispose()
