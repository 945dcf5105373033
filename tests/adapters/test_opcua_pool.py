"""The worker's OPC UA session pool against the PLC simulator: many jobs on one endpoint use
one session and one subscription, counted on the server; a PLC that restarts is reconnected
to, and the jobs sent again finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import pytest

from adapters.opcua.pool import SessionPool, pool_key
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes.machines import (
    Endpoint,
    JobOrderData,
    JobState,
    MachineUnreachableError,
    MaterialRequirement,
)

JOBS = 120


def order(job_order_id: str) -> JobOrderData:
    return JobOrderData(
        job_order_id=job_order_id,
        work_master_id="WM-FILL",
        material_requirements=[MaterialRequirement("BOTTLE", "Produced", 6, "pcs")],
    )


def endpoint(sim: PlcSimulator, machine: str) -> Endpoint:
    return Endpoint("opcua", sim.url, machine)


def subscriptions(sim: PlcSimulator) -> int:
    server = sim._server
    return 0 if server is None else len(server.iserver.subscription_service.subscriptions)


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    sessions = SessionPool(timeout_s=5)
    yield sessions
    await sessions.close()


async def run_to_end(pool: SessionPool, ep: Endpoint, job_id: str) -> JobState:
    """Send a job and wait until it is final, one pooled session use per step, as the
    workflow's activities do (dispatch_job, then await_job until final)."""
    async with pool.session(ep) as plc:
        await plc.store_and_start(order(job_id))
    state = JobState.ALLOWED_TO_START
    while not state.is_final:
        async with pool.session(ep) as plc:
            state = await plc.wait_for_change(job_id, state, tick_s=1.0, publish_ms=20)
    async with pool.session(ep) as plc:
        await plc.clear(job_id)
    return state


async def peak_while(sim: PlcSimulator, work: Awaitable[list[JobState]]) -> tuple[int, int]:
    """Run ``work``, sampling the server's sessions and subscriptions; return the peaks."""
    task = asyncio.ensure_future(work)
    sessions = subs = 0
    while not task.done():
        sessions, subs = max(sessions, sim.sessions), max(subs, subscriptions(sim))
        await asyncio.sleep(0.01)
    assert set(await task) == {JobState.ENDED}
    return sessions, subs


async def test_many_jobs_waiting_on_one_endpoint_share_one_session(pool: SessionPool) -> None:
    units = [SimUnit("Filler", cycle_time_s=0.01), SimUnit("Capper", cycle_time_s=0.01)]
    async with PlcSimulator(units, max_job_orders=JOBS) as sim:
        jobs = [
            run_to_end(pool, endpoint(sim, unit), f"JO-{unit}-{i}")
            for unit in sim.unit_names
            for i in range(JOBS // 2)
        ]
        async with asyncio.timeout(60):
            peak_sessions, peak_subscriptions = await peak_while(sim, asyncio.gather(*jobs))
        # Two machines behind one endpoint: one session, one subscription per machine.
        assert peak_sessions == 1
        assert peak_subscriptions <= 2
        assert pool.connects == 1
        await pool.close()
        async with asyncio.timeout(3):
            while sim.sessions:
                await asyncio.sleep(0.01)


async def test_the_pool_reconnects_after_the_plc_restarts(pool: SessionPool) -> None:
    sim = PlcSimulator([SimUnit("Oven", cycle_time_s=0.3)])
    await sim.start()
    try:
        ep = endpoint(sim, "Oven")
        async with pool.session(ep) as plc:
            await plc.store_and_start(order("JO-BEFORE"))
        waiting = asyncio.ensure_future(run_to_end(pool, ep, "JO-WAITING"))
        await asyncio.sleep(0.2)
        await sim.stop()  # on the same port when it comes back, without its jobs
        with pytest.raises(MachineUnreachableError) as lost:
            async with asyncio.timeout(5):
                await waiting
        assert lost.value.retryable
        assert pool.sessions <= 1  # the broken one is out of the pool, closing
        await sim.start()
        assert sim.sessions == 0
        async with asyncio.timeout(30):
            states = await asyncio.gather(
                *(run_to_end(pool, ep, f"JO-AFTER-{i}") for i in range(5))
            )
        assert set(states) == {JobState.ENDED}
        assert pool.connects == 2
        assert sim.sessions == 1
    finally:
        await sim.stop()


async def test_a_session_is_per_endpoint_and_security_settings() -> None:
    plain = Endpoint("opcua", "opc.tcp://plc:4840/", "Filler")
    other_machine = Endpoint("opcua", "opc.tcp://plc:4840/", "Capper")
    signed = Endpoint("opcua", "opc.tcp://plc:4840/", "Filler", "Basic256Sha256_Sign")
    as_alice = Endpoint(
        "opcua", "opc.tcp://plc:4840/", "Filler", "Basic256Sha256_Sign", {"user": "alice"}
    )
    assert pool_key(plain) == pool_key(other_machine)
    assert len({pool_key(plain), pool_key(signed), pool_key(as_alice)}) == 3


async def test_a_plc_that_cannot_be_reached_fails_every_waiting_use_at_once(
    pool: SessionPool,
) -> None:
    sim = PlcSimulator([SimUnit("Gone")])
    await sim.start()
    ep = endpoint(sim, "Gone")
    await sim.stop()

    async def use() -> None:
        async with pool.session(ep) as plc:
            await plc.capacity()

    results = await asyncio.gather(*(use() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, MachineUnreachableError) for r in results), results
    assert pool.connects == 0
    assert pool.sessions == 0
