"""KPIs from what the machines and the orders really did (ISO 22400-2; OTD and OTIF).

OEE of a work unit over a period, from the collector's rows (``mes.collector``):

- PBT, planned busy time: the period within the work calendar's shifts, minus its planned
  downtime (the unit's calendar, else its nearest ancestor's; none: all of the period);
- APT, actual production time: the time the unit spent in PackML Execute (6);
- PQ, produced quantity, and SQ, scrap quantity: the sums of the processed and defective
  counter deltas stamped in the period; GQ, good quantity = PQ - SQ;
- PRU, ideal cycle time per unit: the fastest ``ideal_cycle_time_s`` the unit has for any work
  master (a unit running slower recipes shows that as a performance loss).

Availability = APT / PBT, Effectiveness (performance) = PRU x PQ / APT, Quality ratio =
GQ / PQ, OEE = their product (None where a denominator is 0). A line, area or site sums its
work units' elements (PRU x PQ summed, so PRU is their produced-weighted mean) before the
ratios. Downtime: the time in any state but Execute, by (state, stop reason), longest first.

Delivery: the orders due in the period. OTD = orders completed by their due date / orders
due; OTIF = completed on time with a good produced quantity (produced lots of the product not
Rejected) at least the ordered one / orders due. Lead time = completed_at - created_at of the
completed ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from mes.errors import NotFound, bad_parameter, invalid
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
    MaterialUse,
    OperationsRequest,
    SegmentRequirement,
    WorkMasterEquipment,
)
from mes.quantities import QuantityNumber
from mes.states import OPEN_WORK_STATES, RequestState

PACKML_EXECUTE = 6
PACKML_STATE_NAMES = {
    0: "Undefined", 1: "Clearing", 2: "Stopped", 3: "Starting", 4: "Idle", 5: "Suspended",
    6: "Execute", 7: "Stopping", 8: "Aborting", 9: "Aborted", 10: "Holding", 11: "Held",
    12: "Unholding", 13: "Suspending", 14: "Unsuspending", 15: "Resetting", 16: "Completing",
    17: "Complete",
}  # fmt: skip
Bucket = Literal["hour", "shift", "day"]
#: A shift is 8 h from midnight UTC until a work calendar says otherwise.
BUCKET_LENGTH: dict[str, timedelta] = {
    "hour": timedelta(hours=1),
    "shift": timedelta(hours=8),
    "day": timedelta(days=1),
}
MAX_BUCKETS = 2000
TOP_DOWNTIME = 5


class DowntimeOut(BaseModel):
    state: str
    stop_reason: int | None
    seconds: float


class OeeElements(BaseModel):
    """The ISO 22400-2 elements and the ratios made from them (None: nothing to divide by)."""

    start: datetime
    end: datetime
    planned_busy_time_s: float
    actual_production_time_s: float
    produced_quantity: int
    good_quantity: int
    scrap_quantity: int
    ideal_cycle_time_s: float | None
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None


class OeeOut(BaseModel):
    equipment: str
    work_units: list[str]
    bucket: str | None
    total: OeeElements
    buckets: list[OeeElements]
    top_downtime: list[DowntimeOut]


@dataclass
class _Sums:
    pbt: float = 0.0
    apt: float = 0.0
    pq: int = 0
    sq: int = 0
    ideal: float = 0.0  # sum of PRU x PQ
    downtime: dict[tuple[int, int | None], float] = field(default_factory=dict)

    def elements(self, start: datetime, end: datetime) -> OeeElements:
        gq = self.pq - self.sq
        a = self.apt / self.pbt if self.pbt else None
        p = self.ideal / self.apt if self.apt else None
        q = gq / self.pq if self.pq else None
        return OeeElements(
            start=start,
            end=end,
            planned_busy_time_s=self.pbt,
            actual_production_time_s=self.apt,
            produced_quantity=self.pq,
            good_quantity=gq,
            scrap_quantity=self.sq,
            ideal_cycle_time_s=self.ideal / self.pq if self.pq else None,
            availability=a,
            performance=p,
            quality=q,
            oee=a * p * q if a is not None and p is not None and q is not None else None,
        )


def moment(name: str, text: str) -> datetime:
    """An ISO 8601 time with a time zone, read from the parameter ``name``."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad_parameter(name, "is not an ISO 8601 date-time") from None
    if value.tzinfo is None:
        raise bad_parameter(name, "needs a time zone (e.g. 2026-01-01T00:00:00Z)")
    return value


