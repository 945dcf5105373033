"""Read views of the stored master data for the API: products and the equipment tree."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from mes.models import (
    Equipment,
    EquipmentLevel,
    OperationsDefinition,
    OperationsSegment,
    WorkMaster,
    WorkMasterEquipment,
)


def list_products(session: Session) -> list[dict[str, Any]]:
    """Products that have a routing, with its steps and the work units able to run each.

    One entry per routing, sorted by product id then routing id::

        {"id", "description", "unit", "routing",
         "steps": [{"sequence", "id", "work_master", "work_units": [ids]}]}
    """
    routings = session.scalars(
        select(OperationsDefinition).options(
            selectinload(OperationsDefinition.product),
            selectinload(OperationsDefinition.segments)
            .selectinload(OperationsSegment.work_master)
            .selectinload(WorkMaster.equipment)
            .selectinload(WorkMasterEquipment.equipment),
        )
    ).all()
    products = [
        {
            "id": od.product.external_id,
            "description": od.product.description,
            "unit": od.product.unit,
            "routing": od.external_id,
            "steps": [
                {
                    "sequence": seg.sequence,
                    "id": seg.external_id,
                    "work_master": seg.work_master.external_id,
                    "work_units": sorted(
                        e.equipment.external_id for e in seg.work_master.equipment
                    ),
                }
                for seg in od.segments
            ],
        }
        for od in routings
    ]
    return sorted(products, key=lambda p: (p["id"], p["routing"]))


def equipment_tree(session: Session) -> list[dict[str, Any]]:
    """The equipment hierarchy from its roots, children sorted by id.

    Each node is ``{"id", "level", "description", "children"}``; work units also carry
    ``"endpoint": {"protocol", "url", "machine", "security"}`` (``None`` when they have
    none). The endpoint's settings (certificate files, user, where the password is) stay in.
    """
    rows = session.scalars(select(Equipment).options(selectinload(Equipment.endpoint))).all()
    # Built in memory from one query: walking ``children`` would query once per node.
    nodes: dict[int, dict[str, Any]] = {}
    for row in rows:
        node: dict[str, Any] = {
            "id": row.external_id,
            "level": row.equipment_level,
            "description": row.description,
            "children": [],
        }
        if row.equipment_level == EquipmentLevel.WORK_UNIT:
            ep = row.endpoint
            node["endpoint"] = (
                None
                if ep is None
                else {
                    "protocol": ep.protocol,
                    "url": ep.url,
                    "machine": ep.machine,
                    "security": ep.security,
                }
            )
        nodes[row.id] = node
    roots: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: r.external_id):
        parent = nodes.get(row.parent_id) if row.parent_id is not None else None
        (parent["children"] if parent is not None else roots).append(nodes[row.id])
    return roots
