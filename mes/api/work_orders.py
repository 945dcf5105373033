"""Work orders (ISA-95 job orders): see them, and steer them through their workflows."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from litestar import Controller, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict, Field

from mes import work_orders
from mes.api.params import NEXT_AFTER, Instant, Key, Paging, text_filter
from mes.api.problems import problem_response
from mes.api.production_orders import Reason
from mes.api.security import READ_SHOP_FLOOR, STEER, allow, roles_note
from mes.auth import Principal
from mes.db import Database
from mes.errors import DomainError, FieldError
from mes.states import Action, RequestState
from mes.steering import Steering
from workflows.types import WorkOrderCommand

API = "/api/v1"


class WorkOrderPage(BaseModel):
    items: list[work_orders.WorkOrderOut]
    total: int
    limit: int
    offset: int
    next_after: str | None = Field(default=None, description=NEXT_AFTER)


class WorkOrderChange(BaseModel):
    """A new priority and/or target work unit (another unit able to run its work master)."""

    model_config = ConfigDict(extra="forbid")
    priority: Annotated[int | None, Field(ge=0, le=1_000_000, strict=True)] = None
    equipment: Annotated[str | None, Field(min_length=1, max_length=100)] = None
    reason: Annotated[str | None, Field(max_length=500)] = None


class WorkOrderController(Controller):
    path = f"{API}/work-orders"
    tags = ["work orders"]

    @get(
        "/",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="List work orders (ISA-95 job orders)",
        description="Filter, sort by priority or due, paginate. " + roles_note(READ_SHOP_FLOOR),
        responses={404: problem_response(404)},  # a work center or unit that does not exist
    )
    async def list_work_orders(
        self,
        db: NamedDependency[Database],
        paging: NamedDependency[Paging],
        work_order_state: Annotated[
            RequestState | None, QueryParameter(name="state", description="Only in this state")
        ] = None,
        production_order: Annotated[str | None, text_filter("ERP order number")] = None,
        work_center: Annotated[
            str | None, text_filter("A line or work center (and all below it)")
        ] = None,
        equipment: Annotated[str | None, text_filter("A work unit")] = None,
        due_before: Annotated[Instant | None, QueryParameter()] = None,
        due_after: Annotated[Instant | None, QueryParameter()] = None,
        sort: Annotated[Literal["priority", "due"], QueryParameter()] = "priority",
    ) -> WorkOrderPage:
        items, total, next_after = await db.run(
            partial(
                work_orders.list_work_orders,
                state=work_order_state,
                production_order=production_order,
                work_center=work_center,
                equipment=equipment,
                due_before=due_before,
                due_after=due_after,
                sort=sort,
                paging=paging,
            )
        )
        return WorkOrderPage(
            items=items,
            total=total,
            limit=paging.limit,
            offset=paging.offset,
            next_after=next_after,
        )

    @get(
        "/{job_id:str}",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="One work order: its recorded history and, while it runs, its live state",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def detail(
        self, job_id: Key, steering: NamedDependency[Steering]
    ) -> work_orders.WorkOrderDetail:
        return await steering.work_order_detail(job_id)

    @post(
        "/{job_id:str}/hold",
        status_code=200,
        guards=[allow(STEER)],
        summary="Hold a work order (a running job pauses on its PLC: Interrupted)",
        description=roles_note(STEER),
    )
    async def hold(
        self,
        job_id: Key,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> work_orders.WorkOrderOut:
        command = WorkOrderCommand(caller.actor, data.reason if data else None)
        return await steering.act_on_work_order(job_id, "hold", command)

    @post(
        "/{job_id:str}/resume",
        status_code=200,
        guards=[allow(STEER)],
        summary="Resume a held work order",
        description=roles_note(STEER),
    )
    async def resume(
        self,
        job_id: Key,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> work_orders.WorkOrderOut:
        command = WorkOrderCommand(caller.actor, data.reason if data else None)
        return await steering.act_on_work_order(job_id, "resume", command)

    @post(
        "/{job_id:str}/cancel",
        status_code=200,
        guards=[allow(STEER)],
        summary="Cancel a work order (a started one aborts on its PLC)",
        description=roles_note(STEER),
    )
    async def cancel(
        self,
        job_id: Key,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> work_orders.WorkOrderOut:
        command = WorkOrderCommand(caller.actor, data.reason if data else None)
        return await steering.act_on_work_order(job_id, "cancel", command)

    @patch(
        "/{job_id:str}",
        guards=[allow(STEER)],
        summary="Change a work order's priority or target work unit",
        description="Equipment can change until the job is sent to a PLC. " + roles_note(STEER),
    )
    async def change(
        self,
        job_id: Key,
        data: JSONBody[WorkOrderChange],
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
    ) -> work_orders.WorkOrderOut:
        if data.priority is None and data.equipment is None:
            raise DomainError(
                title="Invalid request",
                detail="give a new priority and/or equipment",
                status=422,
                errors=[FieldError("priority", "one of priority, equipment is required")],
            )
        command = WorkOrderCommand(caller.actor, data.reason, data.priority, data.equipment)
        action: Action = "priority" if data.equipment is None else "equipment"
        return await steering.act_on_work_order(job_id, action, command)


class WorkCenterController(Controller):
    path = f"{API}/work-centers"
    tags = ["work orders"]

    @get(
        "/{work_center:str}/dispatch-list",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Queued and running work at a work center, in the order it will run",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def dispatch_list(
        self, work_center: Key, db: NamedDependency[Database]
    ) -> list[work_orders.WorkOrderOut]:
        return await db.run(partial(work_orders.dispatch_list, work_center=work_center))
