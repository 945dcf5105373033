"""The quality gate on real parts (PostgreSQL, Temporal, the OPC UA simulator, the API): a
lot failing a test is Restricted, its work order held and a nonconformance opened, in one
transaction with the audit events; a supervisor releases, reworks or scraps it; a Restricted
lot is never consumed; results by hand; the yield numbers of a hand-built history."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from adapters.opcua.simulator import MeasuredFault
from mes import execution, quality
from mes.launch import Stack
from mes.models import (
    Equipment,
    JobOrder,
    JobResponse,
    LotDisposition,
    MaterialActual,
    MaterialDefinition,
    MaterialLot,
    Nonconformance,
    OperationsRequest,
    TestResult,
    TestSpecification,
)
from mes.production_orders import ProductionOrderIn, create_order
from tests.conftest import client, fresh_stack, order_final, post_order

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
async def line(temporal_env: WorkflowEnvironment) -> AsyncIterator[Stack]:
    """The sample plant whose packer weighs every bag out of specification."""
    async with fresh_stack(
        temporal_env,
        "quality",
        cycle_time_s=0.3,
        measured_faults={"PackWeight": MeasuredFault(defect_rate=1.0)},
    ) as stack:
        yield stack


async def post_rolls(stack: Stack) -> tuple[int, str]:
    async with client(stack, "erp") as erp:
        order = await post_order(erp, "ROLL-6PK", 6, prefix="Q")
    return int(order["id"]), str(order["order_number"])


async def open_nc(stack: Stack, lot: str, timeout: float = 60) -> dict[str, Any]:
    async with client(stack, "auditor") as aud, asyncio.timeout(timeout):
        while True:
            r = await aud.get("/api/v1/quality/nonconformances", params={"state": "Open"})
            assert r.status_code == 200, r.text
            found = [nc for nc in r.json()["items"] if nc["lot"] == lot]
            if found:
                nc: dict[str, Any] = found[0]
                return nc
            await asyncio.sleep(0.2)


async def final_order(stack: Stack, order_id: int) -> dict[str, Any]:
    async with client(stack, "erp") as erp:
        return await order_final(erp, order_id)


def rows(sessions: sessionmaker[Session], sql: str, **params: object) -> list[Any]:
    with sessions() as s:
        return list(s.execute(text(sql), params).all())


def audit_of(sessions: sessionmaker[Session], object_id: str) -> list[tuple[str, str, str]]:
    return [
        (r.action, r.actor, r.reason or "")
        for r in rows(
            sessions,
            "SELECT action, actor, reason FROM audit_event WHERE object_id = :o ORDER BY seq",
            o=object_id,
        )
    ]


async def dispose(stack: Stack, nc: str, decision: str, reason: str) -> httpx.Response:
    async with client(stack, "supervisor") as sup:
        return await sup.post(
            f"/api/v1/quality/nonconformances/{nc}/disposition",
            json={"disposition": decision, "reason": reason},
        )


async def test_failed_lot_is_held_then_released_by_a_supervisor(line: Stack) -> None:
    order_id, number = await post_rolls(line)
    job, lot = f"{number}-03", f"LOT-{number}-03"
    nc = await open_nc(line, lot)

    # One transaction: lot Restricted, work order Held, nonconformance Open, the audit trail.
    assert rows(
        line.sessions, "SELECT disposition FROM material_lot WHERE external_id = :l", l=lot
    ) == [("Restricted",)]
    assert rows(line.sessions, "SELECT state FROM job_order WHERE external_id = :j", j=job) == [
        ("Held",)
    ]
    assert rows(
        line.sessions,
        "SELECT n.state, j.external_id FROM nonconformance n JOIN job_order j "
        "ON j.id = n.job_order_id WHERE n.external_id = :n",
        n=nc["id"],
    ) == [("Open", job)]
    assert [a for a, _, _ in audit_of(line.sessions, nc["id"])] == ["nonconformance.opened"]
    assert ("lot.disposition", "system") in [(a, w) for a, w, _ in audit_of(line.sessions, lot)]
    held = [e for e in audit_of(line.sessions, job) if e[0] == "job_order.state"][-1]
    assert held[2].startswith(nc["id"])
    assert nc["work_unit"] == "WU-PACKER-2"
    assert nc["product"] == "ROLL-6PK"
    assert nc["results"][0]["passed"] is False
    assert nc["results"][0]["source"] == "machine"
    async with client(line, "supervisor") as sup:
        detail = (await sup.get(f"/api/v1/work-orders/{job}")).json()
        assert "quality hold" in detail["live"]["note"]
        # Only the disposition moves it on.
        assert (await sup.post(f"/api/v1/work-orders/{job}/resume", json={})).status_code == 409
        bad = await sup.post(
            f"/api/v1/quality/nonconformances/{nc['id']}/disposition",
            json={"disposition": "bless", "reason": "x"},
        )
        assert bad.status_code == 400
        assert "disposition" in bad.text

    r = await dispose(line, nc["id"], "release", "re-weighed: 362 g")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["state"], out["disposition"], out["lot_disposition"]) == (
        "Closed",
        "release",
        "Released",
    )
    sup_name = out["disposed_by"]
    assert sup_name != "system"
    assert (await final_order(line, order_id))["state"] == "Completed"
    assert ("nonconformance.disposed", sup_name, "re-weighed: 362 g") in audit_of(
        line.sessions, nc["id"]
    )
    assert ("lot.disposition", sup_name) in [(a, w) for a, w, _ in audit_of(line.sessions, lot)]
    # The same decision again answers the same; another is a conflict.
    assert (await dispose(line, nc["id"], "release", "again")).status_code == 200
    assert (await dispose(line, nc["id"], "scrap", "changed my mind")).status_code == 409


async def test_rework_then_scrap(line: Stack) -> None:
    order_id, number = await post_rolls(line)
    lot = f"LOT-{number}-03"
    nc = await open_nc(line, lot)
    r = await dispose(line, nc["id"], "rework", "re-bag the rolls")
    assert r.status_code == 200, r.text
    rework = r.json()["rework_work_order"]
    assert rework == f"{number}-03-RW1"

    # The rework job consumes the nonconforming lot and fails again (the packer always does).
    second = await open_nc(line, f"LOT-{rework}")
    assert rows(line.sessions, "SELECT status FROM material_lot WHERE external_id = :l", l=lot) == [
        ("Consumed",)
    ]
    r = await dispose(line, second["id"], "scrap", "bag seal broken")
    assert r.status_code == 200, r.text
    assert r.json()["lot_disposition"] == "Rejected"
    final = await final_order(line, order_id)
    assert final["state"] == "Aborted"
    assert rows(
        line.sessions,
        "SELECT state FROM job_order WHERE external_id IN (:a, :b) ORDER BY id",
        a=f"{number}-03",
        b=rework,
    ) == [("Completed",), ("Aborted",)]
    trail = audit_of(line.sessions, second["id"])
    assert [a for a, _, _ in trail] == ["nonconformance.opened", "nonconformance.disposed"]
    assert trail[1][2] == "bag seal broken"


async def test_manual_result_and_its_refusals(line: Stack) -> None:
    order_id, number = await post_rolls(line)
    nc = await open_nc(line, f"LOT-{number}-03")
    await dispose(line, nc["id"], "release", "fine")
    await final_order(line, order_id)
    dough = f"LOT-{number}-01"  # mixed before: DoughTemperature 24..27 degC
    async with client(line, "supervisor") as sup:
        good = await sup.post(
            "/api/v1/quality/results",
            json={"lot": dough, "property": "DoughTemperature", "value": 25.0, "unit": "degC"},
        )
        assert good.status_code == 201, good.text
        assert good.json()["passed"] is True
        assert good.json()["source"] == "manual"
        for body, field in [
            ({"lot": "NOPE", "property": "DoughTemperature", "value": 1}, "lot"),
            ({"lot": dough, "property": "Colour", "value": 1}, "property"),
            ({"lot": dough, "property": "DoughTemperature", "value": 1, "unit": "K"}, "unit"),
        ]:
            r = await sup.post("/api/v1/quality/results", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["errors"][0]["field"] == field
        bad = await sup.post(
            "/api/v1/quality/results",
            json={"lot": dough, "property": "DoughTemperature", "value": 31.5},
        )
        assert bad.status_code == 201, bad.text
        out = bad.json()
        assert out["passed"] is False
        assert out["recorded_by"] != "system"
    assert rows(
        line.sessions, "SELECT disposition FROM material_lot WHERE external_id = :l", l=dough
    ) == [("Restricted",)]
    assert out["nonconformance"] == f"NC-{dough}-1"
    actions = [a for a, _, _ in audit_of(line.sessions, dough)]
    assert "test_result.recorded" in actions
    assert "lot.disposition" in actions
    async with client(line, "auditor") as aud:
        page = (
            await aud.get(
                "/api/v1/quality/nonconformances",
                params={"state": "Open", "product": "DOUGH-ROLL", "work_unit": "WU-MIXER-1"},
            )
        ).json()
        assert isinstance(page["total"], int)
        naive = await aud.get("/api/v1/quality/yield", params={"since": "2026-01-01T00:00:00"})
        assert naive.status_code == 400  # a time without its zone is refused, not guessed
        assert naive.headers["content-type"].startswith("application/problem+json")
        assert "since" in naive.text


async def test_a_restricted_lot_is_never_consumed(line: Stack) -> None:
    sessions = line.sessions
    number = f"R-{uuid.uuid4().hex[:6]}"
    with sessions() as s:
        order, _ = create_order(
            s,
            ProductionOrderIn(
                order_number=number,
                product="BREAD-WHITE",
                quantity=10,
                unit="ea",
                due=datetime.now(UTC) + timedelta(hours=1),
                priority=1,
            ),
        )
        job = execution.plan_order(s, order.id)[0]
    flour = ["LOT-FLOUR-0001", "LOT-FLOUR-0002", "LOT-FLOUR-0003"]

    def flour_lots() -> list[str]:
        with sessions() as s:
            _, plc = execution.prepare_job(s, job)
        return [
            m.lot_id for m in plc.material_requirements if m.material_definition_id == "FLOUR-WHEAT"
        ]

    def restrict(*lots: str, disposition: str = LotDisposition.RESTRICTED) -> None:
        with sessions() as s:
            s.execute(
                update(MaterialLot)
                .where(MaterialLot.external_id.in_(lots))
                .values(disposition=disposition)
            )
            s.commit()

    try:
        first = flour_lots()
        assert len(first) == 1
        assert first[0] in flour
        restrict(first[0])
        # Refused with a reason and swapped for another Released lot.
        second = flour_lots()
        assert second[0] != first[0]
        assert second[0] in flour
        refused = [e for e in audit_of(sessions, job) if e[0] == "job_order.lot_refused"]
        assert refused
        assert f"lot {first[0]} of FLOUR-WHEAT is Restricted" in refused[0][2]
        restrict(*flour, disposition=LotDisposition.REJECTED)
        with sessions() as s:
            target, _plc = execution.prepare_job(s, job)
        # None left: it waits, saying why (the workflow shows it on the work order).
        assert target.waiting_for.startswith("Waiting for material: lot ")
        assert "is Rejected" in target.waiting_for
    finally:
        restrict(*flour, disposition=LotDisposition.RELEASED)


def test_yield_of_a_hand_built_history(pg_sessions: sessionmaker[Session]) -> None:
    """Four lots of one product on one unit: 10 good first pass, 20 failed then released,
    30 failed then scrapped, 5 reworked (not first pass): FPY 10/60, scrap 30/65."""
    tag = uuid.uuid4().hex[:6]
    day = datetime(2026, 3, 2, 12, tzinfo=UTC)
    with pg_sessions() as s:
        s.execute(text("SELECT 1"))
        product = MaterialDefinition(external_id=f"P-{tag}", unit="kg")
        unit = Equipment(external_id=f"U-{tag}", equipment_level="WorkUnit")
        s.add_all([product, unit])
        s.flush()
        spec = TestSpecification(
            external_id=f"TS-{tag}",
            material_definition_id=product.id,
            property_name="Weight",
            low=1,
            high=2,
        )
        s.add(spec)
        s.flush()
        jobs = _hand_built(s, tag, product, unit, spec, day)
        s.commit()
    with pg_sessions() as s:
        [row] = quality.yield_report(s, product=f"P-{tag}", period="day")
        assert (row.work_unit, row.period) == (f"U-{tag}", "2026-03-02")
        assert (row.produced, row.inspected, row.good_first_pass, row.scrapped) == (65, 60, 10, 30)
        assert row.first_pass_yield == float(round(Decimal(10) / Decimal(60), 6))
        assert row.scrap_ratio == float(round(Decimal(30) / Decimal(65), 6))
        assert quality.yield_report(s, product=f"P-{tag}", since=day + timedelta(days=1)) == []
        [week] = quality.yield_report(s, work_unit=f"U-{tag}", period="week")
        assert week.period == "2026-03-02"
        assert week.produced == 65
    assert len(jobs) == 4


def _hand_built(
    s: Session,
    tag: str,
    product: MaterialDefinition,
    unit: Equipment,
    spec: TestSpecification,
    day: datetime,
) -> list[JobOrder]:
    from mes.models import (  # the rows of an order's history, made by hand
        OperationsDefinition,
        OperationsSegment,
        ProcessSegment,
        SegmentRequirement,
        WorkMaster,
    )

    wm = WorkMaster(external_id=f"WM-{tag}")
    ps = ProcessSegment(external_id=f"PS-{tag}")
    s.add_all([wm, ps])
    s.flush()
    od = OperationsDefinition(external_id=f"OD-{tag}", material_definition_id=product.id)
    s.add(od)
    s.flush()
    seg = OperationsSegment(
        operations_definition_id=od.id, external_id="S1", sequence=1, work_master_id=wm.id
    )
    s.add(seg)
    s.flush()
    order = OperationsRequest(
        external_id=f"O-{tag}",
        operations_definition_id=od.id,
        material_definition_id=product.id,
        quantity=Decimal(65),
        unit="kg",
        due=day,
        state="Completed",
        request_hash="x",
        workflow_id=f"order-O-{tag}",
    )
    s.add(order)
    s.flush()
    req = SegmentRequirement(
        operations_request_id=order.id,
        operations_segment_id=seg.id,
        sequence=1,
        quantity=Decimal(65),
        unit="kg",
        state="Completed",
    )
    s.add(req)
    s.flush()
    made: list[JobOrder] = []
    # (quantity, failed?, disposition, rework?)
    plan = [(10, False, None, False), (20, True, "release", False), (30, True, "scrap", False)]
    plan.append((5, False, None, True))
    for n, (qty, failed, decision, is_rework) in enumerate(plan, start=1):
        job = JobOrder(
            external_id=f"J-{tag}-{n}",
            segment_requirement_id=req.id,
            rework_of_id=made[0].id if is_rework else None,
            work_master_id=wm.id,
            equipment_id=unit.id,
            state="Completed",
        )
        s.add(job)
        s.flush()
        jr = JobResponse(
            external_id=f"J-{tag}-{n}-R", job_order_id=job.id, state="Completed", end_time=day
        )
        lot = MaterialLot(
            external_id=f"L-{tag}-{n}",
            material_definition_id=product.id,
            quantity=Decimal(qty),
            unit="kg",
            disposition="Rejected" if decision == "scrap" else "Released",
        )
        s.add_all([jr, lot])
        s.flush()
        s.add(
            MaterialActual(
                job_response_id=jr.id,
                material_definition_id=product.id,
                material_lot_id=lot.id,
                use="Produced",
                quantity=Decimal(qty),
                unit="kg",
            )
        )
        s.add(
            TestResult(
                test_specification_id=spec.id,
                job_response_id=jr.id,
                material_lot_id=lot.id,
                value=3.0 if failed else 1.5,
                passed=not failed,
            )
        )
        if decision is not None:
            s.add(
                Nonconformance(
                    external_id=f"NC-{tag}-{n}",
                    state="Closed",
                    material_lot_id=lot.id,
                    job_order_id=job.id,
                    reason="Weight",
                    opened_by="system",
                    disposition=decision,
                )
            )
        made.append(job)
    s.flush()
    assert s.scalar(select(JobOrder).where(JobOrder.rework_of_id == made[0].id)) is not None
    return made
