"""Master data routes (/api/v1/products, /api/v1/equipment, /api/v1/master-data): read and load."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.orm import Session

from mes import masterdata
from mes.api.security import ADMINISTER, READ_MASTER_DATA, allow, roles_note
from mes.auth import Principal
from mes.db import Database
from mes.errors import DomainError, FieldError

API = "/api/v1"


class MasterDataController(Controller):
    path = API
    tags = ["master data"]

    @get(
        "/products",
        guards=[allow(READ_MASTER_DATA)],
        summary="Products: material definitions that have a routing",
        description=roles_note(READ_MASTER_DATA),
    )
    async def products(self, db: NamedDependency[Database]) -> list[dict[str, Any]]:
        return await db.run(masterdata.list_products)

    @post(
        "/master-data",
        status_code=200,
        guards=[allow(ADMINISTER)],
        summary="Load master data (JSON, the plant file's shape; partial: may refer to stored)",
        description=(
            "Upserts by ISA-95 id; all of it or nothing; a bad entry is named with its reason "
            "(422). " + roles_note(ADMINISTER)
        ),
    )
    async def load(
        self,
        data: JSONBody[dict[str, Any]],
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
    ) -> dict[str, int]:
        actor = caller.actor
        try:
            plant = masterdata.parse_plant(data, partial=True)
        except masterdata.MasterDataError as e:
            raise _refused(e) from None

        def load(s: Session) -> masterdata.LoadReport:
            report = masterdata.load_plant(s, plant, partial=True, actor=actor)
            s.commit()
            return report

        try:
            report = await db.run(load)
        except masterdata.MasterDataError as e:
            raise _refused(e) from None
        return {
            "created": report.created,
            "updated": report.updated,
            "unchanged": report.unchanged,
            "deleted": report.deleted,
        }

    @get(
        "/equipment",
        guards=[allow(READ_MASTER_DATA)],
        summary="The equipment hierarchy, with each work unit's endpoint",
        description=roles_note(READ_MASTER_DATA),
    )
    async def equipment(self, db: NamedDependency[Database]) -> list[dict[str, Any]]:
        return await db.run(masterdata.equipment_tree)


def _refused(e: masterdata.MasterDataError) -> DomainError:
    return DomainError(
        title="Master data refused",
        detail="; ".join(e.problems),
        status=422,
        errors=[FieldError(p.split(":", 1)[0], p.split(":", 1)[-1].strip()) for p in e.problems],
    )