def _check_period(start: datetime, end: datetime) -> None:
    for name, value in (("from", start), ("to", end)):
        if value.tzinfo is None:
            raise bad_parameter(name, "needs a time zone (e.g. 2026-01-01T00:00:00Z)")
    if end <= start:
        raise invalid("to", "must be after from")


def _work_units(root: Equipment) -> list[Equipment]:
    """``root`` if it is a work unit, else the work units below it."""
    found = [e for e in _below(root) if e.equipment_level == EquipmentLevel.WORK_UNIT]
    return sorted(found, key=lambda e: e.external_id)


def _calendar_of(unit: Equipment) -> CalendarEntry | None:
    """The work calendar of ``unit``: its own, else its nearest ancestor's."""
    node: Equipment | None = unit
    while node is not None:
        if node.calendar is not None:
            return CalendarEntry.model_validate(node.calendar)
        node = node.parent
    return None


def _union(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def planned_seconds(calendar: CalendarEntry | None, w0: datetime, w1: datetime) -> float:
    """Planned busy time in [w0, w1): the calendar's shifts (none: all of it) minus its
    planned downtime; no calendar: all of it."""
    if calendar is None:
        return (w1 - w0).total_seconds()
    spans = [(w0, w1)]
    if calendar.shifts:
        spans = []
        day = w0.astimezone(UTC).date() - timedelta(days=1)
        while day <= w1.astimezone(UTC).date():
            for shift in calendar.shifts:
                a = datetime.combine(day, shift.start, UTC)
                b = datetime.combine(day, shift.end, UTC)
                b += timedelta(days=1) if b <= a else timedelta(0)
                spans.append((max(a, w0), min(b, w1)))
            day += timedelta(days=1)
    working = _union([(a, b) for a, b in spans if a < b])
    down = _union([(d.start, d.end) for d in calendar.planned_downtime])
    return sum(
        (b - a).total_seconds() - sum(_overlap(a, b, d0, d1) for d0, d1 in down) for a, b in working
    )


def _overlap(a0: datetime, a1: datetime, b0: datetime, b1: datetime) -> float:
    return max(0.0, (min(a1, b1) - max(a0, b0)).total_seconds())


def oee(
    session: Session,
    equipment: str,
    start: datetime,
    end: datetime,
    bucket: Bucket | None = None,
    now: datetime | None = None,
) -> OeeOut:
    """OEE and its elements for ``equipment`` (a work unit, or all those below it) over
    [start, end), in total and per bucket (consecutive hours, 8 h shifts or days from
    ``start``; the last one ends at ``end``)."""
    _check_period(start, end)
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    root = session.scalars(select(Equipment).where(Equipment.external_id == equipment)).first()
    if root is None:
        raise NotFound("equipment", equipment)
    units = _work_units(root)
    step = BUCKET_LENGTH[bucket] if bucket else end - start
    if (end - start) / step > MAX_BUCKETS:
        raise invalid("bucket", f"more than {MAX_BUCKETS} buckets in the period; take a longer one")
    edges = [start]
    while edges[-1] + step < end:
        edges.append(edges[-1] + step)
    windows = list(zip(edges, [*edges[1:], end], strict=True))
    now = now or datetime.now(UTC)
    total, per = _Sums(), [_Sums() for _ in windows]
    ids = [u.id for u in units]
    rows = session.execute(
        select(WorkMasterEquipment.equipment_id, func.min(WorkMasterEquipment.ideal_cycle_time_s))
        .where(WorkMasterEquipment.equipment_id.in_(ids))
        .group_by(WorkMasterEquipment.equipment_id)
    )
    ideal: dict[int, float] = {eid: seconds for eid, seconds in rows}  # noqa: C416
    intervals = session.scalars(
        select(EquipmentStateInterval).where(
            EquipmentStateInterval.equipment_id.in_(ids),
            EquipmentStateInterval.started_at < end,
            or_(EquipmentStateInterval.ended_at.is_(None), EquipmentStateInterval.ended_at > start),
        )
    ).all()
    counts = session.scalars(
        select(EquipmentCount).where(
            EquipmentCount.equipment_id.in_(ids),
            EquipmentCount.at >= start,
            EquipmentCount.at < end,
        )
    ).all()
    for unit in units:
        calendar = _calendar_of(unit)
        total.pbt += planned_seconds(calendar, start, end)
        for sums, (w0, w1) in zip(per, windows, strict=True):
            sums.pbt += planned_seconds(calendar, w0, w1)
    for iv in intervals:
        i1 = iv.ended_at or max(now, iv.started_at)
        for sums, (w0, w1) in [*zip(per, windows, strict=True), (total, (start, end))]:
            seconds = _overlap(iv.started_at, i1, w0, w1)
            if not seconds:
                continue
            if iv.state == PACKML_EXECUTE:
                sums.apt += seconds
            else:
                key = (iv.state, iv.stop_reason)
                sums.downtime[key] = sums.downtime.get(key, 0.0) + seconds
    for c in counts:
        pru = ideal.get(c.equipment_id, 0.0)
        hit = next(s for s, (w0, w1) in zip(per, windows, strict=True) if w0 <= c.at < w1)
        for sums in (hit, total):
            sums.pq += c.processed_delta
            sums.sq += c.defective_delta
            sums.ideal += pru * c.processed_delta
    top = sorted(total.downtime.items(), key=lambda kv: -kv[1])[:TOP_DOWNTIME]
    return OeeOut(
        equipment=equipment,
        work_units=[u.external_id for u in units],
        bucket=bucket,
        total=total.elements(start, end),
        buckets=[s.elements(w0, w1) for s, (w0, w1) in zip(per, windows, strict=True)]
        if bucket
        else [],
        top_downtime=[
            DowntimeOut(state=PACKML_STATE_NAMES.get(st, str(st)), stop_reason=r, seconds=sec)
            for (st, r), sec in top
        ],
    )


# --- delivery ---------------------------------------------------------------------------------


class LateOrderOut(BaseModel):
    order: str
    product: str
    due: datetime
    completed_at: datetime | None
    late_by_s: float


class DeliveryGroup(BaseModel):
    key: str | None
    orders_due: int
    on_time: int
    on_time_in_full: int
    otd: float | None
    otif: float | None
    lead_time_p50_s: float | None
    lead_time_p90_s: float | None
    late_orders: list[LateOrderOut]


class DeliveryOut(BaseModel):
    start: datetime
    end: datetime
    group_by: str | None
    total: DeliveryGroup
    groups: list[DeliveryGroup]


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _good_produced(session: Session, order: OperationsRequest) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(MaterialActual.quantity), 0))
        .join(JobResponse, MaterialActual.job_response_id == JobResponse.id)
        .join(JobOrder, JobResponse.job_order_id == JobOrder.id)
        .join(SegmentRequirement, JobOrder.segment_requirement_id == SegmentRequirement.id)
        .join(MaterialLot, MaterialActual.material_lot_id == MaterialLot.id)
        .where(
            SegmentRequirement.operations_request_id == order.id,
            MaterialActual.use == MaterialUse.PRODUCED,
            MaterialActual.material_definition_id == order.material_definition_id,
            MaterialLot.disposition != LotDisposition.REJECTED,
        )
    )
    return Decimal(total or 0)


