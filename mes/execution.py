"""Execution of one production order, as its workflow's activities call it.

Each function is one database transaction and is idempotent by business key: the workflow's
activities may run twice (a retry after a crash or a lost reply) and the second run finds
the first run's rows and changes nothing. Unique constraints back this up when two runs race.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import cast

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from mes import audit, quality, transitions
from mes.genealogy import parameters_hash
from mes.machines import (
    Endpoint,
    JobOrderData,
    JobResponseData,
    JobState,
    MaterialRequirement,
    RecipeParameter,
)
from mes.models import (
    FINAL_STATES,
    Equipment,
    JobOrder,
    JobResponse,
    LotDisposition,
    MaterialActual,
    MaterialDefinition,
    MaterialLot,
    MaterialLotAssembly,
    MaterialUse,
    Nonconformance,
    OperationsRequest,
    OperationsSegment,
    RequestState,
    SegmentData,
    SegmentRequirement,
    TestResult,
    TestSpecification,
    WorkMaster,
    utcnow,
)
from mes.quantities import SCALE, Quantity, exact, json_number, text


class ProductionError(Exception):
    """Master data or stock cannot support the order (retrying will not help)."""


@dataclass
class Target:
    """Where a job order goes: the work unit's controller endpoint; and what the job must
    wait for before it goes ("" when nothing)."""

    endpoint: Endpoint
    waiting_for: str = ""


def job_order_id_for(order_number: str, sequence: int) -> str:
    """The JobOrderID of a routing step: readable and unique, so a PLC list names the order."""
    return f"{order_number}-{sequence:02d}"


def plan_order(session: Session, order_id: int) -> list[str]:
    """Create one job order per routing step (state Waiting), each on a capable work unit.

    The work unit is the one of the work master's equipment with the fewest open job orders
    (ties: the first listed). Returns the JobOrderIDs in routing order; none for an order
    already final (cancelled before its workflow started: the workflow only reports it).
    The order's row is locked (``FOR UPDATE``), so a change by the ERP comes before or
    after the planning, never in between.
    """
    order = session.get_one(
        OperationsRequest,
        order_id,
        with_for_update=True,
        populate_existing=True,
        options=[
            selectinload(OperationsRequest.segment_requirements).options(
                selectinload(SegmentRequirement.job_order),
                selectinload(SegmentRequirement.operations_segment)
                .selectinload(OperationsSegment.work_master)
                .selectinload(WorkMaster.equipment),
            )
        ],
    )
    ids: list[str] = []
    if order.state in FINAL_STATES:
        session.commit()
        return ids
    for req in order.segment_requirements:
        if req.job_order is not None:
            ids.append(req.job_order.external_id)
        else:
            work_master = req.operations_segment.work_master
            job = JobOrder(
                external_id=job_order_id_for(order.external_id, req.sequence),
                segment_requirement=req,
                work_master_id=work_master.id,
                # The work unit the ERP chose (checked when the order was accepted), else
                # the least loaded one able to run the work master.
                equipment_id=req.equipment_id or _least_loaded(session, work_master),
                priority=order.priority,
                state=RequestState.WAITING,
                parameters=[
                    {"name": p.name, "value": p.default, "unit": p.unit}
                    for p in work_master.parameters
                ],
            )
            session.add(job)
            audit.record(
                session,
                action="job_order.planned",
                object_type="job_order",
                object_id=job.external_id,
                after={"state": job.state, "order": order.external_id},
            )
            session.flush()
            ids.append(job.external_id)
    session.commit()
    return ids


def _least_loaded(session: Session, work_master: WorkMaster) -> int:
    if not work_master.equipment:
        raise ProductionError(f"work master {work_master.external_id} has no work unit")
    candidates = [link.equipment_id for link in work_master.equipment]
    open_jobs = dict(
        session.execute(
            select(JobOrder.equipment_id, func.count())
            .where(JobOrder.equipment_id.in_(candidates), JobOrder.state.not_in(FINAL_STATES))
            .group_by(JobOrder.equipment_id)
        ).all()
    )
    return min(candidates, key=lambda eq: open_jobs.get(eq, 0))


def prepare_job(session: Session, job_order_id: str) -> tuple[Target, JobOrderData]:
    """Fix the job's material requirements (once) and return what to send where (and what
    the job must wait for first, ``Target.waiting_for``).

    Consumed material that an earlier step of the same order produced comes from that step's
    produced lots; other consumed material is taken from stock, oldest released lot first.
    The produced lot id is chosen here so the genealogy is known before the machine runs.
    A lot that is not Released (a quality hold: Restricted, or Rejected) is never consumed:
    each time the job is prepared such a lot is swapped for Released lots of the same
    material, or, when there are none, the job waits and the answer says why.
    """
    job = _job(session, job_order_id)
    req = job.segment_requirement
    order = req.operations_request
    if job.material_requirements is None:
        job.material_requirements = _resolve_materials(session, job, req, order)
        session.commit()
    waiting_for = _refuse_unreleased_lots(session, job)
    endpoint = job.equipment.endpoint
    if endpoint is None:
        raise ProductionError(f"work unit {job.equipment.external_id} has no controller endpoint")
    plc_order = JobOrderData(
        job_order_id=job.external_id,
        work_master_id=job.work_master.external_id,
        description=f"{order.external_id} step {req.sequence} "
        f"({req.operations_segment.external_id})",
        priority=job.priority,
        parameters=[
            RecipeParameter(p["name"], float(p["value"]), p["unit"]) for p in job.parameters
        ],
        material_requirements=[MaterialRequirement(**m) for m in job.material_requirements],
        equipment_id=job.equipment.external_id,
    )
    target = Target(
        Endpoint(
            endpoint.protocol,
            endpoint.url,
            endpoint.machine,
            endpoint.security,
            dict(endpoint.settings),
        ),
        waiting_for,
    )
    return target, plc_order


def _refuse_unreleased_lots(session: Session, job: JobOrder) -> str:
    """Swap each consumed lot that is not Released for Released lots of its material
    (audited: ``job_order.lot_refused``); say what the job waits for when none is left.

    The one lot a rework job order may consume unreleased is the nonconforming lot its
    supervisor sent to rework.
    """
    requirements = list(job.material_requirements or [])
    consumed = {str(r["lot_id"]) for r in requirements if r["use"] == MaterialUse.CONSUMED}
    lots = {
        lot.external_id: lot
        for lot in session.scalars(
            select(MaterialLot)
            .where(MaterialLot.external_id.in_(consumed))
            .options(selectinload(MaterialLot.material_definition))
        )
    }
    reworked = set(
        session.scalars(
            select(MaterialLot.external_id)
            .join(Nonconformance, Nonconformance.material_lot_id == MaterialLot.id)
            .where(Nonconformance.rework_job_order_id == job.id)
        )
    )
    kept: list[dict[str, object]] = []
    waits: list[str] = []
    for r in requirements:
        lot = lots.get(str(r["lot_id"]))
        if (
            r["use"] != MaterialUse.CONSUMED
            or lot is None  # not in stock yet: the machine's report will say
            or lot.disposition == LotDisposition.RELEASED
            or lot.external_id in reworked
        ):
            kept.append(r)
            continue
        why = f"lot {lot.external_id} of {lot.material_definition.external_id} is {lot.disposition}"
        try:
            picks = _pick_lots(
                session,
                lot.material_definition,
                exact(cast(float, r["quantity"])),
                exclude=consumed,
            )
        except ProductionError as e:
            waits.append(f"{why} and {e}")
            kept.append(r)
            continue
        swapped = [
            _requirement(
                str(r["material_definition_id"]), str(r["use"]), q, str(r["unit"]), p.external_id
            )
            for p, q in picks
        ]
        kept += swapped
        audit.record(
            session,
            action="job_order.lot_refused",
            object_type="job_order",
            object_id=job.external_id,
            before={"lot": lot.external_id, "quantity": r["quantity"]},
            after={"lots": [{"lot": s["lot_id"], "quantity": s["quantity"]} for s in swapped]},
            reason=f"{why}: not consumed",
        )
    if kept != requirements:
        job.material_requirements = kept
        session.commit()
    return f"Waiting for material: {'; '.join(waits)}" if waits else ""


def _resolve_materials(
    session: Session, job: JobOrder, req: SegmentRequirement, order: OperationsRequest
) -> list[dict[str, object]]:
    earlier = {
        a.material_definition_id: a
        for a in produced_actuals(session, order.id, before_step=req.sequence)
    }
    result: list[dict[str, object]] = []
    specs = req.operations_segment.materials
    # The ERP may have asked this step for another quantity than the routing's share.
    produced = [s for s in specs if s.use == MaterialUse.PRODUCED]
    default = (produced[0].quantity if produced else Decimal(1)) * order.quantity
    scale = req.quantity / default if default > 0 else Decimal(1)
    chosen: dict[str, list[dict[str, object]]] = {}
    for choice in req.material_lots or []:
        chosen.setdefault(str(choice["material"]), []).append(choice)
    for spec in specs:
        need = spec.quantity * order.quantity * scale
        material = spec.material_definition.external_id
        if spec.use == MaterialUse.PRODUCED:
            result.append(
                _requirement(material, spec.use, need, spec.unit, f"LOT-{job.external_id}")
            )
        elif spec.material_definition_id in earlier:
            actual = earlier[spec.material_definition_id]
            lot_id = actual.material_lot.external_id
            result.append(_requirement(material, spec.use, actual.quantity, spec.unit, lot_id))
        else:
            # Lots the ERP chose come first; stock covers what they leave.
            for choice in chosen.get(material, []):
                qty = exact(cast(float, choice["quantity"]))
                result.append(_requirement(material, spec.use, qty, spec.unit, str(choice["lot"])))
                need -= qty
            if exact(need) > 0:
                for lot, qty in _pick_lots(session, spec.material_definition, need):
                    result.append(_requirement(material, spec.use, qty, spec.unit, lot.external_id))
    return result


def produced_actuals(
    session: Session, order_id: int, before_step: int | None = None
) -> list[MaterialActual]:
    """What the order's job orders produced (lots loaded), optionally only before a step."""
    q = (
        select(MaterialActual)
        .join(JobResponse, MaterialActual.job_response_id == JobResponse.id)
        .join(JobOrder, JobResponse.job_order_id == JobOrder.id)
        .join(SegmentRequirement, JobOrder.segment_requirement_id == SegmentRequirement.id)
        .where(
            SegmentRequirement.operations_request_id == order_id,
            MaterialActual.use == MaterialUse.PRODUCED,
        )
        .options(
            selectinload(MaterialActual.material_lot),
            selectinload(MaterialActual.material_definition),
        )
        .order_by(MaterialActual.id)
    )
    if before_step is not None:
        q = q.where(SegmentRequirement.sequence < before_step)
    return list(session.scalars(q))


