"""Work orders (ISA-95 job orders) as supervisors see and steer them.

What a supervisor may do to a work order depends on its state (``allowed_actions``); the
job's workflow enforces the same table in its update validators, so the API and the
workflow cannot disagree. The database changes here are the recorded half of each action:
the workflow calls them (through activities) after the PLC has done its half.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, Row, Select, case, func, select
from sqlalchemy.orm import Session, aliased, selectinload

from mes import audit, transitions
from mes.errors import NotFound, invalid
from mes.models import (
    AuditEvent,
    Equipment,
    EquipmentLevel,
    JobOrder,
    OperationsRequest,
    OperationsSegment,
    SegmentRequirement,
    WorkMaster,
    WorkMasterEquipment,
)
from mes.paging import FIRST_PAGE, AnySelect, Paging, SortKey, cut, page_query
from mes.states import OPEN_WORK_STATES, allowed_actions

WAITING, READY, RUNNING, HELD = OPEN_WORK_STATES


class HistoryEntry(BaseModel):
    at: datetime
    actor: str
    action: str
    before: dict[str, object] | None
    after: dict[str, object] | None
    reason: str | None


class WorkOrderOut(BaseModel):
    """A work order: an ISA-95 job order, what one work unit is told to do."""

    id: str = Field(description="JobOrderID, as the PLC knows it")
    production_order: str = Field(description="The ERP order number")
    production_order_id: int
    step: int
    segment: str
    work_master: str
    equipment: str
    work_center: str | None = Field(description="The line or work center of the equipment")
    priority: int
    state: str
    due: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    allowed_actions: list[str]
    links: dict[str, str]
    pending_on_machine: list[str] = Field(
        default_factory=list,
        description="Decided and answered, still to be carried out on the machine "
        "(e.g. a cancel while its PLC cannot be reached)",
    )


class WorkOrderDetail(WorkOrderOut):
    """A work order with its recorded history and, while it runs, its workflow's live state."""

    history: list[HistoryEntry]
    live: dict[str, object] | None = Field(
        default=None, description="The job workflow's own view (a Temporal query) while it runs"
    )


def _load() -> Select[JobOrder]:
    return select(JobOrder).options(
        selectinload(JobOrder.equipment).selectinload(Equipment.parent),
        selectinload(JobOrder.work_master),
        selectinload(JobOrder.segment_requirement).options(
            selectinload(SegmentRequirement.operations_request),
            selectinload(SegmentRequirement.operations_segment),
        ),
    )


_UNIT, _CENTER = aliased(Equipment), aliased(Equipment)


def _listed() -> AnySelect:
    """What a list shows of each work order, as plain columns of one statement (no objects
    to build: a list is read, never changed), the step and order joined for the filters and
    sorts."""
    return (
        select(
            JobOrder.id,
            JobOrder.external_id,
            OperationsRequest.external_id.label("production_order"),
            OperationsRequest.id.label("production_order_id"),
            SegmentRequirement.sequence,
            OperationsSegment.external_id.label("segment"),
            WorkMaster.external_id.label("work_master"),
            _UNIT.external_id.label("equipment"),
            _CENTER.external_id.label("work_center"),
            JobOrder.priority,
            JobOrder.state,
            OperationsRequest.due,
            JobOrder.dispatched_at,
            JobOrder.started_at,
            JobOrder.ended_at,
        )
        .select_from(JobOrder)
        .join(SegmentRequirement, JobOrder.segment_requirement_id == SegmentRequirement.id)
        .join(OperationsRequest, SegmentRequirement.operations_request_id == OperationsRequest.id)
        .join(OperationsSegment, SegmentRequirement.operations_segment_id == OperationsSegment.id)
        .join(WorkMaster, JobOrder.work_master_id == WorkMaster.id)
        .join(_UNIT, JobOrder.equipment_id == _UNIT.id)
        .outerjoin(_CENTER, _UNIT.parent_id == _CENTER.id)
    )