def _group(
    session: Session, key: str | None, orders: list[OperationsRequest], now: datetime
) -> DeliveryGroup:
    on_time = in_full = 0
    late: list[LateOrderOut] = []
    leads: list[float] = []
    for o in orders:
        done = o.state == RequestState.COMPLETED and o.completed_at is not None
        if done and o.completed_at is not None:
            leads.append((o.completed_at - o.created_at).total_seconds())
        if done and o.completed_at is not None and o.completed_at <= o.due:
            on_time += 1
            if _good_produced(session, o) >= o.quantity:
                in_full += 1
        else:
            finished = o.completed_at if done else None
            late.append(
                LateOrderOut(
                    order=o.external_id,
                    product=o.product.external_id,
                    due=o.due,
                    completed_at=finished,
                    late_by_s=max(0.0, ((finished or now) - o.due).total_seconds()),
                )
            )
    n = len(orders)
    return DeliveryGroup(
        key=key,
        orders_due=n,
        on_time=on_time,
        on_time_in_full=in_full,
        otd=on_time / n if n else None,
        otif=in_full / n if n else None,
        lead_time_p50_s=percentile(leads, 50),
        lead_time_p90_s=percentile(leads, 90),
        late_orders=sorted(late, key=lambda x: -x.late_by_s),
    )


