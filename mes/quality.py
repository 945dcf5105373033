"""Quality operations (ISA-95): results by hand, nonconformances and their disposition, and
the yield of production.

The machine's results are evaluated when its job response is recorded
(``mes.execution.record_job_response``); a failure there, or in a result entered here, goes
through one gate, ``quality_hold``: the lot becomes Restricted and a
nonconformance is opened, in the same transaction as the results and their audit events.
A supervisor then disposes of it (``dispose``): release (the lot is Released again), rework
(a new job order on the same routing step reworks the lot) or scrap (the lot is Rejected).
A Restricted or Rejected lot is never consumed (``mes.execution.prepare_job``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, Field
from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from mes import audit, transitions
from mes.errors import Conflict, DomainError, FieldError, NotFound, invalid
from mes.models import (
    Disposition,
    Equipment,
    JobOrder,
    JobResponse,
    LotDisposition,
    MaterialActual,
    MaterialDefinition,
    MaterialLot,
    MaterialUse,
    Nonconformance,
    NonconformanceState,
    RequestState,
    TestResult,
    TestSpecification,
    utcnow,
)
from mes.paging import FIRST_PAGE, Paging, SortKey, fetch_page
from mes.quantities import json_number

#: What each disposition does to the lot and to the work order that made it.
_LOT_AFTER = {
    Disposition.RELEASE: LotDisposition.RELEASED,
    Disposition.REWORK: LotDisposition.RESTRICTED,  # until the rework job consumes it
    Disposition.SCRAP: LotDisposition.REJECTED,
}
_JOB_AFTER = {
    Disposition.RELEASE: RequestState.COMPLETED,
    Disposition.REWORK: RequestState.COMPLETED,  # its output goes on in the rework job
    Disposition.SCRAP: RequestState.ABORTED,
}


# --- what the API shows --------------------------------------------------------------------------


class TestResultOut(BaseModel):
    """One test result: what was measured, on which lot, against which specification, who
    recorded it and when."""

    __test__ = False  # not a pytest class, despite the name

    id: int
    specification: str
    property: str
    lot: str | None
    value: float
    unit: str
    low: float | None
    high: float | None
    target: float | None
    passed: bool
    source: str = Field(description="machine (the job response) or manual")
    recorded_by: str
    tested_at: datetime
    recorded_at: datetime
    nonconformance: str | None


class NonconformanceOut(BaseModel):
    """A lot found out of specification and what a supervisor decided about it."""

    id: str
    state: str = Field(description="Open until a supervisor disposes of it, then Closed")
    lot: str
    lot_disposition: str
    product: str = Field(description="The lot's material")
    work_order: str | None = Field(description="The work order (job order) that made the lot")
    work_unit: str | None
    reason: str
    opened_by: str
    opened_at: datetime
    disposition: str | None
    disposition_reason: str | None
    disposed_by: str | None
    disposed_at: datetime | None
    rework_work_order: str | None
    results: list[TestResultOut]
    links: dict[str, str]


class YieldRow(BaseModel):
    """First-pass yield and scrap ratio of one product on one work unit in one period.

    Quantities are of the produced lots. ``inspected``: made in a first pass (not a rework)
    and tested; ``good_first_pass``: of those, the ones no test ever failed;
    ``first_pass_yield`` = good_first_pass / inspected; ``scrapped``: made and later
    Rejected by a scrap disposition; ``scrap_ratio`` = scrapped / produced (ISO 22400 SQ/PQ).
    """

    product: str
    work_unit: str
    period: str = Field(description="The period's first day (ISO date), or 'all'")
    produced: float
    inspected: float
    good_first_pass: float
    scrapped: float
    first_pass_yield: float | None = Field(description="None when nothing was inspected")
    scrap_ratio: float | None = Field(description="None when nothing was produced")


# --- results by hand -----------------------------------------------------------------------------


@dataclass
class ManualResult:
    lot: str
    property: str
    value: float
    unit: str | None
    tested_at: datetime | None


def record_result(
    session: Session, entry: ManualResult, actor: str
) -> tuple[TestResultOut, list[str]]:
    """Record a result entered by hand against a lot, evaluated against the test
    specification of that property that applies to the lot (its material's, or the work
    master's that made it). Out of specification: the quality gate (``quality_hold``).

    Returns the result and, when it failed, the work orders on a PLC that are to consume
    the lot (the caller holds them: a running one pauses).
    """
    lot = session.scalar(
        select(MaterialLot)
        .where(MaterialLot.external_id == entry.lot)
        .options(selectinload(MaterialLot.material_definition))
    )
    if lot is None:
        raise invalid("lot", f"unknown lot {entry.lot!r}")
    job = _producing_job(session, lot)
    spec = session.scalar(
        select(TestSpecification)
        .where(
            TestSpecification.property_name == entry.property,
            or_(
                TestSpecification.material_definition_id == lot.material_definition_id,
                TestSpecification.work_master_id == (job.work_master_id if job else None),
            ),
        )
        .order_by(TestSpecification.id)
        .limit(1)
    )
    if spec is None:
        raise invalid(
            "property",
            f"no test specification of {entry.property!r} applies to lot {lot.external_id}",
        )
    if entry.unit is not None and entry.unit != spec.unit:
        raise invalid("unit", f"{spec.external_id} is in {spec.unit!r}, not {entry.unit!r}")
    now = utcnow()
    if entry.tested_at is not None and entry.tested_at > now:
        raise invalid("tested_at", "is in the future")
    result = store_result(
        session,
        spec,
        entry.value,
        spec.unit,
        lot=lot,
        job_response_id=None,
        tested_at=entry.tested_at or now,
        source="manual",
        recorded_by=actor,
        recorded_at=now,
    )
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="test_result.recorded",
        object_type="material_lot",
        object_id=lot.external_id,
        after={
            "specification": spec.external_id,
            "value": entry.value,
            "unit": spec.unit,
            "passed": result.passed,
        },
    )
    hold: list[str] = []
    if not result.passed:
        quality_hold(session, lot, job, [result], actor)
        hold = _consumers_on_plc(session, lot)
    session.commit()
    return _result_out(session, result), hold


def store_result(
    session: Session,
    spec: TestSpecification,
    value: float,
    unit: str,
    *,
    lot: MaterialLot | None,
    job_response_id: int | None,
    tested_at: datetime,
    source: str,
    recorded_by: str,
    recorded_at: datetime | None = None,
) -> TestResult:
    """Evaluate a measured value against a test specification and store the result (added
    to the session, not flushed). Both paths come here: the machine's job response
    (``mes.execution.record_job_response``, source "machine") and a result by hand
    (``record_result``, source "manual"). The caller audits and, when it failed, passes it
    to the quality gate (``quality_hold``)."""
    result = TestResult(
        test_specification=spec,
        job_response_id=job_response_id,
        material_lot_id=lot.id if lot else None,
        value=value,
        unit=unit,
        passed=spec.passes(value),
        tested_at=tested_at,
        source=source,
        recorded_by=recorded_by,
    )
    if recorded_at is not None:
        result.recorded_at = recorded_at
    session.add(result)
    return result


def _consumers_on_plc(session: Session, lot: MaterialLot) -> list[str]:
    """Work orders sent to their PLC (Ready or Running) whose material includes the lot."""
    jobs = session.scalars(
        select(JobOrder).where(JobOrder.state.in_((RequestState.READY, RequestState.RUNNING)))
    )
    return [
        j.external_id
        for j in jobs
        if any(
            r["lot_id"] == lot.external_id and r["use"] == MaterialUse.CONSUMED
            for r in j.material_requirements or []
        )
    ]


def _producing_job(session: Session, lot: MaterialLot) -> JobOrder | None:
    return session.scalar(
        select(JobOrder)
        .join(JobResponse, JobResponse.job_order_id == JobOrder.id)
        .join(MaterialActual, MaterialActual.job_response_id == JobResponse.id)
        .where(
            MaterialActual.material_lot_id == lot.id,
            MaterialActual.use == MaterialUse.PRODUCED,
        )
        .limit(1)
    )


# --- the quality gate ----------------------------------------------------------------------------


def quality_hold(
    session: Session,
    lot: MaterialLot,
    job: JobOrder | None,
    failed: list[TestResult],
    actor: str,
) -> Nonconformance:
    """Out of specification: the lot becomes Restricted and a nonconformance is opened (or
    the lot's open one gets the new failures), with their audit events, in the caller's
    transaction. Holding the work order is the caller's part."""
    specs = {
        s.id: s
        for s in session.scalars(
            select(TestSpecification).where(
                TestSpecification.id.in_({r.test_specification_id for r in failed})
            )
        )
    }
    what = "; ".join(
        f"{specs[r.test_specification_id].property_name} {r.value:g} {r.unit} outside "
        f"[{_limit(specs[r.test_specification_id].low)}, "
        f"{_limit(specs[r.test_specification_id].high)}]"
        for r in failed
    ).replace("  ", " ")
    nc = session.scalar(
        select(Nonconformance).where(
            Nonconformance.material_lot_id == lot.id,
            Nonconformance.state == NonconformanceState.OPEN,
        )
    )
    if nc is None:
        number = 1 + (
            session.scalar(select(func.count()).where(Nonconformance.material_lot_id == lot.id))
            or 0
        )
        nc = Nonconformance(
            external_id=f"NC-{lot.external_id}-{number}",
            state=NonconformanceState.OPEN,
            material_lot_id=lot.id,
            job_order_id=job.id if job else None,
            reason=what,
            opened_by=actor,
        )
        session.add(nc)
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="nonconformance.opened",
            object_type="nonconformance",
            object_id=nc.external_id,
            after={
                "state": nc.state,
                "lot": lot.external_id,
                "work_order": job.external_id if job else None,
            },
            reason=what,
        )
    else:
        audit.record(
            session,
            actor=actor,
            action="nonconformance.failed_again",
            object_type="nonconformance",
            object_id=nc.external_id,
            reason=what,
        )
    for r in failed:
        r.nonconformance_id = nc.id
    if lot.disposition != LotDisposition.RESTRICTED:
        before = lot.disposition
        set_disposition(session, lot, LotDisposition.RESTRICTED)
        audit.record(
            session,
            actor=actor,
            action="lot.disposition",
            object_type="material_lot",
            object_id=lot.external_id,
            before={"disposition": before},
            after={"disposition": LotDisposition.RESTRICTED},
            reason=f"{nc.external_id}: {what}",
        )
    return nc


def set_disposition(session: Session, lot: MaterialLot, disposition: str) -> None:
    """Set a lot's disposition by one UPDATE; the caller records its audit event
    (``lot.disposition``, with the reason), which the ORM hook's ``lot.updated`` would repeat
    without one."""
    session.execute(
        update(MaterialLot)
        .where(MaterialLot.id == lot.id)
        .values(disposition=disposition)
        .execution_options(synchronize_session=False)
    )
    set_committed_value(lot, "disposition", disposition)


def _limit(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def quality_hold_reason(session: Session, job_order_id: str) -> str:
    """Why the job order is Held on a nonconformance of its lot ("" when it is not)."""
    nc = session.scalar(
        select(Nonconformance)
        .join(JobOrder, Nonconformance.job_order_id == JobOrder.id)
        .where(
            JobOrder.external_id == job_order_id,
            JobOrder.state == RequestState.HELD,
            Nonconformance.state == NonconformanceState.OPEN,
        )
    )
    return "" if nc is None else f"quality hold: {nc.external_id}: {nc.reason}"


def _result_out(session: Session, r: TestResult) -> TestResultOut:
    spec = r.test_specification
    lot = session.get(MaterialLot, r.material_lot_id) if r.material_lot_id else None
    nc = session.get(Nonconformance, r.nonconformance_id) if r.nonconformance_id else None
    return TestResultOut(
        id=r.id,
        specification=spec.external_id,
        property=spec.property_name,
        lot=lot.external_id if lot else None,
        value=r.value,
        unit=r.unit,
        low=spec.low,
        high=spec.high,
        target=spec.target,
        passed=r.passed,
        source=r.source,
        recorded_by=r.recorded_by,
        tested_at=r.tested_at,
        recorded_at=r.recorded_at,
        nonconformance=nc.external_id if nc else None,
    )


# --- nonconformances -----------------------------------------------------------------------------


def _load() -> Select[Nonconformance]:
    return select(Nonconformance).options(
        selectinload(Nonconformance.material_lot).selectinload(MaterialLot.material_definition),
        selectinload(Nonconformance.job_order).selectinload(JobOrder.equipment),
        selectinload(Nonconformance.rework_job_order),
        selectinload(Nonconformance.results).selectinload(TestResult.test_specification),
    )


def get_nonconformance(session: Session, nc_id: str) -> Nonconformance:
    nc = session.scalar(_load().where(Nonconformance.external_id == nc_id))
    if nc is None:
        raise NotFound("nonconformance", nc_id)
    return nc


def nonconformance_out(session: Session, nc: Nonconformance) -> NonconformanceOut:
    job = nc.job_order
    return NonconformanceOut(
        id=nc.external_id,
        state=nc.state,
        lot=nc.material_lot.external_id,
        lot_disposition=nc.material_lot.disposition,
        product=nc.material_lot.material_definition.external_id,
        work_order=job.external_id if job else None,
        work_unit=job.equipment.external_id if job else None,
        reason=nc.reason,
        opened_by=nc.opened_by,
        opened_at=nc.opened_at,
        disposition=nc.disposition,
        disposition_reason=nc.disposition_reason,
        disposed_by=nc.disposed_by,
        disposed_at=nc.disposed_at,
        rework_work_order=nc.rework_job_order.external_id if nc.rework_job_order else None,
        results=[_result_out(session, r) for r in nc.results],
        links={"self": f"/api/v1/quality/nonconformances/{nc.external_id}"},
    )


def list_nonconformances(
    session: Session,
    state: str | None = None,
    product: str | None = None,
    work_unit: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    paging: Paging = FIRST_PAGE,
) -> tuple[list[NonconformanceOut], int, str | None]:
    """Nonconformances, newest first (the newest id first among those opened at the same
    instant), filtered by state, product (the lot's material), work unit (that made the lot)
    and the period they were opened in ([since, until)); how many match in all, and the
    cursor of the next page."""
    q = _load()
    if state is not None:
        q = q.where(Nonconformance.state == state)
    if product is not None:
        q = (
            q.join(MaterialLot, Nonconformance.material_lot_id == MaterialLot.id)
            .join(MaterialDefinition, MaterialLot.material_definition_id == MaterialDefinition.id)
            .where(MaterialDefinition.external_id == product)
        )
    if work_unit is not None:
        q = (
            q.join(JobOrder, Nonconformance.job_order_id == JobOrder.id)
            .join(Equipment, JobOrder.equipment_id == Equipment.id)
            .where(Equipment.external_id == work_unit)
        )
    if since is not None:
        q = q.where(Nonconformance.opened_at >= since)
    if until is not None:
        q = q.where(Nonconformance.opened_at < until)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows, next_after = fetch_page(
        session,
        q,
        kind="nonconformances",
        keys=(
            SortKey(Nonconformance.opened_at, descending=True),
            SortKey(Nonconformance.id, descending=True),
        ),
        types=(datetime, int),
        paging=paging,
        key_of=lambda nc: (nc.opened_at, nc.id),
    )
    return [nonconformance_out(session, nc) for nc in rows], total, next_after


def quality_held_job(session: Session, nc_id: str) -> str | None:
    """The work order that waits Held on this open nonconformance (its workflow carries out
    the disposition), or None when no work order waits on it."""
    nc = get_nonconformance(session, nc_id)
    job = nc.job_order
    if nc.state == NonconformanceState.OPEN and job is not None and job.state == RequestState.HELD:
        return job.external_id
    return None


@dataclass
class Disposed:
    """What a disposition did to the work order that made the lot."""

    job_state: str | None
    rework_job_order: str | None


def dispose(session: Session, nc_id: str, disposition: str, reason: str, actor: str) -> Disposed:
    """A supervisor's decision on an open nonconformance, with its reason, in one
    transaction with its audit events:

    - release: the lot is Released; the work order that made it is Completed;
    - rework: a new job order on the same routing step, on the same work unit and recipe,
      consumes the lot (the one consumption of a Restricted lot) and makes a new one; the
      work order is Completed;
    - scrap: the lot is Rejected; the work order is Aborted.

    Idempotent: the same decision again answers what the first did; another is a conflict.
    """
    nc = get_nonconformance(session, nc_id)
    if nc.state == NonconformanceState.CLOSED:
        if nc.disposition == disposition:
            earlier = nc.rework_job_order
            return Disposed(
                nc.job_order.state if nc.job_order else None,
                earlier.external_id if earlier else None,
            )
        raise Conflict(f"{nc.external_id} was disposed of already ({nc.disposition})")
    try:
        decision = Disposition(disposition)
    except ValueError as e:
        raise invalid("disposition", "one of release, rework, scrap") from e
    lot = nc.material_lot
    job = nc.job_order
    if decision == Disposition.REWORK and job is None:
        raise DomainError(
            title="Unprocessable disposition",
            detail=f"lot {lot.external_id} was not made here; there is no step to rework it on",
            status=422,
            errors=[FieldError("disposition", "rework needs the work order that made the lot")],
        )
    now = utcnow()
    nc.state = NonconformanceState.CLOSED
    nc.disposition = decision
    nc.disposition_reason = reason
    nc.disposed_by = actor
    nc.disposed_at = now
    rework: JobOrder | None = None
    if decision == Disposition.REWORK:
        assert job is not None
        rework = _rework_job(session, job, lot, actor, f"{nc.external_id}: {reason}")
        nc.rework_job_order_id = rework.id
    audit.record(
        session,
        actor=actor,
        action="nonconformance.disposed",
        object_type="nonconformance",
        object_id=nc.external_id,
        before={"state": NonconformanceState.OPEN},
        after={
            "state": nc.state,
            "disposition": decision,
            "lot": lot.external_id,
            "rework_work_order": rework.external_id if rework else None,
        },
        reason=reason,
    )
    after = _LOT_AFTER[decision]
    if lot.disposition != after:
        before = lot.disposition
        set_disposition(session, lot, after)
        audit.record(
            session,
            actor=actor,
            action="lot.disposition",
            object_type="material_lot",
            object_id=lot.external_id,
            before={"disposition": before},
            after={"disposition": after},
            reason=f"{nc.external_id} {decision}: {reason}",
        )
    job_state: str | None = None
    if job is not None:
        # A work order held on this lot goes on as decided; one that already ended stays.
        if job.state == RequestState.HELD:
            transitions.change_state(
                session, job, _JOB_AFTER[decision], actor, f"{nc.external_id} {decision}: {reason}"
            )
        job_state = job.state
    session.commit()
    return Disposed(job_state, rework.external_id if rework else None)


def _rework_job(
    session: Session, job: JobOrder, lot: MaterialLot, actor: str, reason: str
) -> JobOrder:
    """A new job order on the job's routing step that reworks ``lot`` into a new lot."""
    count = session.scalar(select(func.count()).where(JobOrder.rework_of_id == job.id)) or 0
    external_id = f"{job.external_id}-RW{count + 1}"
    material = lot.material_definition.external_id
    unit = lot.unit
    rework = JobOrder(
        external_id=external_id,
        segment_requirement_id=job.segment_requirement_id,
        rework_of_id=job.id,
        work_master_id=job.work_master_id,
        equipment_id=job.equipment_id,
        priority=job.priority,
        state=RequestState.WAITING,
        parameters=job.parameters,
        material_requirements=[
            {
                "material_definition_id": material,
                "use": str(use),
                "quantity": json_number(lot.quantity),
                "unit": unit,
                "lot_id": lot_id,
            }
            for use, lot_id in (
                (MaterialUse.CONSUMED, lot.external_id),
                (MaterialUse.PRODUCED, f"LOT-{external_id}"),
            )
        ],
    )
    session.add(rework)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="job_order.planned",
        object_type="job_order",
        object_id=external_id,
        after={"state": rework.state, "rework_of": job.external_id, "lot": lot.external_id},
        reason=reason,
    )
    return rework


# --- yield ---------------------------------------------------------------------------------------


def yield_report(
    session: Session,
    product: str | None = None,
    work_unit: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    period: str = "all",
) -> list[YieldRow]:
    """First-pass yield and scrap ratio per product, work unit and period (by the job
    response's end; ``period`` day, week (from Monday), month or all), over [since, until)."""
    ended = func.coalesce(JobResponse.end_time, JobResponse.recorded_at)
    q = (
        select(
            MaterialDefinition.external_id,
            Equipment.external_id,
            ended,
            MaterialActual.quantity,
            MaterialLot.id,
            MaterialLot.disposition,
            JobOrder.rework_of_id,
        )
        .join(JobResponse, MaterialActual.job_response_id == JobResponse.id)
        .join(JobOrder, JobResponse.job_order_id == JobOrder.id)
        .join(Equipment, JobOrder.equipment_id == Equipment.id)
        .join(MaterialLot, MaterialActual.material_lot_id == MaterialLot.id)
        .join(MaterialDefinition, MaterialActual.material_definition_id == MaterialDefinition.id)
        .where(MaterialActual.use == MaterialUse.PRODUCED)
    )
    if product is not None:
        q = q.where(MaterialDefinition.external_id == product)
    if work_unit is not None:
        q = q.where(Equipment.external_id == work_unit)
    if since is not None:
        q = q.where(ended >= since)
    if until is not None:
        q = q.where(ended < until)
    rows = session.execute(q).all()
    lot_ids = {r[4] for r in rows}
    tested = set(
        session.scalars(
            select(TestResult.material_lot_id).where(TestResult.material_lot_id.in_(lot_ids))
        )
    )
    failed = set(
        session.scalars(
            select(TestResult.material_lot_id).where(
                TestResult.material_lot_id.in_(lot_ids), TestResult.passed.is_(False)
            )
        )
    )
    scrapped = set(
        session.scalars(
            select(Nonconformance.material_lot_id).where(
                Nonconformance.material_lot_id.in_(lot_ids),
                Nonconformance.disposition == Disposition.SCRAP,
            )
        )
    )
    sums: dict[tuple[str, str, str], list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 4)
    for material, unit, at, quantity, lot_id, _, rework_of in rows:
        key = (material, unit, _period(at, period))
        acc = sums[key]
        acc[0] += quantity
        if rework_of is None and lot_id in tested:
            acc[1] += quantity
            if lot_id not in failed:
                acc[2] += quantity
        if lot_id in scrapped:
            acc[3] += quantity
    return [
        YieldRow(
            product=material,
            work_unit=unit,
            period=when,
            produced=json_number(pq),
            inspected=json_number(insp),
            good_first_pass=json_number(good),
            scrapped=json_number(sq),
            first_pass_yield=_ratio(good, insp),
            scrap_ratio=_ratio(sq, pq),
        )
        for (material, unit, when), (pq, insp, good, sq) in sorted(sums.items())
    ]


def _period(at: datetime, period: str) -> str:
    day = at.date()
    if period == "day":
        return day.isoformat()
    if period == "week":
        return day.fromordinal(day.toordinal() - day.weekday()).isoformat()
    if period == "month":
        return day.replace(day=1).isoformat()
    return "all"


def _ratio(part: Decimal, whole: Decimal) -> float | None:
    return None if whole == 0 else json_number((part / whole).quantize(Decimal("0.000001")))