def _requirement(material: str, use: str, qty: Decimal, unit: str, lot: str) -> dict[str, object]:
    # A JSON column: the quantity as a number (``mes.quantities``), rounded to the stored scale.
    return {
        "material_definition_id": material,
        "use": str(use),
        "quantity": json_number(exact(qty)),
        "unit": unit,
        "lot_id": lot,
    }


def _pick_lots(
    session: Session,
    material: MaterialDefinition,
    need: Decimal,
    exclude: Collection[str] = (),
) -> list[tuple[MaterialLot, Decimal]]:
    """Oldest released lots first until the need is covered (lots are not reserved in v1);
    never a lot of ``exclude`` (lot ids)."""
    lots = session.scalars(
        select(MaterialLot)
        .where(
            MaterialLot.material_definition_id == material.id,
            MaterialLot.disposition == LotDisposition.RELEASED,
            MaterialLot.quantity > 0,
            MaterialLot.external_id.not_in(exclude),
        )
        .order_by(MaterialLot.created_at, MaterialLot.id)
    ).all()
    picked: list[tuple[MaterialLot, Decimal]] = []
    left = exact(need)
    for lot in lots:
        if left <= 0:
            break
        take = min(lot.quantity, left)
        picked.append((lot, take))
        left -= take
    if left > 0:
        raise ProductionError(
            f"not enough released stock of {material.external_id}: {text(need)} needed, "
            f"{text(need - left)} available"
        )
    return picked