def delivery(
    session: Session,
    start: datetime,
    end: datetime,
    group_by: Literal["product"] | None = None,
    now: datetime | None = None,
) -> DeliveryOut:
    """OTD, OTIF, the late orders and lead times of the orders due in [start, end); an
    order not completed (or cancelled) counts as late by now - due."""
    _check_period(start, end)
    now = now or datetime.now(UTC)
    orders = list(
        session.scalars(
            select(OperationsRequest)
            .where(OperationsRequest.due >= start, OperationsRequest.due < end)
            .order_by(OperationsRequest.due, OperationsRequest.id)
        )
    )
    groups: dict[str, list[OperationsRequest]] = defaultdict(list)
    if group_by == "product":
        for o in orders:
            groups[o.product.external_id].append(o)
    return DeliveryOut(
        start=start,
        end=end,
        group_by=group_by,
        total=_group(session, None, orders, now),
        groups=[_group(session, k, v, now) for k, v in sorted(groups.items())],
    )


# --- throughput and work in progress ----------------------------------------------------------


class ProducedOut(BaseModel):
    material: str
    unit: str
    quantity: QuantityNumber
    per_hour: float


class LineThroughputOut(BaseModel):
    line: str
    work_units: list[str]
    work_orders_completed: int
    produced: list[ProducedOut]
    #: Open work orders on the line's work units now, by state (Waiting, Ready, Running, Held).
    wip: dict[str, int]
    wip_total: int


class ThroughputOut(BaseModel):
    start: datetime
    end: datetime
    lines: list[LineThroughputOut]


def throughput(
    session: Session, start: datetime, end: datetime, equipment: str | None = None
) -> ThroughputOut:
    """Per production line (all, or those at or below ``equipment``): the work orders its
    work units completed in [start, end), what they produced (per material and unit, and per
    hour of the period), and the work orders open on them now (WIP)."""
    _check_period(start, end)
    if equipment is None:
        lines = list(
            session.scalars(
                select(Equipment)
                .where(Equipment.equipment_level == EquipmentLevel.PRODUCTION_LINE)
                .order_by(Equipment.external_id)
            )
        )
    else:
        root = session.scalars(select(Equipment).where(Equipment.external_id == equipment)).first()
        if root is None:
            raise NotFound("equipment", equipment)
        lines = [e for e in _below(root) if e.equipment_level == EquipmentLevel.PRODUCTION_LINE]
    hours = (end - start).total_seconds() / 3600
    out: list[LineThroughputOut] = []
    for line in sorted(lines, key=lambda e: e.external_id):
        units = _work_units(line)
        ids = [u.id for u in units]
        completed = (
            session.scalar(
                select(func.count()).where(
                    JobOrder.equipment_id.in_(ids),
                    JobOrder.state == RequestState.COMPLETED,
                    JobOrder.ended_at >= start,
                    JobOrder.ended_at < end,
                )
            )
            or 0
        )
        produced = session.execute(
            select(
                MaterialDefinition.external_id,
                MaterialActual.unit,
                func.sum(MaterialActual.quantity),
            )
            .join(
                MaterialDefinition, MaterialActual.material_definition_id == MaterialDefinition.id
            )
            .join(JobResponse, MaterialActual.job_response_id == JobResponse.id)
            .join(JobOrder, JobResponse.job_order_id == JobOrder.id)
            .where(
                JobOrder.equipment_id.in_(ids),
                MaterialActual.use == MaterialUse.PRODUCED,
                JobOrder.ended_at >= start,
                JobOrder.ended_at < end,
            )
            .group_by(MaterialDefinition.external_id, MaterialActual.unit)
            .order_by(MaterialDefinition.external_id, MaterialActual.unit)
        )
        wip = {
            str(state): int(n)
            for state, n in session.execute(
                select(JobOrder.state, func.count())
                .where(JobOrder.equipment_id.in_(ids), JobOrder.state.in_(OPEN_WORK_STATES))
                .group_by(JobOrder.state)
            )
        }
        out.append(
            LineThroughputOut(
                line=line.external_id,
                work_units=[u.external_id for u in units],
                work_orders_completed=completed,
                produced=[
                    ProducedOut(
                        material=m,
                        unit=u,
                        quantity=Decimal(q),
                        per_hour=float(q) / hours,
                    )
                    for m, u, q in produced
                ],
                wip=wip,
                wip_total=sum(wip.values()),
            )
        )
    return ThroughputOut(start=start, end=end, lines=out)


def _below(root: Equipment) -> list[Equipment]:
    """``root`` and everything below it."""
    found, todo = [], [root]
    while todo:
        node = todo.pop()
        found.append(node)
        todo.extend(node.children)
    return found
