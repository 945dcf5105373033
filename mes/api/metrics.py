"""``GET /metrics``: operations metrics in the Prometheus text format (``mes.metrics``)."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler

from mes import metrics
from mes.db import Database


def metrics_route(public: bool) -> HTTPRouteHandler:
    """The route; with ``public`` (``MES_METRICS_PUBLIC=1``) it needs no token, else a token
    of any role."""

    @get(
        "/metrics",
        summary="Operations metrics (Prometheus text format)",
        description=(
            "Orders by state and in flight, open work orders, dispatch latency, PLC round "
            "trips and errors, ERP callback backlog, workflows not started and failed. Needs "
            "a token of any role, unless the server runs with MES_METRICS_PUBLIC=1."
        ),
        tags=["operations"],
        media_type=metrics.CONTENT_TYPE,
        opt={"exclude_from_auth": public},
        security=[] if public else None,
    )
    async def get_metrics(db: NamedDependency[Database]) -> Response[bytes]:
        families = await db.run(metrics.database_families)
        return Response(metrics.exposition(families), media_type=metrics.CONTENT_TYPE)

    return get_metrics
