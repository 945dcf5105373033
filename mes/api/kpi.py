"""KPIs: OEE of the equipment (ISO 22400-2) and on-time delivery of the orders."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import QueryParameter

from mes import kpi
from mes.api.params import NO_NUL
from mes.api.problems import problem_response
from mes.api.security import READ_SHOP_FLOOR, allow, roles_note
from mes.db import Database

API = "/api/v1"

# Read as text and parsed in mes.kpi, so that an error names the parameter (``from``, not
# the handler's argument); the schema still says date-time.
FROM = QueryParameter(
    name="from", format=OpenAPIFormat.DATE_TIME, description="Period start, with time zone"
)
TO = QueryParameter(
    name="to", format=OpenAPIFormat.DATE_TIME, description="Period end (excluded), with zone"
)


class KpiController(Controller):
    path = f"{API}/kpi"
    tags = ["KPIs"]

    @get(
        "/oee",
        guards=[allow(READ_SHOP_FLOOR)],
        # Equipment that does not exist; a period that ends before it starts.
        responses={404: problem_response(404), 422: problem_response(422)},
        summary="OEE of a work unit, line, area or site, with its ISO 22400-2 elements",
        description=(
            "Availability = APT/PBT, performance = ideal cycle time x produced / APT, quality "
            "= good / produced, OEE = their product, over [from, to) in total and per bucket "
            "(hour, 8 h shift from midnight UTC, or day, from `from`); a line, area or site "
            "sums its work units' elements first. From the collector's PackML states and "
            "counters. Ratios are null when nothing divides them. " + roles_note(READ_SHOP_FLOOR)
        ),
    )
    async def oee(
        self,
        db: NamedDependency[Database],
        equipment: Annotated[
            str,
            QueryParameter(
                min_length=1, max_length=100, pattern=NO_NUL, description="Equipment ID"
            ),
        ],
        start: Annotated[str, FROM],
        end: Annotated[str, TO],
        bucket: Annotated[
            Literal["hour", "shift", "day"] | None,
            QueryParameter(description="Also per hour, shift or day"),
        ] = None,
    ) -> kpi.OeeOut:
        begin, finish = kpi.moment("from", start), kpi.moment("to", end)
        return await db.run(
            partial(kpi.oee, equipment=equipment, start=begin, end=finish, bucket=bucket)
        )

    @get(
        "/delivery",
        guards=[allow(READ_SHOP_FLOOR)],
        responses={422: problem_response(422)},  # a period that ends before it starts
        summary="On-time delivery (OTD), on time in full (OTIF), late orders and lead times",
        description=(
            "Over the production orders due in [from, to): OTD = completed by their due date "
            "/ due; OTIF = on time with good produced quantity >= ordered / due; the late ones "
            "(not completed yet: late by now - due); lead time (created to completed) p50 and "
            "p90 in seconds. " + roles_note(READ_SHOP_FLOOR)
        ),
    )
    async def delivery(
        self,
        db: NamedDependency[Database],
        start: Annotated[str, FROM],
        end: Annotated[str, TO],
        group_by: Annotated[
            Literal["product"] | None, QueryParameter(description="Also per product")
        ] = None,
    ) -> kpi.DeliveryOut:
        return await db.run(
            partial(
                kpi.delivery,
                start=kpi.moment("from", start),
                end=kpi.moment("to", end),
                group_by=group_by,
            )
        )

    @get(
        "/throughput",
        guards=[allow(READ_SHOP_FLOOR)],
        # Equipment that does not exist; a period that ends before it starts.
        responses={404: problem_response(404), 422: problem_response(422)},
        summary="Throughput and work in progress (WIP) per production line",
        description=(
            "Per production line (all, or those at or below `equipment`): the work orders its "
            "work units completed in [from, to), what they produced per material and unit (and "
            "per hour of the period), and the work orders open on them now, by state. "
            + roles_note(READ_SHOP_FLOOR)
        ),
    )
    async def throughput(
        self,
        db: NamedDependency[Database],
        start: Annotated[str, FROM],
        end: Annotated[str, TO],
        equipment: Annotated[
            str | None,
            QueryParameter(
                min_length=1, max_length=100, pattern=NO_NUL, description="A site, area or line"
            ),
        ] = None,
    ) -> kpi.ThroughputOut:
        begin, finish = kpi.moment("from", start), kpi.moment("to", end)
        return await db.run(partial(kpi.throughput, start=begin, end=finish, equipment=equipment))
