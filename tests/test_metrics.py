"""``GET /metrics`` through the real API on PostgreSQL: the Prometheus text parser reads it,
the numbers are the database's and this process's PLC calls, and it needs a token unless
``MES_METRICS_PUBLIC=1``."""

from __future__ import annotations

import uuid

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.opcua.client import JobControlClient
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes.api.app import create_app
from mes.machines import JobOrderData, MachineUnreachableError
from mes.models import OperationsRequest
from mes.settings import Settings
from mes.states import FINAL_STATES
from tests.conftest import token

pytestmark = pytest.mark.postgres


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_count(
    api: AsyncTestClient,  # type: ignore[type-arg]
    pg_sessions: sessionmaker[Session],
) -> None:
    machine = f"WU-METRICS-{uuid.uuid4().hex[:6]}"
    sim = PlcSimulator([SimUnit(machine, measured={})])
    await sim.start()
    async with JobControlClient(sim.url, machine, timeout_s=2) as plc:
        await plc.store(JobOrderData("M-1", "WM"))
        await sim.stop()  # the PLC goes away: the next call fails
        with pytest.raises(MachineUnreachableError):
            await plc.start("M-1")

    assert (await api.get("/metrics")).status_code == 401
    r = await api.get("/metrics", headers=token(pg_sessions, "auditor"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    with pg_sessions() as s:
        in_flight = s.scalar(
            select(func.count()).where(OperationsRequest.state.not_in(FINAL_STATES))
        )
    assert got[("mes_orders_in_flight", ())] == in_flight
    assert ("mes_orders", (("state", "Completed"),)) in got
    assert ("mes_work_orders_open", (("state", "Running"),)) in got
    assert ("mes_dispatch_latency_seconds", (("quantile", "0.5"),)) in got
    assert ("mes_erp_callback_backlog", ()) in got
    assert ("mes_workflows_not_started", ()) in got
    assert ("mes_workflow_failures", ()) in got
    assert got[("mes_plc_calls_total", (("method", "Store"),))] >= 1
    assert got[("mes_plc_call_errors_total", (("method", "Start"),))] >= 1
    assert got[("mes_plc_call_seconds_count", (("method", "Store"),))] >= 1


async def test_metrics_public_only_when_configured(
    pg_sessions: sessionmaker[Session], app_pg_url: str
) -> None:
    app = create_app(Settings(database_url=app_pg_url, metrics_public=True), pg_sessions)
    async with AsyncTestClient(app=app) as c:
        r = await c.get("/metrics")
        assert r.status_code == 200
        assert ("mes_erp_callback_backlog", ()) in samples(r.text)
        # Only /metrics: everything else still needs a token.
        assert (await c.get("/api/v1/kpi/delivery")).status_code == 401
    assert Settings.from_env({"MES_METRICS_PUBLIC": "1"}).metrics_public
    assert not Settings.from_env({}).metrics_public
