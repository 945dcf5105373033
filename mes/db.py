"""Engine and session factory: PostgreSQL in production and tests, SQLite embedded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from mes import audit, reporting

T = TypeVar("T")


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (SQLAlchemy would pick psycopg2)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """Create an engine; for SQLite, make the file's folder and set safe pragmas."""
    url = normalise_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while activities write; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # The worker runs database activities on up to 100 threads; the API shares the engine in
    # the embedded stack.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=30)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """The MES's sessions: loaded objects stay usable after commit, and two side effects
    ride along with every write, in its transaction: the audit trail (master data, lots,
    and the events services record) and the ERP outbox (a message per order state change).
    """
    factory = sessionmaker(engine, expire_on_commit=False)
    audit.install(factory)
    reporting.install(factory)
    return factory


class Database:
    """The API's way to the database: runs one unit of work in a worker thread.

    The ORM is synchronous; ``run(fn)`` calls ``fn(session)`` in a thread with a fresh
    session from the factory (its hooks included) and closes it afterwards. The threads are
    anyio's, as Litestar's for its synchronous handlers: up to 40 at once (``asyncio``'s
    default executor would allow 6 on two cores, and 50 ERP clients would queue for them),
    within the engine's pool of 50 connections.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    async def run(self, fn: Callable[[Session], T]) -> T:
        def work() -> T:
            with self.sessions() as session:
                return fn(session)

        return await anyio.to_thread.run_sync(work)
