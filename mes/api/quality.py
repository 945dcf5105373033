"""Quality operations (ISA-95): test results by hand, nonconformances and their
disposition, first-pass yield and scrap ratio."""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated, Literal

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from mes import quality
from mes.api.params import NEXT_AFTER, Key, Paging, Period, text_filter
from mes.api.security import READ_SHOP_FLOOR, STEER, allow, roles_note
from mes.auth import Principal
from mes.db import Database
from mes.models import NonconformanceState
from mes.steering import Steering

API = "/api/v1"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class TestResultIn(BaseModel):
    """A result measured by hand on a lot, against the test specification of ``property``
    that applies to the lot (its material's, or that of the work master that made it)."""

    __test__ = False  # not a pytest class, despite the name
    model_config = ConfigDict(extra="forbid")

    lot: Annotated[str, Field(min_length=1, max_length=100, description="The lot tested")]
    property: Annotated[
        str, Field(min_length=1, max_length=100, description="The property measured")
    ]
    value: Annotated[float, Field(strict=False), AfterValidator(_finite)]
    unit: Annotated[
        str | None,
        Field(max_length=20, description="The specification's unit (checked when given)"),
    ] = None
    tested_at: Annotated[
        AwareDatetime | None, Field(description="When it was measured (default: now)")
    ] = None


class DispositionIn(BaseModel):
    """A supervisor's decision on a nonconforming lot, and why (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid")

    disposition: Literal["release", "rework", "scrap"]
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class NonconformancePage(BaseModel):
    items: list[quality.NonconformanceOut]
    total: int
    limit: int
    offset: int
    next_after: str | None = Field(default=None, description=NEXT_AFTER)


class QualityController(Controller):
    path = f"{API}/quality"
    tags = ["quality"]

    @post(
        "/results",
        status_code=201,
        guards=[allow(STEER)],
        summary="Record a test result measured by hand on a lot",
        description=(
            "Evaluated against the lot's test specification of that property. Out of "
            "specification: the lot becomes Restricted, a nonconformance is opened (or the "
            "lot's open one gets the result) and work orders on a PLC that would consume the "
            "lot are held. " + roles_note(STEER)
        ),
    )
    async def record_result(
        self,
        data: JSONBody[TestResultIn],
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
    ) -> quality.TestResultOut:
        entry = quality.ManualResult(data.lot, data.property, data.value, data.unit, data.tested_at)
        return await steering.record_result(entry, caller.actor)

    @get(
        "/nonconformances",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="List nonconformances (lots found out of specification)",
        description="Newest first; filter by state, product, work unit and the period they "
        "were opened in ([since, until)). " + roles_note(READ_SHOP_FLOOR),
    )
    async def list_nonconformances(
        self,
        db: NamedDependency[Database],
        paging: NamedDependency[Paging],
        interval: NamedDependency[Period],
        nc_state: Annotated[
            NonconformanceState | None, QueryParameter(name="state", description="Open or Closed")
        ] = None,
        product: Annotated[str | None, text_filter("The lot's material")] = None,
        work_unit: Annotated[str | None, text_filter("The work unit that made the lot")] = None,
    ) -> NonconformancePage:
        items, total, next_after = await db.run(
            partial(
                quality.list_nonconformances,
                state=nc_state,
                product=product,
                work_unit=work_unit,
                since=interval.since,
                until=interval.until,
                paging=paging,
            )
        )
        return NonconformancePage(
            items=items,
            total=total,
            limit=paging.limit,
            offset=paging.offset,
            next_after=next_after,
        )

    @get(
        "/nonconformances/{nc_id:str}",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="One nonconformance with its test results",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def nonconformance(
        self, nc_id: Key, db: NamedDependency[Database]
    ) -> quality.NonconformanceOut:
        return await db.run(
            lambda s: quality.nonconformance_out(s, quality.get_nonconformance(s, nc_id))
        )

    @post(
        "/nonconformances/{nc_id:str}/disposition",
        status_code=200,
        guards=[allow(STEER)],
        summary="Dispose of a nonconformance: release, rework or scrap, with a reason",
        description=(
            "release: the lot is Released and the held work order completes; rework: a new "
            "work order on the same routing step reworks the lot into a new one; scrap: the "
            "lot is Rejected and the held work order is aborted (its production order ends "
            "Aborted). The same decision again answers the same; another is 409. "
            + roles_note(STEER)
        ),
    )
    async def dispose(
        self,
        nc_id: Key,
        data: JSONBody[DispositionIn],
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
    ) -> quality.NonconformanceOut:
        return await steering.dispose(nc_id, data.disposition, data.reason, caller.actor)

    @get(
        "/yield",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="First-pass yield and scrap ratio by product, work unit and period",
        description=(
            "Over the produced lots of job responses that ended in [since, until): inspected "
            "= first-pass (not rework) quantity that was tested, good_first_pass = of it, the "
            "lots no test failed; first_pass_yield = good_first_pass / inspected; scrap_ratio "
            "= quantity scrapped by a disposition / quantity produced. "
            + roles_note(READ_SHOP_FLOOR)
        ),
    )
    async def yield_report(
        self,
        db: NamedDependency[Database],
        interval: NamedDependency[Period],
        product: Annotated[str | None, text_filter("A produced material")] = None,
        work_unit: Annotated[str | None, text_filter("A work unit")] = None,
        period: Annotated[
            Literal["day", "week", "month", "all"], QueryParameter(description="Bucket size")
        ] = "all",
    ) -> list[quality.YieldRow]:
        return await db.run(
            partial(
                quality.yield_report,
                product=product,
                work_unit=work_unit,
                since=interval.since,
                until=interval.until,
                period=period,
            )
        )
