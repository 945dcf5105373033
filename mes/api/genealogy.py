"""Genealogy routes (/api/v1/genealogy): where a lot came from, where it went, and the
recall list of a suspect lot; as JSON, a graph, CSV or Graphviz DOT."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, MediaType, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from mes import genealogy
from mes.api.params import Key
from mes.api.security import READ_SHOP_FLOOR, allow, roles_note
from mes.db import Database

API = "/api/v1"

Format = Literal["json", "graph", "csv", "dot"]
CSV = "text/csv"
DOT = "text/vnd.graphviz"
#: Media types a client may ask for in Accept, and the format each gives.
_ACCEPTED: dict[str, Format] = {
    "application/json": "json",
    "text/csv": "csv",
    "text/vnd.graphviz": "dot",
}

Depth = Annotated[
    int,
    QueryParameter(ge=1, le=genealogy.MAX_DEPTH, description="Most steps to follow"),
]
Limit = Annotated[
    int,
    QueryParameter(
        ge=1,
        le=genealogy.MAX_LIMIT,
        description="Most lots to visit; a walk cut by it says `truncated_by: limit`",
    ),
]
FORMATS_NOTE = (
    "`format=json` (lots and edges), `graph` (nodes and edges, source → target the way "
    "material flowed), `csv` (text/csv: a row per lot, then per edge) or `dot` (Graphviz, "
    "text/vnd.graphviz); without `format`, the Accept header chooses (JSON by default). "
)


def _chosen(request: Request[Any, Any, Any], format: Format | None) -> Format:
    if format is not None:
        return format
    best = request.accept.best_match(list(_ACCEPTED), default="application/json")
    return _ACCEPTED.get(best or "application/json", "json")


async def _render(
    db: Database, lot: str, direction: genealogy.Direction, depth: int, limit: int, format: Format
) -> Response[Any]:
    if format in ("json", "graph"):
        shape: genealogy.Shape = "graph" if format == "graph" else "trace"
        body = await db.run(lambda s: genealogy.answer_json(s, lot, shape, direction, depth, limit))
        return _json(body)
    t = await db.run(lambda s: genealogy.trace(s, lot, direction, depth, limit))
    if format == "csv":
        return Response(genealogy.trace_csv(t), media_type=CSV)
    return Response(genealogy.trace_dot(t), media_type=DOT)


def _json(body: bytes) -> Response[Any]:
    """An answer already encoded (by the database): sent as it is."""
    return Response(body, media_type=MediaType.JSON)


class GenealogyController(Controller):
    path = f"{API}/genealogy/lots"
    tags = ["genealogy"]

    @get(
        "/{lot:str}/backward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot came from (its components, recursively)",
        description=FORMATS_NOTE + roles_note(READ_SHOP_FLOOR),
    )
    async def backward(
        self,
        request: Request[Any, Any, Any],
        lot: Key,
        db: NamedDependency[Database],
        depth: Depth = 10,
        limit: Limit = genealogy.DEFAULT_LIMIT,
        format: Annotated[
            Format | None, QueryParameter(description="json, graph, csv or dot; else Accept")
        ] = None,
    ) -> Response[genealogy.Trace | genealogy.Graph | str]:
        return await _render(db, lot, "backward", depth, limit, _chosen(request, format))

    @get(
        "/{lot:str}/forward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot went (what was made from it, recursively)",
        description=FORMATS_NOTE + roles_note(READ_SHOP_FLOOR),
    )
    async def forward(
        self,
        request: Request[Any, Any, Any],
        lot: Key,
        db: NamedDependency[Database],
        depth: Depth = 10,
        limit: Limit = genealogy.DEFAULT_LIMIT,
        format: Annotated[
            Format | None, QueryParameter(description="json, graph, csv or dot; else Accept")
        ] = None,
    ) -> Response[genealogy.Trace | genealogy.Graph | str]:
        return await _render(db, lot, "forward", depth, limit, _chosen(request, format))

    @get(
        "/{lot:str}/impact",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="The recall list of a suspect lot: every finished lot it went into",
        description=(
            "A finished lot is one made by a production order whose product is the lot's "
            "material, whether or not it was used further since; each comes with its "
            "production order, the ERP's order number and customer order, its disposition, "
            "status and remaining quantity. `format=json` or `csv` (text/csv), else the "
            "Accept header chooses. " + roles_note(READ_SHOP_FLOOR)
        ),
    )
    async def impact(
        self,
        request: Request[Any, Any, Any],
        lot: Key,
        db: NamedDependency[Database],
        depth: Depth = genealogy.MAX_DEPTH,
        limit: Limit = genealogy.DEFAULT_LIMIT,
        format: Annotated[
            Literal["json", "csv"] | None, QueryParameter(description="json or csv; else Accept")
        ] = None,
    ) -> Response[genealogy.Impact | str]:
        if _chosen(request, format) == "csv":
            i = await db.run(lambda s: genealogy.impact(s, lot, depth, limit))
            return Response(genealogy.impact_csv(i), media_type=CSV)
        body = await db.run(
            lambda s: genealogy.answer_json(s, lot, "impact", depth=depth, limit=limit)
        )
        return _json(body)
