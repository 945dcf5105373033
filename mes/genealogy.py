"""Lot genealogy: where a lot came from (backward) and where it went (forward).

The edges are ``material_lot_assembly`` rows (a component lot went into a lot within one job
response); both directions are one recursive SQL query over them, bounded by ``depth``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import literal, select
from sqlalchemy.orm import Session, aliased

from mes.errors import NotFound
from mes.models import (
    JobOrder,
    JobResponse,
    MaterialDefinition,
    MaterialLot,
    MaterialLotAssembly,
)
from mes.quantities import QuantityNumber

Direction = Literal["backward", "forward"]


class TraceLot(BaseModel):
    lot: str
    material: str
    quantity: QuantityNumber = Field(description="Quantity on hand now")
    unit: str
    disposition: str
    depth: int = Field(description="Steps from the traced lot (0 is the lot itself)")


class TraceEdge(BaseModel):
    lot: str = Field(description="The lot that was made")
    component: str = Field(description="A lot that went into it")
    job_order: str = Field(description="The job order (JobOrderID) that made it")


class Trace(BaseModel):
    """A genealogy trace: the lots reached and the edges between them."""

    lot: str
    direction: Direction
    depth: int
    lots: list[TraceLot]
    edges: list[TraceEdge]


def trace(session: Session, lot_id: str, direction: Direction, depth: int = 10) -> Trace:
    """Follow the genealogy of ``lot_id`` up to ``depth`` steps in one direction."""
    root = session.scalar(select(MaterialLot).where(MaterialLot.external_id == lot_id))
    if root is None:
        raise NotFound("lot", lot_id)
    a = MaterialLotAssembly
    # backward: from a lot to its components; forward: from a component to what it went into.
    near, far = (a.material_lot_id, a.component_lot_id)
    if direction == "forward":
        near, far = far, near

    walk = (
        select(near.label("from_id"), far.label("to_id"), a.job_response_id, literal(1).label("d"))
        .where(near == root.id)
        .cte("walk", recursive=True)
    )
    step = aliased(MaterialLotAssembly)
    s_near, s_far = (step.material_lot_id, step.component_lot_id)
    if direction == "forward":
        s_near, s_far = s_far, s_near
    walk = walk.union_all(
        select(s_near, s_far, step.job_response_id, walk.c.d + 1).where(
            s_near == walk.c.to_id, walk.c.d < depth
        )
    )
    rows = session.execute(
        select(walk.c.from_id, walk.c.to_id, walk.c.d, JobOrder.external_id)
        .join(JobResponse, JobResponse.id == walk.c.job_response_id)
        .join(JobOrder, JobOrder.id == JobResponse.job_order_id)
    ).all()

    depth_of = {root.id: 0}
    for _from, to, d, _job in rows:
        depth_of[to] = min(d, depth_of.get(to, d))
    lots = {
        lot.id: (lot, material)
        for lot, material in session.execute(
            select(MaterialLot, MaterialDefinition)
            .join(MaterialDefinition, MaterialDefinition.id == MaterialLot.material_definition_id)
            .where(MaterialLot.id.in_(depth_of))
        )
    }
    edges = {}
    for from_id, to_id, _d, job in rows:
        made, component = (from_id, to_id) if direction == "backward" else (to_id, from_id)
        key = (made, component)
        edges[key] = TraceEdge(
            lot=lots[made][0].external_id, component=lots[component][0].external_id, job_order=job
        )
    return Trace(
        lot=lot_id,
        direction=direction,
        depth=depth,
        lots=[
            TraceLot(
                lot=lot.external_id,
                material=material.external_id,
                quantity=lot.quantity,
                unit=lot.unit,
                disposition=lot.disposition,
                depth=depth_of[lot_pk],
            )
            for lot_pk, (lot, material) in sorted(
                lots.items(), key=lambda kv: (depth_of[kv[0]], kv[1][0].external_id)
            )
        ],
        edges=sorted(edges.values(), key=lambda e: (e.lot, e.component)),
    )