def _listed_out(row: Row[Any]) -> WorkOrderOut:
    return WorkOrderOut(
        id=row.external_id,
        production_order=row.production_order,
        production_order_id=row.production_order_id,
        step=row.sequence,
        segment=row.segment,
        work_master=row.work_master,
        equipment=row.equipment,
        work_center=row.work_center,
        priority=row.priority,
        state=row.state,
        due=row.due,
        dispatched_at=row.dispatched_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        allowed_actions=allowed_actions(row.state, row.dispatched_at is not None),
        links={"self": f"/api/v1/work-orders/{row.external_id}"},
    )


def work_order_out(job: JobOrder) -> WorkOrderOut:
    req = job.segment_requirement
    order = req.operations_request
    parent = job.equipment.parent
    return WorkOrderOut(
        id=job.external_id,
        production_order=order.external_id,
        production_order_id=order.id,
        step=req.sequence,
        segment=req.operations_segment.external_id,
        work_master=job.work_master.external_id,
        equipment=job.equipment.external_id,
        work_center=parent.external_id if parent else None,
        priority=job.priority,
        state=job.state,
        due=order.due,
        dispatched_at=job.dispatched_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        allowed_actions=allowed_actions(job.state, job.dispatched_at is not None),
        links={"self": f"/api/v1/work-orders/{job.external_id}"},
    )


def get_job(session: Session, job_order_id: str) -> JobOrder:
    job = session.scalar(_load().where(JobOrder.external_id == job_order_id))
    if job is None:
        raise NotFound("work order", job_order_id)
    return job


def work_order_detail(session: Session, job_order_id: str) -> WorkOrderDetail:
    """The work order with its audit history, oldest first."""
    job = get_job(session, job_order_id)
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.object_type == "job_order", AuditEvent.object_id == job_order_id)
        .order_by(AuditEvent.seq)
    )
    history = [
        HistoryEntry(
            at=e.occurred_at,
            actor=e.actor,
            action=e.action,
            before=e.before,
            after=e.after,
            reason=e.reason,
        )
        for e in events
    ]
    return WorkOrderDetail(**work_order_out(job).model_dump(), history=history)


def _equipment_below(session: Session, equipment_id: str) -> list[int]:
    """Ids of the equipment ``equipment_id`` and everything under it."""
    root = session.scalar(select(Equipment).where(Equipment.external_id == equipment_id))
    if root is None:
        raise NotFound("equipment", equipment_id)
    tree = select(Equipment.id).where(Equipment.id == root.id).cte("tree", recursive=True)
    tree = tree.union_all(select(Equipment.id).where(Equipment.parent_id == tree.c.id))
    return list(session.scalars(select(tree.c.id)))


def list_work_orders(
    session: Session,
    *,
    state: str | None = None,
    production_order: str | None = None,
    work_center: str | None = None,
    equipment: str | None = None,
    due_before: datetime | None = None,
    due_after: datetime | None = None,
    sort: str = "priority",
    paging: Paging = FIRST_PAGE,
) -> tuple[list[WorkOrderOut], int, str | None]:
    """Work orders matching the filters, how many match in all, and the cursor of the next
    page. Sorted by priority (highest first), then due, or by due, then priority; the job
    order's id breaks ties, so the order is total and a cursor continues it exactly."""
    on_job: list[ColumnElement[bool]] = []
    on_order: list[ColumnElement[bool]] = []
    if state is not None:
        on_job.append(JobOrder.state == state)
    if work_center is not None:
        on_job.append(JobOrder.equipment_id.in_(_equipment_below(session, work_center)))
    if equipment is not None:
        on_job.append(JobOrder.equipment_id.in_(_equipment_below(session, equipment)))
    if production_order is not None:
        on_order.append(OperationsRequest.external_id == production_order)
    if due_before is not None:
        on_order.append(OperationsRequest.due < due_before)
    if due_after is not None:
        on_order.append(OperationsRequest.due >= due_after)
    count = select(func.count()).select_from(JobOrder).where(*on_job)
    if on_order:  # every job order has its step and order: only their filters need the join
        count = (
            count.join(SegmentRequirement, JobOrder.segment_requirement_id == SegmentRequirement.id)
            .join(
                OperationsRequest, SegmentRequirement.operations_request_id == OperationsRequest.id
            )
            .where(*on_order)
        )
    total = session.scalar(count) or 0
    kind, keys = f"work-orders:{sort}", _SORTS[sort]
    types = (datetime, int, int) if sort == "due" else (int, datetime, int)
    q = page_query(
        _listed().where(*on_job, *on_order), kind=kind, keys=keys, types=types, paging=paging
    )
    rows, next_after = cut(
        session.execute(q).all(),
        kind=kind,
        paging=paging,
        key_of=lambda r: (r.due, r.priority, r.id) if sort == "due" else (r.priority, r.due, r.id),
    )
    return [_listed_out(r) for r in rows], total, next_after


