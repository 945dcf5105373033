"""The machine data collector on real parts (PostgreSQL, the OPC UA simulator): PackML states
and counters followed by subscription, stored as intervals and deltas; a controller killed and
restarted mid-run, and a collector restarted, lose no count and count none twice."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from adapters.opcua.client import JobControlClient
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes.collector import Share, collector_running, counter_delta, owned_units
from mes.machines import JobOrderData, MaterialRequirement
from mes.models import (
    ControllerEndpoint,
    Equipment,
    EquipmentCount,
    EquipmentLevel,
    EquipmentStateInterval,
)

pytestmark = pytest.mark.postgres

EXECUTE, HELD, IDLE = 6, 11, 4


def test_counter_delta_rollover_and_restart() -> None:
    assert counter_delta(None, 500) == 0  # the first reading is the baseline
    assert counter_delta(10, 15) == 5
    assert counter_delta(2**32 - 5, 3) == 8  # rollover: on through zero
    assert counter_delta(2**32 - 1, 0) == 1
    assert counter_delta(1000, 3) == 3  # set back: a restart counted 3 since
    assert counter_delta(1000, 0) == 0
    assert counter_delta(5, 9, restarted=True) == 9  # a new server start time says restart
    assert counter_delta(7, -1) == counter_delta(7, 2**32 - 1)  # an Int32 read as unsigned


def test_share_parse() -> None:
    assert Share.parse("1/3") == Share(1, 3)
    for bad in ("3/3", "1", "a/2", "-1/2", "1/0"):
        with pytest.raises(ValueError, match="K/N"):
            Share.parse(bad)


def add_unit(sessions: sessionmaker[Session], url: str, machine: str) -> int:
    with sessions() as s, s.begin():
        eq = Equipment(external_id=machine, equipment_level=EquipmentLevel.WORK_UNIT)
        s.add(eq)
        s.flush()
        s.add(ControllerEndpoint(equipment_id=eq.id, protocol="opcua", url=url, machine=machine))
        return eq.id


def totals(sessions: sessionmaker[Session], equipment_id: int) -> tuple[int, int]:
    with sessions() as s:
        row = s.execute(
            select(
                func.coalesce(func.sum(EquipmentCount.processed_delta), 0),
                func.coalesce(func.sum(EquipmentCount.defective_delta), 0),
            ).where(EquipmentCount.equipment_id == equipment_id)
        ).one()
        return int(row[0]), int(row[1])


async def eventually(check: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await asyncio.to_thread(check):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def run_jobs(url: str, machine: str, prefix: str, count: int, quantity: int) -> None:
    """``count`` jobs of ``quantity`` items, one after the other, each to its end."""
    async with JobControlClient(url, machine) as plc:
        for i in range(count):
            job = f"{prefix}-{i}"
            made = MaterialRequirement("ITEM", "Produced", float(quantity), "ea", "")
            await plc.store_and_start(JobOrderData(job, "WM", material_requirements=[made]))
            await asyncio.wait_for(plc.wait_until_final(job, poll_s=0.05), 15)


async def test_restarts_lose_no_count_and_double_none(pg_sessions: sessionmaker[Session]) -> None:
    machine = f"WU-COLLECT-{uuid.uuid4().hex[:6]}"
    spec = SimUnit(machine, cycle_time_s=0.15, defect_rate=0.25, measured={})
    first = PlcSimulator([spec])
    await first.start()
    port = int(first.url.rsplit(":", 1)[1].strip("/"))
    unit_id = add_unit(pg_sessions, first.url, machine)
    with pg_sessions() as s:
        assert unit_id in [u.id for u in owned_units(s, Share(unit_id % 3, 3))]
        assert unit_id not in [u.id for u in owned_units(s, Share((unit_id + 1) % 3, 3))]

    async with collector_running(pg_sessions, Share(unit_id % 2, 2), publish_ms=50) as units:
        assert [u.id for u in units if u.id == unit_id] == [unit_id]
        await asyncio.sleep(0.5)  # the baseline: the counters as they are (0)
        await run_jobs(first.url, machine, "A", 3, 4)  # 12 processed, 1 defective each
        await eventually(lambda: totals(pg_sessions, unit_id) == (12, 3))

        # The controller dies and comes back with its counters at zero.
        await first.stop()
        second = PlcSimulator([spec], port=port)
        await second.start()
        await run_jobs(second.url, machine, "B", 2, 4)
        await eventually(lambda: totals(pg_sessions, unit_id) == (20, 5))

    # A new collector starts from the stored totals: nothing is counted twice ...
    try:
        async with collector_running(pg_sessions, publish_ms=50):
            await asyncio.sleep(1.0)
            assert totals(pg_sessions, unit_id) == (20, 5)
            # ... and what the controller counts next is counted once.
            await run_jobs(second.url, machine, "C", 1, 4)
            await eventually(lambda: totals(pg_sessions, unit_id) == (24, 6))
            await asyncio.sleep(0.5)
            assert totals(pg_sessions, unit_id) == (24, 6)
    finally:
        await second.stop()

    with pg_sessions() as s:
        intervals = s.scalars(
            select(EquipmentStateInterval)
            .where(EquipmentStateInterval.equipment_id == unit_id)
            .order_by(EquipmentStateInterval.started_at)
        ).all()
    states = [i.state for i in intervals]
    # The B jobs ran while the controller was out of reach (the collector notices a lost link
    # within a second): their counts came back with the restart, their states could not.
    assert states[0] == IDLE
    assert states.count(EXECUTE) >= 4
    assert all(a != b for a, b in itertools.pairwise(states))
    assert [i for i in intervals if i.ended_at is None] == [intervals[-1]]
    for a, b in itertools.pairwise(intervals):
        assert a.ended_at == b.started_at


async def test_stop_reason_of_a_fault(pg_sessions: sessionmaker[Session]) -> None:
    machine = f"WU-FAULT-{uuid.uuid4().hex[:6]}"
    async with PlcSimulator([SimUnit(machine, cycle_time_s=5, measured={})]) as sim:
        unit_id = add_unit(pg_sessions, sim.url, machine)
        async with (
            collector_running(pg_sessions, publish_ms=50),
            JobControlClient(sim.url, machine) as plc,
        ):
            await plc.store_and_start(JobOrderData("F-1", "WM"))
            await asyncio.sleep(0.3)
            await sim.fault(machine, 42)
            await asyncio.sleep(0.3)
            await sim.clear_fault(machine)
            await asyncio.sleep(0.3)

            def held_with_reason() -> bool:
                with pg_sessions() as s:
                    return (
                        s.scalar(
                            select(func.count()).where(
                                EquipmentStateInterval.equipment_id == unit_id,
                                EquipmentStateInterval.state == HELD,
                                EquipmentStateInterval.stop_reason == 42,
                                EquipmentStateInterval.ended_at.is_not(None),
                            )
                        )
                        == 1
                    )

            await eventually(held_with_reason)
            await plc.abort("F-1")


def test_cli_refuses_a_bad_share(capsys: pytest.CaptureFixture[str]) -> None:
    from mes.cli import main

    assert main(["collector", "--share", "2/2"]) == 2
    assert "--share" in capsys.readouterr().err
