"""KPIs through the real API on PostgreSQL: OEE of a hand-built history and of a seeded
simulator run followed by the collector, computed by hand here; OTD / OTIF of hand-built
orders; roles and bad input."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.opcua.simulator import PlcSimulator, SimUnit, Stoppages
from mes.collector import collector_running
from mes.kpi import planned_seconds
from mes.masterdata import load_plant_file
from mes.masterdata.schema import CalendarEntry
from mes.models import (
    Equipment,
    EquipmentCount,
    EquipmentLevel,
    EquipmentStateInterval,
    JobOrder,
    JobResponse,
    LotDisposition,
    MaterialActual,
    MaterialDefinition,
    MaterialLot,
    OperationsDefinition,
    OperationsRequest,
    OperationsSegment,
    SegmentRequirement,
    WorkMaster,
    WorkMasterEquipment,
)
from tests.conftest import token
from tests.test_collector import add_unit, eventually, run_jobs, totals

pytestmark = pytest.mark.postgres

IDLE, EXECUTE, HELD = 4, 6, 11


def add_equipment(
    s: Session, eid: str, level: EquipmentLevel, parent: Equipment | None = None
) -> Equipment:
    eq = Equipment(external_id=eid, equipment_level=level, parent=parent)
    s.add(eq)
    s.flush()
    return eq


def ideal_cycle(s: Session, equipment_id: int, seconds: float) -> None:
    wm = WorkMaster(external_id=f"WM-{uuid.uuid4().hex[:8]}")
    s.add(wm)
    s.flush()
    s.add(
        WorkMasterEquipment(
            work_master_id=wm.id, equipment_id=equipment_id, ideal_cycle_time_s=seconds
        )
    )


async def test_oee_of_a_hand_built_history(
    api: httpx.AsyncClient, pg_sessions: sessionmaker[Session]
) -> None:
    tag = uuid.uuid4().hex[:6]
    t = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    m = timedelta(minutes=1)
    with pg_sessions() as s, s.begin():
        line = add_equipment(s, f"LINE-{tag}", EquipmentLevel.PRODUCTION_LINE)
        u1 = add_equipment(s, f"U1-{tag}", EquipmentLevel.WORK_UNIT, line)
        add_equipment(s, f"U2-{tag}", EquipmentLevel.WORK_UNIT, line)  # no data: all lost
        ideal_cycle(s, u1.id, 30.0)
        ideal_cycle(s, u1.id, 45.0)  # a slower recipe: the fastest one is the ideal
        for state, reason, a, b in [
            (IDLE, None, 0, 10),
            (EXECUTE, None, 10, 70),
            (HELD, 42, 70, 80),
            (EXECUTE, None, 80, None),  # still executing: clipped at the period's end
        ]:
            s.add(
                EquipmentStateInterval(
                    equipment_id=u1.id,
                    state=state,
                    stop_reason=reason,
                    started_at=t + a * m,
                    ended_at=t + b * m if b is not None else None,
                )
            )
        for at, processed, defective in [(20, 100, 5), (90, 50, 0), (130, 999, 9)]:
            s.add(
                EquipmentCount(
                    equipment_id=u1.id,
                    at=t + at * m,
                    processed_delta=processed,
                    defective_delta=defective,
                    processed_total=0,
                    defective_total=0,
                )
            )
    period = {"from": t.isoformat(), "to": (t + 120 * m).isoformat()}
    supervisor = token(pg_sessions, "supervisor")

    r = await api.get(
        "/api/v1/kpi/oee",
        params={"equipment": f"U1-{tag}", **period, "bucket": "hour"},
        headers=supervisor,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    total = body["total"]
    # By hand: PBT 7200 s; APT 60 + 40 min = 6000 s; PQ 150, SQ 5, GQ 145; PRU 30 s.
    assert total["planned_busy_time_s"] == 7200
    assert total["actual_production_time_s"] == 6000
    assert (total["produced_quantity"], total["scrap_quantity"], total["good_quantity"]) == (
        150,
        5,
        145,
    )
    assert total["ideal_cycle_time_s"] == 30
    assert total["availability"] == pytest.approx(6000 / 7200)
    assert total["performance"] == pytest.approx(30 * 150 / 6000)
    assert total["quality"] == pytest.approx(145 / 150)
    assert total["oee"] == pytest.approx(6000 / 7200 * 0.75 * 145 / 150)
    first, second = body["buckets"]
    assert first["actual_production_time_s"] == 3000
    assert first["performance"] == pytest.approx(30 * 100 / 3000)
    assert second["actual_production_time_s"] == 3000
    assert second["performance"] == pytest.approx(30 * 50 / 3000)
    assert {(d["state"], d["stop_reason"], d["seconds"]) for d in body["top_downtime"]} == {
        ("Idle", None, 600),
        ("Held", 42, 600),
    }

    # The line sums its two units: twice the planned time, the same production.
    auditor = token(pg_sessions, "auditor")
    r = await api.get(
        "/api/v1/kpi/oee", params={"equipment": f"LINE-{tag}", **period}, headers=auditor
    )
    assert r.status_code == 200, r.text
    line_total = r.json()["total"]
    assert r.json()["work_units"] == [f"U1-{tag}", f"U2-{tag}"]
    assert line_total["planned_busy_time_s"] == 14400
    assert line_total["availability"] == pytest.approx(6000 / 14400)
    assert line_total["oee"] == pytest.approx(6000 / 14400 * 0.75 * 145 / 150)

    # Roles and bad input.
    r = await api.get(
        "/api/v1/kpi/oee",
        params={"equipment": f"U1-{tag}", **period},
        headers=token(pg_sessions, "erp"),
    )
    assert r.status_code == 403
    bad: list[tuple[dict[str, str], int, str]] = [
        ({"equipment": "NOPE", **period}, 404, "NOPE"),
        (
            {"equipment": f"U1-{tag}", "from": "2026-01-01T00:00:00", "to": period["to"]},
            400,
            "from",
        ),
        ({"equipment": f"U1-{tag}", "from": period["to"], "to": period["from"]}, 422, "to"),
        ({"equipment": f"U1-{tag}", **period, "bucket": "week"}, 400, "bucket"),
        ({"equipment": f"U1-{tag}", "from": "yesterday", "to": period["to"]}, 400, "from"),
    ]
    for params, status, named in bad:
        r = await api.get("/api/v1/kpi/oee", params=params, headers=supervisor)
        assert r.status_code == status, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert named in r.text


def seeded_stoppages(machine: str, plan: Stoppages, jobs: int) -> tuple[dict[int, float], float]:
    """The stoppages by hand: the simulator's draws, three per job, from seed 7 and the unit's
    name: seconds Held per fault reason, and seconds Suspended by micro-stops."""
    rng = random.Random(f"7|{machine}|stops")
    faults: dict[int, float] = {}
    micro = 0.0
    for _ in range(jobs):
        u, _at, pick = rng.random(), rng.uniform(0.2, 0.8), rng.random()
        if u < plan.fault_rate:
            reason = plan.fault_reasons[int(pick * len(plan.fault_reasons))]
            faults[reason] = faults.get(reason, 0.0) + plan.fault_s
        elif u < plan.fault_rate + plan.micro_stop_rate:
            micro += plan.micro_stop_s
    return faults, micro


async def test_oee_of_a_seeded_simulator_run(
    api: httpx.AsyncClient, pg_sessions: sessionmaker[Session]
) -> None:
    """6 jobs of 8 items at speed 2 (0.4 s cycle: 0.2 s each), a quarter defective, faults and
    micro-stops drawn from seed 7. By hand: PQ 48, SQ 12, quality 0.75 (exact); APT 1.2 s;
    each fault 0.4 s Held with its reason, each micro-stop 0.2 s Suspended; performance =
    0.05 x 48 / APT. Times to 0.15 s (the server stamps the states as they change)."""
    plan = Stoppages(micro_stop_rate=0.3, micro_stop_s=0.2, fault_rate=0.3, fault_s=0.4)
    # The simulator draws from its seed and the unit's name: a name unique to this run whose
    # draws hold at least one fault and one micro-stop (about 8 in 10 names do).
    while True:
        machine = f"WU-SEEDED-{uuid.uuid4().hex[:6]}"
        faults, micro = seeded_stoppages(machine, plan, jobs=6)
        if faults and micro:
            break
    spec = SimUnit(
        machine,
        cycle_time_s=0.4,
        speed=2.0,
        defect_rate=0.25,
        measured={},
        seed=7,
        stoppages=plan,
    )

    async with PlcSimulator([spec]) as sim:
        unit_id = add_unit(pg_sessions, sim.url, machine)
        with pg_sessions() as s, s.begin():
            ideal_cycle(s, unit_id, 0.05)
        async with collector_running(pg_sessions, publish_ms=50):
            await asyncio.sleep(0.5)
            start = datetime.now(UTC)
            await run_jobs(sim.url, machine, "S", 6, 8)
            await eventually(lambda: totals(pg_sessions, unit_id) == (48, 12))
            await asyncio.sleep(0.3)
            end = datetime.now(UTC)
    r = await api.get(
        "/api/v1/kpi/oee",
        params={"equipment": machine, "from": start.isoformat(), "to": end.isoformat()},
        headers=token(pg_sessions, "supervisor"),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    total = body["total"]
    assert (total["produced_quantity"], total["scrap_quantity"]) == (48, 12)
    assert total["quality"] == 0.75
    pbt = (end - start).total_seconds()
    assert total["planned_busy_time_s"] == pytest.approx(pbt, abs=1e-3)
    apt = total["actual_production_time_s"]
    assert apt == pytest.approx(1.2, abs=0.15)
    assert total["availability"] == pytest.approx(apt / pbt)
    assert total["performance"] == pytest.approx(0.05 * 48 / 1.2, rel=0.12)
    assert total["oee"] == pytest.approx((1.2 / pbt) * (0.05 * 48 / 1.2) * 0.75, rel=0.12)
    downtime = {(d["state"], d["stop_reason"]): d["seconds"] for d in body["top_downtime"]}
    for reason, seconds in faults.items():
        assert downtime[("Held", reason)] == pytest.approx(seconds, abs=0.15)
    assert downtime[("Suspended", 1)] == pytest.approx(micro, abs=0.15)


async def test_delivery_by_hand(api: httpx.AsyncClient, pg_sessions: sessionmaker[Session]) -> None:
    tag = uuid.uuid4().hex[:6]
    t = datetime(2020, 3, 1, tzinfo=UTC) + timedelta(minutes=int(tag, 16) % 100000)
    h = timedelta(hours=1)
    with pg_sessions() as s, s.begin():
        products = []
        for name in ("A", "B"):
            md = MaterialDefinition(external_id=f"P{name}-{tag}", unit="ea")
            s.add(md)
            s.flush()
            od = OperationsDefinition(external_id=f"OD{name}-{tag}", material_definition_id=md.id)
            s.add(od)
            s.flush()
            products.append((md, od))
        # (product, created, due, completed, state): on time; late by 1 h; never finished.
        for i, (p, created, due, completed, state) in enumerate(
            [
                (0, 0, 3, 2, "Completed"),
                (0, 0, 4, 5, "Completed"),
                (1, 1, 6, None, "Running"),
            ]
        ):
            md, od = products[p]
            s.add(
                OperationsRequest(
                    external_id=f"ORD-{tag}-{i}",
                    operations_definition_id=od.id,
                    material_definition_id=md.id,
                    quantity=Decimal(10),
                    unit="ea",
                    due=t + due * h,
                    state=state,
                    request_hash="x",
                    workflow_id=f"wf-{tag}-{i}",
                    created_at=t + created * h,
                    completed_at=t + completed * h if completed is not None else None,
                )
            )
    r = await api.get(
        "/api/v1/kpi/delivery",
        params={"from": t.isoformat(), "to": (t + 24 * h).isoformat(), "group_by": "product"},
        headers=token(pg_sessions, "auditor"),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    total = body["total"]
    assert total["orders_due"] == 3
    assert total["on_time"] == 1
    assert total["otd"] == pytest.approx(1 / 3)
    assert total["otif"] == 0  # nothing produced was booked: not in full
    assert total["lead_time_p50_s"] == 2 * 3600
    assert total["lead_time_p90_s"] == 5 * 3600
    late = {o["order"]: o for o in total["late_orders"]}
    assert late[f"ORD-{tag}-1"]["late_by_s"] == 3600
    assert late[f"ORD-{tag}-2"]["completed_at"] is None
    assert late[f"ORD-{tag}-2"]["late_by_s"] > 5 * 365 * 86400  # due in 2020, not done
    assert [(g["key"], g["orders_due"], g["on_time"]) for g in body["groups"]] == [
        (f"PA-{tag}", 2, 1),
        (f"PB-{tag}", 1, 0),
    ]
    r = await api.get(
        "/api/v1/kpi/delivery",
        params={"from": t.isoformat(), "to": (t + 24 * h).isoformat(), "group_by": "customer"},
        headers=token(pg_sessions, "auditor"),
    )
    assert r.status_code == 400
    assert "group_by" in r.text


def add_order(
    s: Session,
    tag: str,
    name: str,
    unit: Equipment,
    *,
    due: datetime,
    completed: datetime | None,
    made: int,
    job_state: str,
    rejected: bool = False,
) -> None:
    """An order of 10 of a new product, with one step and one work order on ``unit`` that
    made ``made`` items (a lot Rejected with ``rejected``)."""
    md = MaterialDefinition(external_id=f"P-{tag}-{name}", unit="ea")
    wm = WorkMaster(external_id=f"WM-{tag}-{name}")
    s.add_all([md, wm])
    s.flush()
    od = OperationsDefinition(external_id=f"OD-{tag}-{name}", material_definition_id=md.id)
    s.add(od)
    s.flush()
    seg = OperationsSegment(
        operations_definition_id=od.id, external_id="S1", sequence=1, work_master_id=wm.id
    )
    order = OperationsRequest(
        external_id=f"ORD-{tag}-{name}",
        operations_definition_id=od.id,
        material_definition_id=md.id,
        quantity=Decimal(10),
        unit="ea",
        due=due,
        state="Completed" if completed else "Running",
        request_hash="x",
        workflow_id=f"wf-{tag}-{name}",
        created_at=due - timedelta(hours=3),
        completed_at=completed,
    )
    s.add_all([seg, order])
    s.flush()
    step = SegmentRequirement(
        operations_request_id=order.id,
        operations_segment_id=seg.id,
        sequence=1,
        quantity=Decimal(10),
        unit="ea",
        state=job_state,
    )
    s.add(step)
    s.flush()
    job = JobOrder(
        external_id=f"JO-{tag}-{name}",
        segment_requirement_id=step.id,
        work_master_id=wm.id,
        equipment_id=unit.id,
        state=job_state,
        ended_at=completed,
    )
    s.add(job)
    s.flush()
    if not made:
        return
    lot = MaterialLot(
        external_id=f"LOT-{tag}-{name}",
        material_definition_id=md.id,
        quantity=Decimal(made),
        unit="ea",
        disposition=LotDisposition.REJECTED if rejected else LotDisposition.RELEASED,
    )
    response = JobResponse(external_id=f"JR-{tag}-{name}", job_order_id=job.id, state="Ended")
    s.add_all([lot, response])
    s.flush()
    s.add(
        MaterialActual(
            job_response_id=response.id,
            material_definition_id=md.id,
            material_lot_id=lot.id,
            use="Produced",
            quantity=Decimal(made),
            unit="ea",
        )
    )


async def test_otif_throughput_and_wip(
    api: httpx.AsyncClient, pg_sessions: sessionmaker[Session]
) -> None:
    tag = uuid.uuid4().hex[:6]
    t = datetime(2021, 6, 1, tzinfo=UTC) + timedelta(minutes=int(tag, 16) % 100000)
    h = timedelta(hours=1)
    with pg_sessions() as s, s.begin():
        site = add_equipment(s, f"SITE-{tag}", EquipmentLevel.SITE)
        line = add_equipment(s, f"LINE-{tag}", EquipmentLevel.PRODUCTION_LINE, site)
        u1 = add_equipment(s, f"U1-{tag}", EquipmentLevel.WORK_UNIT, line)
        u2 = add_equipment(s, f"U2-{tag}", EquipmentLevel.WORK_UNIT, line)
        # In full; on time but its lot rejected; running late; waiting (due later).
        add_order(
            s, tag, "full", u1, due=t + 2 * h, completed=t + h, made=10, job_state="Completed"
        )
        add_order(
            s, tag, "rej", u1, due=t + 2 * h, completed=t + h, made=10, job_state="Completed",
            rejected=True,
        )  # fmt: skip
        add_order(s, tag, "run", u2, due=t + 3 * h, completed=None, made=0, job_state="Running")
        add_order(s, tag, "wait", u2, due=t + 30 * h, completed=None, made=0, job_state="Waiting")
    auditor = token(pg_sessions, "auditor")
    period = {"from": t.isoformat(), "to": (t + 4 * h).isoformat()}

    r = await api.get("/api/v1/kpi/delivery", params=period, headers=auditor)
    assert r.status_code == 200, r.text
    total = r.json()["total"]
    assert (total["orders_due"], total["on_time"], total["on_time_in_full"]) == (3, 2, 1)
    assert total["otd"] == pytest.approx(2 / 3)
    assert total["otif"] == pytest.approx(1 / 3)
    assert [o["order"] for o in total["late_orders"]] == [f"ORD-{tag}-run"]

    r = await api.get(
        "/api/v1/kpi/throughput", params={**period, "equipment": f"SITE-{tag}"}, headers=auditor
    )
    assert r.status_code == 200, r.text
    (only,) = r.json()["lines"]
    assert only["line"] == f"LINE-{tag}"
    assert only["work_orders_completed"] == 2
    assert only["produced"] == [
        {"material": f"P-{tag}-full", "unit": "ea", "quantity": 10, "per_hour": 2.5},
        {"material": f"P-{tag}-rej", "unit": "ea", "quantity": 10, "per_hour": 2.5},
    ]
    assert only["wip"] == {"Running": 1, "Waiting": 1}
    assert only["wip_total"] == 2
    r = await api.get(
        "/api/v1/kpi/throughput", params={**period, "equipment": "NOPE"}, headers=auditor
    )
    assert r.status_code == 404


def test_planned_seconds_of_a_calendar() -> None:
    day = datetime(2026, 12, 1, tzinfo=UTC)
    cal = CalendarEntry.model_validate(
        {
            "shifts": [
                {"name": "Early", "start": "06:00", "end": "14:00"},
                {"name": "Night", "start": "22:00", "end": "06:00"},  # into the next day
            ],
            "planned_downtime": [
                {"start": "2026-12-01T07:00:00Z", "end": "2026-12-01T09:00:00Z"},
                {"start": "2026-12-01T08:00:00Z", "end": "2026-12-01T10:00:00Z"},  # overlaps
            ],
        }
    )
    # 00-06 (the night from the day before) + 06-14 + 22-24 = 16 h, minus 07-10 = 13 h.
    assert planned_seconds(cal, day, day + timedelta(days=1)) == 13 * 3600
    assert planned_seconds(cal, day + timedelta(hours=14), day + timedelta(hours=22)) == 0
    assert planned_seconds(None, day, day + timedelta(hours=2)) == 7200
    no_shifts = CalendarEntry.model_validate(
        {"planned_downtime": [{"start": "2026-12-01T07:00:00Z", "end": "2026-12-01T09:00:00Z"}]}
    )
    assert planned_seconds(no_shifts, day, day + timedelta(days=1)) == 22 * 3600


async def test_oee_planned_busy_time_follows_the_line_calendar(
    api: httpx.AsyncClient, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    plant = tmp_path / "plant.yaml"
    plant.write_text(
        f"""
