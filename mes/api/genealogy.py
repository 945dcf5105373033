"""Genealogy routes (/api/v1/genealogy): where a lot came from and where it went."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from mes import genealogy
from mes.api.params import Key
from mes.api.security import READ_SHOP_FLOOR, allow, roles_note
from mes.db import Database

API = "/api/v1"


class GenealogyController(Controller):
    path = f"{API}/genealogy/lots"
    tags = ["genealogy"]

    @get(
        "/{lot:str}/backward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot came from (its components, recursively)",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def backward(
        self,
        lot: Key,
        db: NamedDependency[Database],
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await db.run(lambda s: genealogy.trace(s, lot, "backward", depth))

    @get(
        "/{lot:str}/forward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot went (what was made from it, recursively)",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def forward(
        self,
        lot: Key,
        db: NamedDependency[Database],
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await db.run(lambda s: genealogy.trace(s, lot, "forward", depth))
