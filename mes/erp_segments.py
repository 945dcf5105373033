"""What an ERP asks of each routing step: its ``SegmentRequirement``s, mapped and checked.

Each of the ERP's segment requirements names a step of the product's routing: by operations
segment id (``OperationsSegmentID``, or its own ``ID`` when that is the step's id), else by
process segment (``ProcessSegmentID``, when exactly one step of the routing runs it). One
that names no step refuses the whole order. What it carries is kept on the order's segment
requirement when valid, and refused with a reason when not:

- quantity: the step's Produced quantity, in (or converted to) the step's unit;
- ``EarliestStartTime`` / ``LatestEndTime``: with a time zone, the start before the end;
- equipment (``EquipmentRequirement/EquipmentID``): a work unit able to run the step's work
  master; the step is planned on it;
- chosen lots (``MaterialRequirement/MaterialLotID``): an existing, Released lot of a
  material the step consumes, holding enough; the step consumes it.

The ERP's ids (the schedule's and each segment requirement's) are stored with the order so
the report back can name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from mes import units
from mes.models import (
    Equipment,
    LotDisposition,
    MaterialLot,
    MaterialUse,
    OperationsDefinition,
    OperationsSegment,
    ProcessSegment,
    SegmentRequirement,
)
from mes.quantities import QuantityNumber, exact, json_number, text

__all__ = ["ErpLotChoice", "ErpOrderData", "ErpSegmentData", "SegmentPlan", "plan_segments"]

Id = Annotated[str, Field(min_length=1, max_length=100)]


class ErpLotChoice(BaseModel):
    """A lot the ERP chose for a step (``MaterialRequirement/MaterialLotID``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    requirement_id: str
    material: str | None = None
    lot: Id
    quantity: QuantityNumber | None = None
    unit: str | None = None


class ErpSegmentData(BaseModel):
    """One ERP ``SegmentRequirement`` as received."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    process_segment_id: str | None = None
    operations_segment_id: str | None = None
    quantity: QuantityNumber | None = None
    unit: str | None = None
    earliest_start: datetime | None = None
    latest_end: datetime | None = None
    equipment: list[str] = []
    lots: list[ErpLotChoice] = []


class ErpOrderData(BaseModel):
    """The ERP's ids and per-step wishes for one order."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schedule_id: str | None = None
    segments: list[ErpSegmentData] = []


@dataclass
class SegmentPlan:
    """The checked data for one routing step."""

    step: OperationsSegment
    erp_id: str
    quantity: Decimal | None = None
    earliest_start: datetime | None = None
    latest_end: datetime | None = None
    equipment_id: int | None = None
    lots: list[dict[str, object]] = field(default_factory=list)


def _step_of(
    session: Session, routing: OperationsDefinition, seg: ErpSegmentData
) -> OperationsSegment | str:
    steps = list(routing.segments)
    for key in (seg.operations_segment_id, seg.id):
        for step in steps:
            if key is not None and step.external_id == key:
                return step
    if seg.process_segment_id is not None:
        process = session.scalar(
            select(ProcessSegment.id).where(ProcessSegment.external_id == seg.process_segment_id)
        )
        by_process = [
            s
            for s in steps
            if process is not None
            and process in (s.process_segment_id, s.work_master.process_segment_id)
        ]
        if len(by_process) == 1:
            return by_process[0]
        if len(by_process) > 1:
            return (
                f"ProcessSegmentID {seg.process_segment_id} names {len(by_process)} steps of "
                f"routing {routing.external_id}; give the OperationsSegmentID"
            )
    named = seg.operations_segment_id or seg.process_segment_id or seg.id
    return (
        f"names operation {named}, which routing {routing.external_id} does not have "
        f"(steps: {', '.join(s.external_id for s in steps)})"
    )


def plan_segments(
    session: Session,
    routing: OperationsDefinition,
    order_quantity: Decimal,
    segments: list[ErpSegmentData],
) -> tuple[list[SegmentPlan], list[str]]:
    """Map and check the ERP's segment requirements against the routing and stock.

    Returns the plans (one per mapped step) and every problem found, each naming the
    ``SegmentRequirement``; the order must be refused when there is any problem.
    """
    plans: list[SegmentPlan] = []
    problems: list[str] = []
    taken: dict[int, str] = {}
    for seg in segments:
        where = f"SegmentRequirement {seg.id}"
        found = _step_of(session, routing, seg)
        if isinstance(found, str):
            problems.append(f"{where}: {found}")
            continue
        step = found
        if step.id in taken:
            problems.append(
                f"{where}: maps to step {step.external_id}, as SegmentRequirement "
                f"{taken[step.id]} does"
            )
            continue
        taken[step.id] = seg.id
        plan = SegmentPlan(step=step, erp_id=seg.id)
        plans.append(plan)
        produced = [m for m in step.materials if m.use == MaterialUse.PRODUCED]
        per_unit = produced[0].quantity if produced else Decimal(1)
        default_quantity = per_unit * order_quantity
        if seg.quantity is not None:
            step_unit = produced[0].unit if produced else routing.product.unit
            amount = units.convert(seg.quantity, seg.unit or step_unit, step_unit)
            if amount is None:
                problems.append(
                    f"{where}: quantity {text(seg.quantity)} {seg.unit} is not in step "
                    f"{step.external_id}'s unit {step_unit!r}"
                )
            elif amount <= 0:
                problems.append(f"{where}: quantity {text(seg.quantity)} must be above 0")
            else:
                plan.quantity = exact(amount)
        scale = (plan.quantity or default_quantity) / default_quantity
        _times(seg, plan, where, problems)
        _equipment(session, seg, step, plan, where, problems)
        _lots(session, seg, step, order_quantity * scale, plan, where, problems)
    return plans, problems


def _times(seg: ErpSegmentData, plan: SegmentPlan, where: str, problems: list[str]) -> None:
    for name, value in (
        ("EarliestStartTime", seg.earliest_start),
        ("LatestEndTime", seg.latest_end),
    ):
        if value is not None and value.tzinfo is None:
            problems.append(f"{where}: {name} {value.isoformat()} has no time zone")
            return
    if seg.earliest_start and seg.latest_end and seg.earliest_start >= seg.latest_end:
        problems.append(
            f"{where}: EarliestStartTime {seg.earliest_start.isoformat()} is not before "
            f"LatestEndTime {seg.latest_end.isoformat()}"
        )
        return
    plan.earliest_start, plan.latest_end = seg.earliest_start, seg.latest_end


def _equipment(
    session: Session,
    seg: ErpSegmentData,
    step: OperationsSegment,
    plan: SegmentPlan,
    where: str,
    problems: list[str],
) -> None:
    able = {link.equipment_id for link in step.work_master.equipment}
    for equipment_id in seg.equipment:
        equipment = session.scalar(select(Equipment).where(Equipment.external_id == equipment_id))
        if equipment is None:
            problems.append(f"{where}: unknown equipment {equipment_id}")
        elif equipment.id not in able:
            problems.append(
                f"{where}: equipment {equipment_id} cannot run work master "
                f"{step.work_master.external_id} of step {step.external_id}"
            )
        elif plan.equipment_id is None:
            plan.equipment_id = equipment.id


def _lots(
    session: Session,
    seg: ErpSegmentData,
    step: OperationsSegment,
    order_quantity: Decimal,
    plan: SegmentPlan,
    where: str,
    problems: list[str],
) -> None:
    consumed = {
        m.material_definition.external_id: m
        for m in step.materials
        if m.use != MaterialUse.PRODUCED
    }
    for choice in seg.lots:
        c_where = f"{where}.MaterialRequirement {choice.requirement_id}: lot {choice.lot}"
        lot = session.scalar(select(MaterialLot).where(MaterialLot.external_id == choice.lot))
        if lot is None:
            problems.append(f"{c_where} is unknown")
            continue
        material = lot.material_definition.external_id
        if choice.material is not None and choice.material != material:
            problems.append(f"{c_where} is a lot of {material}, not of {choice.material}")
            continue
        spec = consumed.get(material)
        if spec is None:
            problems.append(
                f"{c_where} is a lot of {material}, which step {step.external_id} does not consume"
            )
            continue
        if lot.disposition != LotDisposition.RELEASED:
            problems.append(f"{c_where} is {lot.disposition}, not Released")
            continue
        if choice.quantity is not None:
            wanted = units.convert(
                choice.quantity,
                choice.unit or lot.unit,
                lot.unit,
                # The material's own units (1 BAG = 25 kg); the lot is in the material's unit.
                {
                    u: Decimal(str(f))
                    for u, f in (lot.material_definition.unit_conversions or {}).items()
                },
            )
            if wanted is None:
                problems.append(
                    f"{c_where}: quantity unit {choice.unit!r} is not the lot's unit {lot.unit!r}"
                )
                continue
            need = exact(wanted)
        else:
            need = exact(spec.quantity * order_quantity)
        if need > lot.quantity:
            problems.append(
                f"{c_where} holds {text(lot.quantity)} {lot.unit}, not enough for {text(need)}"
            )
            continue
        plan.lots.append(
            {"material": material, "lot": lot.external_id, "quantity": json_number(need)}
        )


def apply_plans(requirements: list[SegmentRequirement], plans: list[SegmentPlan]) -> None:
    """Store the checked plans on the order's segment requirements (one per step)."""
    by_step = {p.step.id: p for p in plans}
    for req in requirements:
        plan = by_step.get(req.operations_segment_id or req.operations_segment.id)
        if plan is None:
            continue
        req.erp_id = plan.erp_id
        if plan.quantity is not None:
            req.quantity = plan.quantity
        req.earliest_start = plan.earliest_start
        req.latest_end = plan.latest_end
        req.equipment_id = plan.equipment_id
        req.material_lots = plan.lots or None
