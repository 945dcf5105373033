"""Engine and session factory: PostgreSQL in production and tests, SQLite embedded."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg_pool import AsyncConnectionPool
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


class _RawText(Loader):
    """Text as the bytes PostgreSQL sent (the client encoding is UTF-8)."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


async def _raw_text(connection: AsyncConnection[Any]) -> None:
    connection.adapters.register_loader("text", _RawText)
    await connection.execute(b"SET client_encoding TO 'UTF8'")


class Database:
    """The API's way to the database: runs one unit of work in a worker thread.

    The ORM is synchronous; ``run(fn)`` calls ``fn(session)`` in a thread with a fresh
    session from the factory (its hooks included) and closes it afterwards.

    On PostgreSQL, ``read_bytes`` runs one read-only statement whose answer is a single text
    value (an answer built in the database, such as a genealogy trace's JSON) and gives its
    bytes as the database sent them (UTF-8, never decoded), on the event loop itself: an
    asyncio psycopg connection from a small pool of its own, in autocommit, without the
    worker thread, the session and the engine pool's pre-ping (a broken connection is
    dropped by the pool when a statement fails on it). The pool opens on first use in the
    running event loop and is closed by ``close`` (the app's shutdown).
    """

    #: Most statements ``read_bytes`` runs at once: as many as the worker threads of ``run``
    #: (asyncio's default: the cores + 4, at most 32; the engine's pool has 20 and 30 more).
    #: More at once on few cores only queue in the database: on 2 cores, 20 clients' traces
    #: at once took longer each than the same through 6 threads.
    READERS = min(20, (os.cpu_count() or 1) + 4)

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        bind = sessions.kw.get("bind")
        url = bind.url if isinstance(bind, Engine) else None
        #: ``read_bytes`` works here (PostgreSQL); else callers use ``run``.
        self.can_read_bytes = url is not None and url.get_backend_name() == "postgresql"
        self._conninfo = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if url is not None and self.can_read_bytes
            else ""
        )
        self._readers: AsyncConnectionPool | None = None
        self._readers_loop: asyncio.AbstractEventLoop | None = None

    async def _pool(self) -> AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        if self._readers is not None and self._readers_loop is loop:
            return self._readers
        # A pool serves the loop it was opened in; a new loop (a test's) opens its own.
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.READERS,
            kwargs={"autocommit": True, "application_name": "mes-readers"},
            configure=_raw_text,
            open=False,
            name="mes-readers",
        )
        await pool.open()
        if self._readers is not None and self._readers_loop is loop:
            await pool.close()  # another request opened one meanwhile
            return self._readers
        self._readers, self._readers_loop = pool, loop
        return pool

    async def read_bytes(self, sql: str, params: Mapping[str, object]) -> bytes | None:
        """The first column (text) of the first row of ``sql`` (psycopg's ``%(name)s``
        parameters) as UTF-8 bytes, or None when it gives no row. PostgreSQL only
        (``can_read_bytes``)."""
        pool = await self._pool()
        attempts = self.READERS + 1  # after a restart, every pooled connection is stale
        for attempt in range(attempts):
            connection: AsyncConnection[Any] | None = None
            try:
                async with pool.connection() as connection:
                    cursor = await connection.execute(sql.encode(), params)
                    row = await cursor.fetchone()
                return None if row is None else bytes(row[0])
            except psycopg.OperationalError:
                # A connection the server closed (a restart, an idle timeout) fails its first
                # statement and the pool drops it; the statement only reads, so it goes
                # again on another connection, as the engine's pre-ping would have made it.
                if connection is None or not connection.closed or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close ``read_bytes``'s pool, if one is open in this loop."""
        pool, self._readers = self._readers, None
        if pool is not None and self._readers_loop is asyncio.get_running_loop():
            await pool.close()

    async def run(self, fn: Callable[[Session], T]) -> T:
        def work() -> T:
            with self.sessions() as session:
                return fn(session)

        return await asyncio.to_thread(work)