def _job(session: Session, job_order_id: str, lock: bool = False) -> JobOrder:
    """The job order with what its services need, in one statement: its work unit and
    endpoint, work master, step, order, operations segment and job response (the segment's
    materials load when first used: only the first preparation needs them). ``lock`` takes
    the job order's row lock (PostgreSQL) until the transaction ends, so two writers of the
    same job order take turns."""
    q = select(JobOrder).options(
        joinedload(JobOrder.equipment, innerjoin=True).joinedload(Equipment.endpoint),
        joinedload(JobOrder.work_master, innerjoin=True),
        joinedload(JobOrder.job_response),
        joinedload(JobOrder.segment_requirement, innerjoin=True).options(
            joinedload(SegmentRequirement.operations_request, innerjoin=True),
            joinedload(SegmentRequirement.operations_segment, innerjoin=True),
        ),
    )
    if lock:
        # Only the job order's row: the outer-joined rows cannot be locked (PostgreSQL).
        q = q.with_for_update(of=JobOrder)
    job = session.scalar(q.where(JobOrder.external_id == job_order_id))
    if job is None:
        raise ProductionError(f"unknown job order {job_order_id}")
    return job


def mark_dispatched(session: Session, job_order_id: str) -> None:
    """The PLC accepted the job (AllowedToStart): job Ready. The order is not Running yet:
    nothing runs until the machine starts the job (and the ERP may still change it)."""
    job = _job(session, job_order_id)
    if job.state == RequestState.WAITING:
        transitions.change_state(session, job, RequestState.READY)
    if job.dispatched_at is None:
        job.dispatched_at = utcnow()
    session.commit()


