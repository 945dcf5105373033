"""Every write the workflow's activities make is idempotent: a retried activity (after a
crash or a lost reply) adds no second row and books no stock twice. Runs on PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mes import execution
from mes.machines import JobOrderData, JobResponseData, JobState, MaterialActualData, MeasuredValue
from mes.models import (
    JobOrder,
    MaterialActual,
    MaterialLot,
    MaterialLotAssembly,
    TestResult,
)
from mes.models import JobResponse as JobResponseRow
from mes.production_orders import ProductionOrderIn, create_order
from mes.quantities import exact

pytestmark = pytest.mark.postgres


def _order(
    sessions: sessionmaker[Session], quantity: float = 10, source: str | None = None
) -> tuple[int, str]:
    number = f"U-{uuid.uuid4().hex[:8]}"
    body = ProductionOrderIn(
        order_number=number,
        product="BREAD-WHITE",
        quantity=quantity,
        unit="ea",
        due=datetime.now(UTC) + timedelta(hours=1),
        priority=1,
    )
    with sessions() as s:
        order, created = create_order(s, body, source=source)
        assert created
        return order.id, number


def _machine_response(plc_order: JobOrderData, temp: float) -> JobResponseData:
    now = datetime.now(UTC)
    return JobResponseData(
        job_order_id=plc_order.job_order_id,
        state=JobState.ENDED,
        start_time=now - timedelta(seconds=5),
        end_time=now,
        material_actuals=[
            MaterialActualData(m.material_definition_id, m.use, m.quantity, m.unit, m.lot_id)
            for m in plc_order.material_requirements
        ],
        data=[MeasuredValue("DoughTemperature", temp, "degC")],
        processed_count=10,
    )


def _count(s: Session, model: type[object], *where: object) -> int:
    return s.scalar(select(func.count()).select_from(model).where(*where)) or 0  # type: ignore[arg-type]


def test_plan_prepare_record_complete_twice(plant_pg: sessionmaker[Session]) -> None:
    order_id, number = _order(plant_pg)
    with plant_pg() as s:
        first = execution.plan_order(s, order_id)
    with plant_pg() as s:
        assert execution.plan_order(s, order_id) == first
        assert first == [f"{number}-01", f"{number}-02"]
        assert _count(s, JobOrder, JobOrder.external_id.in_(first)) == 2

    with plant_pg() as s:
        target, plc_order = execution.prepare_job(s, first[0])
    with plant_pg() as s:
        assert execution.prepare_job(s, first[0]) == (target, plc_order)
    assert target.endpoint.protocol == "opcua"
    assert [p.name for p in plc_order.parameters] == ["MixSpeed", "MixTime"]
    consumed = [m for m in plc_order.material_requirements if m.use == "Consumed"]
    produced = [m for m in plc_order.material_requirements if m.use == "Produced"]
    assert consumed
    assert all(m.lot_id for m in consumed)
    assert [m.lot_id for m in produced] == [f"LOT-{first[0]}"]

    lot_id = consumed[0].lot_id
    with plant_pg() as s:
        stock_before = s.scalar(
            select(MaterialLot.quantity).where(MaterialLot.external_id == lot_id)
        )

    response = _machine_response(plc_order, temp=30.0)  # above the 22-28 °C limit
    for _ in range(2):
        with plant_pg() as s:
            state, lots = execution.record_job_response(s, response)
            # Out of specification: held on a nonconformance (the quality gate), twice alike.
            assert (state, lots) == ("Held", [f"LOT-{first[0]}"])

    with plant_pg() as s:
        job = s.scalars(select(JobOrder).where(JobOrder.external_id == first[0])).one()
        jr = s.scalars(select(JobResponseRow).where(JobResponseRow.job_order_id == job.id)).one()
        assert _count(s, MaterialActual, MaterialActual.job_response_id == jr.id) == len(
            plc_order.material_requirements
        )
        assert _count(s, MaterialLotAssembly, MaterialLotAssembly.job_response_id == jr.id) == len(
            consumed
        )
        result = s.scalars(select(TestResult).where(TestResult.job_response_id == jr.id)).one()
        assert result.passed is False  # out of spec is recorded as a failed test
        stock_after = s.scalar(
            select(MaterialLot.quantity).where(MaterialLot.external_id == lot_id)
        )
        assert stock_before is not None
        assert stock_after is not None
        assert stock_after == stock_before - exact(consumed[0].quantity)

    # The next step is to consume exactly the lot the first step produced; while that lot
    # is Restricted (and no other dough lot is Released) it waits.
    with plant_pg() as s:
        bake_target, bake = execution.prepare_job(s, first[1])
    dough = [m for m in bake.material_requirements if m.use == "Consumed"]
    assert [m.lot_id for m in dough] == [f"LOT-{first[0]}"]
    assert f"lot LOT-{first[0]} of " in bake_target.waiting_for
    assert "is Restricted" in bake_target.waiting_for

    with plant_pg() as s:
        assert execution.complete_order(s, order_id, "Completed") == ("Completed", False)
    with plant_pg() as s:
        assert execution.complete_order(s, order_id, "Aborted") == ("Completed", False)


def test_not_enough_stock_is_a_production_error(plant_pg: sessionmaker[Session]) -> None:
    order_id, _ = _order(plant_pg, quantity=10_000_000)
    with plant_pg() as s:
        ids = execution.plan_order(s, order_id)
    with plant_pg() as s, pytest.raises(execution.ProductionError, match="not enough"):
        execution.prepare_job(s, ids[0])


def test_an_order_runs_and_stops_changing_only_once_a_machine_starts(
    plant_pg: sessionmaker[Session],
) -> None:
    """Queued on a PLC is not running: the order stays Released and the ERP may still change
    it (the queued job's materials are worked out again); once a machine starts a job the
    order is Running and a change is refused."""
    from mes.models import OperationsRequest
    from mes.production_orders import change_order

    order_id, number = _order(plant_pg, quantity=10)
    with plant_pg() as s:
        first = execution.plan_order(s, order_id)
        execution.prepare_job(s, first[0])
        execution.mark_dispatched(s, first[0])
    with plant_pg() as s:
        order = s.get_one(OperationsRequest, order_id)
        assert (order.state, order.started_at) == ("Released", None)
        assert change_order(s, number, "erp", quantity=exact(12)) == (True, None)
        job = s.scalars(select(JobOrder).where(JobOrder.external_id == first[0])).one()
        assert job.material_requirements is None  # worked out again for 12 when re-sent
    with plant_pg() as s:
        _target, plc_order = execution.prepare_job(s, first[0])
        produced = [m for m in plc_order.material_requirements if m.use == "Produced"]
        assert produced
        execution.mark_running(s, first[0])
    with plant_pg() as s:
        order = s.get_one(OperationsRequest, order_id)
        assert order.state == "Running"
        assert order.started_at is not None
        accepted, reason = change_order(s, number, "erp", quantity=exact(14))
        assert not accepted
        assert reason is not None
        assert "has started" in reason
        assert s.get_one(OperationsRequest, order_id).quantity == exact(12)


def test_two_starts_of_one_order_at_once_report_running_once(
    plant_pg: sessionmaker[Session],
) -> None:
    """Two jobs of an order (or two attempts of one) starting at once: each read the order
    Released; the second to write finds it Running under the order's row lock and adds no
    second Running message to the ERP outbox (before, its INSERT broke the message's
    unique number and the activity failed into a retry)."""
    from mes.models import ErpClient, ErpMessage, OperationsRequest

    erp = f"erp-{uuid.uuid4().hex[:8]}"
    with plant_pg() as s:
        s.add(
            ErpClient(
                name=erp, callback_url="http://127.0.0.1:9/mes", format="json", signing_secret="k"
            )
        )
        s.commit()
    order_id, _number = _order(plant_pg, quantity=10, source=erp)
    with plant_pg() as s:
        first = execution.plan_order(s, order_id)[0]
        execution.prepare_job(s, first)
        execution.mark_dispatched(s, first)
    with plant_pg() as late:
        # The late writer has read the job and its order while the order was Released
        # (held here, as the writer holds them: the session keeps only referenced objects) ...
        read = execution._job(late, first)
        assert read.segment_requirement.operations_request.state == "Released"
        with plant_pg() as early:
            execution.mark_running(early, first)  # ... when the other start commits.
        execution.mark_running(late, first)
    with plant_pg() as s:
        assert s.get_one(OperationsRequest, order_id).state == "Running"
        states = s.scalars(
            select(ErpMessage.state)
            .where(ErpMessage.operations_request_id == order_id)
            .order_by(ErpMessage.seq)
        ).all()
        assert list(states).count("Running") == 1, states
