"""The relay starts the workflows of stored orders that have none (every order the API
accepts), leaves started and final orders alone, survives a Temporal that does not answer,
and is woken by a new order rather than waiting for its next sweep.

SQLite and the Temporal dev server. Each test uses its own task queue with no worker on it,
so the workflows it starts wait there (and are terminated at the end).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from mes import execution, transitions
from mes.api.app import create_app
from mes.auth import create_token
from mes.callbacks import LOOPBACK, CallbackPolicy
from mes.db import make_engine, make_sessionmaker
from mes.launch import free_port, load_plant, point_erp_client
from mes.migrate import upgrade
from mes.models import OperationsRequest, RequestState
from mes.production_orders import (
    ProductionOrderIn,
    cancel_unstarted,
    create_order,
    mark_workflow_started,
)
from mes.relay import relay_running, run_relay, start_unstarted
from mes.settings import Settings
from mes.workflow_client import WorkflowClient
from tests.conftest import fresh_pg_database
from workflows.types import order_workflow_id

pytestmark = pytest.mark.temporal
NOW = timedelta(0)  # no grace: the relay may start an order the moment it is stored


@pytest.fixture
async def queue(temporal_env: WorkflowEnvironment) -> AsyncIterator[str]:
    """A task queue of this test's own; its workflows are terminated afterwards."""
    name = f"relay-{uuid.uuid4().hex[:8]}"
    yield name
    client = temporal_env.client
    async for wf in client.list_workflows(f"TaskQueue = '{name}'"):
        if wf.status == WorkflowExecutionStatus.RUNNING:
            await client.get_workflow_handle(wf.id).terminate("test over")


def _body(number: str | None = None) -> ProductionOrderIn:
    return ProductionOrderIn(
        order_number=number or f"R-{uuid.uuid4().hex[:8]}",
        product="BREAD-WHITE",
        quantity=2,
        unit="ea",
        due=datetime.now(UTC) + timedelta(hours=2),
        priority=1,
    )


def _store(sessions: sessionmaker[Session], source: str | None = None) -> tuple[int, str]:
    with sessions() as s:
        order, created = create_order(s, _body(), source=source)
    assert created
    return order.id, order.external_id


def _started_at(sessions: sessionmaker[Session], number: str) -> datetime | None:
    with sessions() as s:
        return s.scalar(
            select(OperationsRequest.workflow_started_at).where(
                OperationsRequest.external_id == number
            )
        )


async def _status(client: Client, number: str) -> WorkflowExecutionStatus | None:
    """The order's workflow status, or None when Temporal has no such workflow."""
    try:
        desc = await client.get_workflow_handle(order_workflow_id(number)).describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return desc.status


async def test_start_unstarted_starts_only_orders_without_a_workflow(
    plant_sqlite: sessionmaker[Session], temporal_env: WorkflowEnvironment, queue: str
) -> None:
    client = temporal_env.client
    workflows = WorkflowClient(Settings(database_url="sqlite://", task_queue=queue), client)

    _, waiting = _store(plant_sqlite)
    started_id, started = _store(plant_sqlite)
    with plant_sqlite() as s:
        mark_workflow_started(s, started_id)
    cancelled_id, cancelled = _store(plant_sqlite)
    with plant_sqlite() as s:
        transitions.change_state(
            s, s.get_one(OperationsRequest, cancelled_id), RequestState.CANCELLED
        )
        s.commit()
    # Started by the API, which then failed to record it: the relay finds it running.
    running_id, running = _store(plant_sqlite)
    await workflows.start_order(running_id, running)
    run_id = (await client.get_workflow_handle(order_workflow_id(running)).describe()).run_id

    assert await start_unstarted(plant_sqlite, workflows, grace=NOW) == [waiting, running]
    assert await _status(client, waiting) == WorkflowExecutionStatus.RUNNING
    assert _started_at(plant_sqlite, waiting) is not None
    # The one that ran already is the same run, now recorded.
    desc = await client.get_workflow_handle(order_workflow_id(running)).describe()
    assert desc.run_id == run_id
    assert _started_at(plant_sqlite, running) is not None
    # Recorded as started: left alone (its workflow was never made here, and still is not).
    assert await _status(client, started) is None
    # Cancelled before it ever started, with no ERP message to deliver (no ERP client):
    # never started, never recorded; a workflow started for it would plan nothing.
    assert await _status(client, cancelled) is None
    assert _started_at(plant_sqlite, cancelled) is None
    with plant_sqlite() as s:
        assert execution.plan_order(s, cancelled_id) == []
        assert s.get_one(OperationsRequest, cancelled_id).state == RequestState.CANCELLED

    # Nothing left to do; the times recorded stay as they were.
    first = _started_at(plant_sqlite, waiting)
    assert await start_unstarted(plant_sqlite, workflows, grace=NOW) == []
    assert _started_at(plant_sqlite, waiting) == first