_SORTS = {
    "priority": (
        SortKey(JobOrder.priority, descending=True),
        SortKey(OperationsRequest.due),
        SortKey(JobOrder.id),
    ),
    "due": (
        SortKey(OperationsRequest.due),
        SortKey(JobOrder.priority, descending=True),
        SortKey(JobOrder.id),
    ),
}


def dispatch_list(session: Session, work_center: str) -> list[WorkOrderOut]:
    """Queued and running work at a work center, in the order it will run.

    Running first; then jobs sent to their PLC (which starts the highest priority, then the
    earliest sent); then jobs waiting for their previous step, by priority; held work last.
    The job order's id breaks ties.
    """
    ids = _equipment_below(session, work_center)
    rank = case({RUNNING: 0, READY: 1, WAITING: 2, HELD: 3}, value=JobOrder.state, else_=4)
    rows = session.execute(
        _listed()
        .where(
            JobOrder.equipment_id.in_(ids),
            JobOrder.state.in_([WAITING, READY, RUNNING, HELD]),
        )
        .order_by(
            rank,
            JobOrder.priority.desc(),
            JobOrder.dispatched_at.asc().nulls_first(),
            JobOrder.id,
        )
    )
    return [_listed_out(r) for r in rows]


def set_state(
    session: Session, job_order_id: str, state: str, actor: str, reason: str | None
) -> None:
    """Record a supervisor-driven state change of a work order (hold, resume, cancel)."""
    transitions.change_state(session, get_job(session, job_order_id), state, actor, reason)
    session.commit()


def change(
    session: Session,
    job_order_id: str,
    actor: str,
    reason: str | None,
    priority: int | None = None,
    equipment: str | None = None,
) -> WorkOrderOut:
    """Change a work order's priority and/or target work unit (validated), with audit."""
    job = get_job(session, job_order_id)
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    if priority is not None and priority != job.priority:
        before["priority"], after["priority"] = job.priority, priority
        job.priority = priority
    if equipment is not None and equipment != job.equipment.external_id:
        target = session.scalar(select(Equipment).where(Equipment.external_id == equipment))
        if target is None:
            raise invalid("equipment", f"unknown equipment {equipment!r}")
        if target.equipment_level != EquipmentLevel.WORK_UNIT:
            raise invalid("equipment", f"{equipment} is a {target.equipment_level}, not a WorkUnit")
        capable = session.scalar(
            select(WorkMasterEquipment).where(
                WorkMasterEquipment.work_master_id == job.work_master_id,
                WorkMasterEquipment.equipment_id == target.id,
            )
        )
        if capable is None:
            raise invalid(
                "equipment", f"{equipment} cannot run work master {job.work_master.external_id}"
            )
        before["equipment"], after["equipment"] = job.equipment.external_id, equipment
        job.equipment_id = target.id
        job.equipment = target
    if after:
        audit.record(
            session,
            actor=actor,
            action="job_order.changed",
            object_type="job_order",
            object_id=job_order_id,
            before=before,
            after=after,
            reason=reason,
        )
        session.commit()
    return work_order_out(get_job(session, job_order_id))