def mark_running(session: Session, job_order_id: str, at: datetime | None = None) -> None:
    """The machine started the job: the job, and its order if it was not yet, are Running."""
    job = _job(session, job_order_id)
    now = at or utcnow()
    if job.state in (RequestState.WAITING, RequestState.READY):
        transitions.change_state(session, job, RequestState.RUNNING)
    if job.started_at is None:
        job.started_at = now
    order = job.segment_requirement.operations_request
    if order.state == RequestState.RELEASED:
        # Two of its jobs, or two attempts of one, may start it at once: the order's row
        # lock lets one move it and shows the other that it moved (one Running report).
        session.refresh(order, with_for_update=True)
    if order.state == RequestState.RELEASED:
        transitions.change_state(session, order, RequestState.RUNNING)
    if order.started_at is None:
        order.started_at = now
    session.commit()


def record_job_response(session: Session, response: JobResponseData) -> tuple[str, list[str]]:
    """Store what the machine reported: material actuals and genealogy, measured values and
    test results; end the job order. Returns the job's ISA-95 state (Completed, Aborted, or
    Held when a test failed, until a supervisor disposes of the lot:
    ``mes.quality.quality_hold``) and its produced lots.

    Idempotent: a job order has one job response (unique); a second call returns the first
    one's state and lots. A second call racing the first waits on the job order's row lock
    (PostgreSQL) or fails on that constraint and rolls back whole, stock moves included.
    Stock moves are atomic SQL updates of locked lot rows, so concurrent jobs consuming one
    lot never lose a consumption.
    """
    # A second recording of the same response waits here for the first to end, then finds
    # its response (PostgreSQL); elsewhere the unique job order below turns it away.
    job = _job(session, response.job_order_id, lock=True)
    if job.job_response is not None:
        lots = _produced_lot_ids(job.job_response)
        if quality.quality_hold_reason(session, job.external_id):
            return RequestState.HELD, lots
        return job.job_response.state, lots
    state = RequestState.COMPLETED if response.state == JobState.ENDED else RequestState.ABORTED
    jr = JobResponse(
        external_id=f"{job.external_id}-R",
        job_order=job,
        state=state,
        start_time=response.start_time,
        end_time=response.end_time,
        processed_count=response.processed_count,
        defective_count=response.defective_count,
    )
    session.add(jr)
    materials = {
        m.external_id: m
        for m in session.scalars(
            select(MaterialDefinition).where(
                MaterialDefinition.external_id.in_(
                    {a.material_definition_id for a in response.material_actuals}
                )
            )
        )
    }
    # The job response row first, so a duplicate that got this far (SQLite) fails on it
    # before any stock moves.
    session.flush()
    # Lock the lots the job consumed, in one order for every writer (no deadlock between two
    # jobs consuming the same lots): their quantities below are the committed ones.
    locked = {
        lot.external_id: lot
        for lot in session.scalars(
            select(MaterialLot)
            .where(
                MaterialLot.external_id.in_(
                    {a.lot_id for a in response.material_actuals if a.use == MaterialUse.CONSUMED}
                )
            )
            .order_by(MaterialLot.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    produced: list[MaterialLot] = []
    consumed: list[tuple[MaterialLot, Decimal, str]] = []
    for actual in response.material_actuals:
        # The machine port carries floats (``mes.machines``): exact from here on.
        quantity = exact(actual.quantity)
        material = materials.get(actual.material_definition_id)
        if material is None:
            raise ProductionError(
                f"machine reported unknown material {actual.material_definition_id}"
            )
        if actual.use == MaterialUse.CONSUMED:
            lot = locked.get(actual.lot_id)
            if lot is None:
                raise ProductionError(f"machine reported consuming unknown lot {actual.lot_id}")
            _consume(session, lot, quantity, job.external_id)
            consumed.append((lot, quantity, actual.unit))
        else:
            lot = session.scalar(
                select(MaterialLot).where(MaterialLot.external_id == actual.lot_id)
            )
            if lot is None:
                lot = MaterialLot(
                    external_id=actual.lot_id,
                    material_definition_id=material.id,
                    quantity=quantity,
                    unit=actual.unit,
                )
                session.add(lot)
            lot.job_order_id = lot.job_order_id or job.id
            produced.append(lot)
        session.flush()
        jr.material_actuals.append(
            MaterialActual(
                material_definition_id=material.id,
                material_lot_id=lot.id,
                use=actual.use,
                quantity=quantity,
                unit=actual.unit,
            )
        )
    # ISA-95 genealogy: within one job response every consumed lot is a parent of every
    # produced lot; the edge carries what the job consumed of it. The lots show the recipe
    # as sent (its hash) and the work master's version.
    session.flush()
    for p in produced:
        for c, quantity, unit in consumed:
            session.add(
                MaterialLotAssembly(
                    material_lot_id=p.id,
                    component_lot_id=c.id,
                    job_response_id=jr.id,
                    quantity=quantity,
                    unit=unit,
                )
            )
    job.parameters_hash = parameters_hash(job.parameters)
    job.work_master_version = job.work_master.version
    failed = _test(session, job, response, produced)
    job.started_at = job.started_at or response.start_time
    job.ended_at = response.end_time or utcnow()
    reason = None
    if failed:
        # The quality gate: the lot is Restricted and a nonconformance opened; a job that
        # completed waits Held for a supervisor's disposition (an aborted one stays Aborted).
        nc = quality.quality_hold(session, failed[0][0], job, [r for _, r in failed], audit.SYSTEM)
        reason = f"{nc.external_id}: {nc.reason}"
        if state == RequestState.COMPLETED:
            state = RequestState.HELD
    transitions.change_state(session, job, state, reason=reason)
    session.commit()
    return state, [lot.external_id for lot in produced]


def _test(
    session: Session, job: JobOrder, response: JobResponseData, produced: list[MaterialLot]
) -> list[tuple[MaterialLot, TestResult]]:
    """Evaluate the measured values against the test specifications of the job's work
    master and of the produced materials; store a result for each. Returns the failed ones
    with their lot."""
    assert job.job_response is not None
    values = {v.name: v for v in response.data}
    for v in response.data:
        job.job_response.data.append(SegmentData(name=v.name, value=v.value, unit=v.unit))
    materials = {lot.material_definition_id for lot in produced}
    specs = session.scalars(
        select(TestSpecification)
        .where(
            or_(
                TestSpecification.work_master_id == job.work_master_id,
                TestSpecification.material_definition_id.in_(materials),
            )
        )
        .order_by(TestSpecification.id)
    ).all()
    failed: list[tuple[MaterialLot, TestResult]] = []
    for spec in specs:
        measured = values.get(spec.property_name)
        if measured is None:
            continue
        lot = next(
            (
                p
                for p in produced
                if spec.material_definition_id in (None, p.material_definition_id)
            ),
            None,
        )
        result = quality.store_result(
            session,
            spec,
            measured.value,
            measured.unit,
            lot=lot,
            job_response_id=job.job_response.id,
            tested_at=response.end_time or utcnow(),
            source="machine",
            recorded_by=f"plc:{job.equipment.external_id}",
        )
        if not result.passed and lot is not None:
            failed.append((lot, result))
    session.flush()
    return failed


def _consume(session: Session, lot: MaterialLot, quantity: Decimal, job_order_id: str) -> None:
    """Take ``quantity`` off a lot in one SQL statement (never below 0; at 0 it is Consumed)
    and audit the move. The arithmetic happens in the database, on the row's current value,
    so concurrent consumptions of one lot all count, whatever each session read before."""
    before = {"quantity": lot.quantity, "status": lot.status}
    # Rounded to the column's scale in SQL: a no-op on PostgreSQL (exact NUMERIC), and on
    # SQLite (float storage) it keeps binary error from piling up over many consumptions.
    left = func.round(MaterialLot.quantity - quantity, SCALE, type_=Quantity)
    row = session.execute(
        update(MaterialLot)
        .where(MaterialLot.id == lot.id)
        .values(
            quantity=case((left > 0, left), else_=Decimal(0)),
            status=case((left <= 0, "Consumed"), else_=MaterialLot.status),
        )
        .returning(MaterialLot.quantity, MaterialLot.status)
        .execution_options(synchronize_session=False)
    ).one()
    # The session's copy of the lot now shows the row as the update left it.
    set_committed_value(lot, "quantity", row.quantity)
    set_committed_value(lot, "status", row.status)
    audit.record(
        session,
        action="lot.consumed",
        object_type="material_lot",
        object_id=lot.external_id,
        before=before,
        after={"quantity": row.quantity, "status": row.status},
        reason=f"job order {job_order_id}",
    )


def _produced_lot_ids(jr: JobResponse) -> list[str]:
    return [
        a.material_lot.external_id for a in jr.material_actuals if a.use == MaterialUse.PRODUCED
    ]


def complete_order(session: Session, order_id: int, state: str) -> tuple[str, bool]:
    """End the order (Completed or Aborted); it is late if it ends after its due time.

    Returns the final state and the late flag.
    """
    order = session.get_one(OperationsRequest, order_id)
    if order.state not in FINAL_STATES:
        now = utcnow()
        order.completed_at = now
        order.late = order.late or now > order.due
        transitions.change_state(session, order, state)
        session.commit()
    return order.state, order.late
