"""Fault tests: the MES runs as separate processes (see ``harness``); a dozen orders run
while one part is killed, stopped or cut off, and afterwards every order is final, nothing
was recorded twice, the ERP got every message once, stock balances and the audit chain holds.

Each test is bounded by ``asyncio.timeout``; the bounds leave room for Temporal's own
timeouts that a fault makes it wait for (a killed worker's activities are retried after their
heartbeat timeout, 30 s, or start-to-close timeout, 60 s).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from mes.machines import JobState
from tests.faults.harness import (
    HELD_BY_LOST_JOB,
    Counts,
    Plant,
    check_plant,
    check_plc_runs,
    order_bodies,
)

pytestmark = pytest.mark.postgres
log = logging.getLogger(__name__)

#: Orders per scenario: loaves (2 steps) and roll packs (3 steps) by turns.
ORDERS = 10


def finish(name: str, counts: Counts, started: float) -> None:
    """Print what was counted (``-s`` shows it) and hold every lot to its records: its
    quantity is its start minus what was consumed from it."""
    took = asyncio.get_running_loop().time() - started
    print(f"\nFAULT {name} ({took:.0f} s): {counts.line()}")
    assert not counts.stock_off, f"lots (quantity, expected): {counts.stock_off}"


async def test_two_workers_no_fault(plant: Plant) -> None:
    """(f) Two workers share the task queue; no fault."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(120):
        await plant.start_worker()
        ids = await plant.post_orders(ORDERS, "F")
        await plant.until_final(ids, timeout_s=100)
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish("two-workers", counts, started)


async def test_worker_killed_mid_run(plant: Plant) -> None:
    """(a) kill -9 the only worker mid-run; a new one takes over."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(200):
        ids = await plant.post_orders(ORDERS, "A")
        await plant.until_progress(0.25)
        plant.workers[0].kill()
        await asyncio.sleep(1)
        await plant.start_worker()
        await plant.until_final(ids, timeout_s=170)
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish("worker-kill", counts, started)


async def test_temporal_restarted(plant: Plant) -> None:
    """(b) Stop the Temporal dev server (SIGTERM) mid-run and start it again on the same
    database file and port. Orders the ERP posts meanwhile are stored and answered 503 (or,
    when the client's own retries outlast the outage, 202); the ERP posts them again once
    Temporal is back, as a 503 asks, and the second post finds the stored order."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(200):
        ids = await plant.post_orders(ORDERS // 2, "B")
        await plant.until_progress(0.25)
        plant.temporal.terminate()
        late = order_bodies(ORDERS - ORDERS // 2, "B-late")
        answers = await plant.post(late, timeout_s=60)
        assert {r.status_code for r in answers} <= {202, 503}, [r.text for r in answers]
        away = sorted(r.status_code for r in answers)
        await asyncio.sleep(2)
        plant.temporal.start()
        await plant.wait_temporal()
        again = await plant.post(late)
        assert {r.status_code for r in again} <= {200, 202}, [r.text for r in again]
        ids += [int(r.json()["id"]) for r in again]
        await plant.until_final(ids, timeout_s=150)
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish(f"temporal-restart (answers while away: {away})", counts, started)


async def test_plc_killed_and_restarted(plant: Plant) -> None:
    """(c) kill -9 the PLC simulator mid-job and start it again on the same port: it forgets
    its jobs, the work orders it held go Held (the PLC lost the job), a supervisor resumes
    each, and they complete."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(200):
        ids = await plant.post_orders(ORDERS, "C")
        await plant.until_progress(0.1)
        # Kill it while it runs a job (the MES lags behind the machine: the database alone
        # does not tell whether the PLC still holds unrecorded work).
        async with asyncio.timeout(60):
            while JobState.RUNNING not in (await plant.plc_jobs()).values():
                await asyncio.sleep(0.02)
        plant.plc.kill()
        await asyncio.sleep(2)
        plant.plc_started_at = datetime.now(UTC)
        plant.plc.start()
        await plant.wait_plc()
        resumed: list[tuple[str, str]] = []
        await plant.until_final(ids, timeout_s=150, resume_held=resumed)
    assert resumed, "no work order was held after the PLC lost its jobs"
    assert all(HELD_BY_LOST_JOB in reason for _, reason in resumed), resumed
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish(f"plc-kill (resumed {len(resumed)})", counts, started)


async def test_erp_receiver_away(plant: Plant) -> None:
    """(d) Stop the ERP receiver for a while and start it again on the same store."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(200):
        ids = await plant.post_orders(ORDERS, "D")
        await plant.until_progress(0.1)
        plant.erp.terminate()
        await asyncio.sleep(8)
        plant.erp.start()
        await plant.wait_erp()
        await plant.until_final(ids, timeout_s=150)
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish("erp-away", counts, started)


async def test_database_connections_terminated(plant: Plant) -> None:
    """(e) pg_terminate_backend on every connection of the workers (and the API) a few
    times mid-run."""
    killed: list[int] = []
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(200):
        ids = await plant.post_orders(ORDERS, "E")
        await plant.until_progress(0.1)
        for _ in range(3):
            killed.append(plant.terminate_db_connections())
            await asyncio.sleep(1.5)
        await plant.until_final(ids, timeout_s=150)
    assert sum(killed) > 0, killed
    counts = check_plant(plant, ids)
    await check_plc_runs(plant, counts)
    finish(f"db-terminate (connections {killed})", counts, started)