equipment:
  - id: LINE-CAL-{tag}
    level: ProductionLine
    calendar:
      shifts: [{{name: Day, start: "06:00", end: "18:00"}}]
      planned_downtime:
        - {{start: "2026-12-01T10:00:00Z", end: "2026-12-01T11:00:00Z", reason: cleaning}}
    children:
      - {{id: WU-CAL-{tag}, level: WorkUnit}}
""",
        encoding="utf-8",
    )
    load_plant_file(pg_sessions, plant)
    with pg_sessions() as s, s.begin():
        unit = s.scalars(select(Equipment).where(Equipment.external_id == f"WU-CAL-{tag}")).one()
        assert unit.parent is not None
        assert unit.parent.calendar is not None
        day = datetime(2026, 12, 1, tzinfo=UTC)
        s.add(
            EquipmentStateInterval(
                equipment_id=unit.id,
                state=EXECUTE,
                started_at=day + timedelta(hours=6),
                ended_at=day + timedelta(hours=16),
            )
        )
    r = await api.get(
        "/api/v1/kpi/oee",
        params={
            "equipment": f"LINE-CAL-{tag}",
            "from": day.isoformat(),
            "to": (day + timedelta(days=1)).isoformat(),
            "bucket": "shift",
        },
        headers=token(pg_sessions, "supervisor"),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # 06-18 minus the hour of cleaning: 11 h planned; 10 h executed.
    assert body["total"]["planned_busy_time_s"] == 11 * 3600
    assert body["total"]["availability"] == pytest.approx(10 / 11)
    assert [b["planned_busy_time_s"] for b in body["buckets"]] == [2 * 3600, 7 * 3600, 2 * 3600]