async def test_order_posted_while_temporal_is_away_is_started_by_the_relay(
    plant_sqlite: sessionmaker[Session],
    temporal_env: WorkflowEnvironment,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The API, and a relay, whose Temporal does not answer (nothing listens on the port).
    away = Settings(
        database_url="sqlite://",
        temporal_address=f"127.0.0.1:{free_port()}",
        task_queue=queue,
    )
    app = create_app(away, plant_sqlite, temporal=None)
    with plant_sqlite() as s:
        token = create_token(s, f"erp-{queue}", "erp")
    number = f"R-{uuid.uuid4().hex[:8]}"
    order_json = _body(number).model_dump(mode="json")
    async with AsyncTestClient(app=app) as http:
        r = await http.post(
            "/api/v1/production-orders",
            json=order_json,
            headers={"Authorization": f"Bearer {token}"},
        )
    # Accepted at once: storing it is all the API does.
    assert r.status_code == 202, r.text
    assert r.json()["order_number"] == number
    with plant_sqlite() as s:
        order = s.scalars(
            select(OperationsRequest).where(OperationsRequest.external_id == number)
        ).one()
        assert order.state == RequestState.RELEASED
        assert order.workflow_started_at is None

    # A relay that cannot reach Temporal logs each failed pass and keeps going.
    caplog.set_level(logging.WARNING, logger="mes.relay")
    failing = asyncio.create_task(run_relay(plant_sqlite, WorkflowClient(away), 0.05, grace=NOW))
    async with asyncio.timeout(30):
        while len([r for r in caplog.records if r.name == "mes.relay"]) < 2:
            assert not failing.done()
            await asyncio.sleep(0.05)
    failing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await failing
    assert _started_at(plant_sqlite, number) is None
    assert await _status(temporal_env.client, number) is None

    # Temporal answers again: the relay starts the order and records it.
    here = Settings(database_url="sqlite://", task_queue=queue)
    relay = asyncio.create_task(
        run_relay(plant_sqlite, WorkflowClient(here, temporal_env.client), 0.05, grace=NOW)
    )
    try:
        async with asyncio.timeout(30):
            while _started_at(plant_sqlite, number) is None:
                assert not relay.done()
                await asyncio.sleep(0.05)
    finally:
        relay.cancel()
    assert await _status(temporal_env.client, number) == WorkflowExecutionStatus.RUNNING

    # Posted again, it is found started: 200 even though this API's Temporal is still away.
    async with AsyncTestClient(app=app) as http:
        r = await http.post(
            "/api/v1/production-orders",
            json=order_json,
            headers={"Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["order_number"] == number


async def _until_started(sessions: sessionmaker[Session], number: str, within_s: float) -> float:
    """Seconds until the order's start is recorded; fails after ``within_s``."""
    t0 = time.perf_counter()
    async with asyncio.timeout(within_s):
        while _started_at(sessions, number) is None:
            await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def test_order_posted_while_no_worker_runs_is_accepted_at_once_and_starts_with_a_worker(
    plant_sqlite: sessionmaker[Session], temporal_env: WorkflowEnvironment, queue: str
) -> None:
    settings = Settings(database_url="sqlite://", task_queue=queue)
    app = create_app(settings, plant_sqlite, temporal_env.client)
    with plant_sqlite() as s:
        token = create_token(s, f"erp-{queue}", "erp")
    number = f"R-{uuid.uuid4().hex[:8]}"
    async with AsyncTestClient(app=app) as http:
        t0 = time.perf_counter()
        r = await http.post(
            "/api/v1/production-orders",
            json=_body(number).model_dump(mode="json"),
            headers={"Authorization": f"Bearer {token}"},
        )
        answered_s = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    assert answered_s < 2, answered_s  # no Temporal round trip, no waiting for a worker
    # No worker, so no relay: stored, Released, not started.
    await asyncio.sleep(0.3)
    assert _started_at(plant_sqlite, number) is None
    assert await _status(temporal_env.client, number) is None
    with plant_sqlite() as s:
        assert (
            s.scalars(
                select(OperationsRequest.state).where(OperationsRequest.external_id == number)
            ).one()
            == RequestState.RELEASED
        )

    # A worker comes up (its relay, with a sweep far off): the order starts at once.
    async with relay_running(plant_sqlite, WorkflowClient(settings, temporal_env.client), 60):
        await _until_started(plant_sqlite, number, 10)
    assert await _status(temporal_env.client, number) == WorkflowExecutionStatus.RUNNING


async def test_the_relay_is_woken_by_an_order_posted_in_its_process(
    plant_sqlite: sessionmaker[Session], temporal_env: WorkflowEnvironment, queue: str
) -> None:
    """SQLite (``mes demo``): the API and the worker share a process; a new order wakes the
    relay well before its next sweep."""
    settings = Settings(database_url="sqlite://", task_queue=queue)
    app = create_app(settings, plant_sqlite, temporal_env.client)
    with plant_sqlite() as s:
        token = create_token(s, f"erp-{queue}", "erp")
    workflows = WorkflowClient(settings, temporal_env.client)
    async with relay_running(plant_sqlite, workflows, 60), AsyncTestClient(app=app) as http:
        await asyncio.sleep(0.5)  # past its first sweep: it waits for the next, a minute off
        for _ in range(3):
            number = f"R-{uuid.uuid4().hex[:8]}"
            r = await http.post(
                "/api/v1/production-orders",
                json=_body(number).model_dump(mode="json"),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 202, r.text
            assert await _until_started(plant_sqlite, number, 10) < 5
    assert await _status(temporal_env.client, number) == WorkflowExecutionStatus.RUNNING


@pytest.mark.postgres
async def test_the_relay_is_woken_by_postgresql_notify(
    temporal_env: WorkflowEnvironment, queue: str
) -> None:
    """PostgreSQL: an order stored by another process (here: not through this process's
    API, so only the ``NOTIFY`` of its transaction tells) starts well before the sweep."""
    settings = Settings(database_url="sqlite://", task_queue=queue)
    workflows = WorkflowClient(settings, temporal_env.client)
    for url in fresh_pg_database("mes_relay"):
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            load_plant(sessions, None, "opc.tcp://127.0.0.1:4840/")
            async with relay_running(sessions, workflows, 60):
                await asyncio.sleep(1)  # listening, past its first sweep
                for _ in range(3):
                    _, number = await asyncio.to_thread(_store, sessions)
                    assert await _until_started(sessions, number, 10) < 5
            assert await _status(temporal_env.client, number) == WorkflowExecutionStatus.RUNNING
        finally:
            engine.dispose()


async def _cancel_waits_for_the_relay(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel of an order the relay is starting waits for the relay's lock, then finds the
    order started (and leaves it to its workflow); a cancel that comes first cancels it in
    the database, and its workflow then plans nothing."""
    hold_s = 0.5
    start = WorkflowClient.start_order
    started = asyncio.Event()

    async def slow_start(self: WorkflowClient, order_id: int, order_number: str) -> None:
        await start(self, order_id, order_number)
        started.set()
        await asyncio.sleep(hold_s)  # started, not yet recorded: the old race's window

    monkeypatch.setattr(WorkflowClient, "start_order", slow_start)
    order_id, number = _store(sessions)
    relay = asyncio.create_task(start_unstarted(sessions, workflows, grace=NOW))
    await asyncio.wait_for(started.wait(), 10)

    def cancel(order_id: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        with sessions() as s:
            done = cancel_unstarted(s, order_id, "supervisor", "at once")
        return done, time.perf_counter() - t0

    cancelled, waited_s = await asyncio.to_thread(cancel, order_id)
    assert await relay == [number]
    assert not cancelled  # the workflow's now
    assert waited_s > hold_s / 2, waited_s
    assert _started_at(sessions, number) is not None
    with sessions() as s:
        assert s.get_one(OperationsRequest, order_id).state == RequestState.RELEASED

    # The cancel first: Cancelled in the database. Its ERP message (Cancelled) is not
    # delivered yet, so the relay starts its workflow, which plans nothing and delivers it.
    point_erp_client(
        sessions, "erp-relay", "http://127.0.0.1:9/cb", "json", CallbackPolicy.allowing(LOOPBACK)
    )
    order_id, number = _store(sessions, source="erp-relay")
    cancelled, _ = await asyncio.to_thread(cancel, order_id)
    assert cancelled
    assert await start_unstarted(sessions, workflows, grace=NOW) == [number]
    with sessions() as s:
        assert execution.plan_order(s, order_id) == []
        order = s.get_one(OperationsRequest, order_id)
        assert order.state == RequestState.CANCELLED
        assert all(r.job_order is None for r in order.segment_requirements)


async def test_a_cancel_waits_for_the_relay_starting_the_order_sqlite(
    plant_sqlite: sessionmaker[Session],
    temporal_env: WorkflowEnvironment,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(database_url="sqlite://", task_queue=queue)
    await _cancel_waits_for_the_relay(
        plant_sqlite, WorkflowClient(settings, temporal_env.client), monkeypatch
    )


@pytest.mark.postgres
async def test_a_cancel_waits_for_the_relay_starting_the_order_postgresql(
    temporal_env: WorkflowEnvironment, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url="sqlite://", task_queue=queue)
    for url in fresh_pg_database("mes_relay"):
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            load_plant(sessions, None, "opc.tcp://127.0.0.1:4840/")
            await _cancel_waits_for_the_relay(
                sessions, WorkflowClient(settings, temporal_env.client), monkeypatch
            )
        finally:
            engine.dispose()
