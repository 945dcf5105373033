"""Production orders (ISA-95 operations requests): the ERP's way in, the supervisor's levers."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from mes import production_orders
from mes.api.deps import caller, services
from mes.api.problems import problem
from mes.api.security import POST_ORDERS, READ_ORDERS, STEER, allow, roles_note
from mes.auth import Principal
from mes.models import OperationsRequest, RequestState

log = logging.getLogger(__name__)
API = "/api/v1"


class ProductionOrderSummary(BaseModel):
    """A production order (ISA-95 operations request) in a list."""

    id: int
    order_number: str
    product: str
    quantity: float
    unit: str
    priority: int
    due: datetime
    state: str
    late: bool
    links: dict[str, str]


class Reason(BaseModel):
    """Why a supervisor acts (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str | None, Field(max_length=500)] = None


class OrderChange(BaseModel):
    """A new priority for a whole production order and its open work production_orders."""

    model_config = ConfigDict(extra="forbid")
    priority: Annotated[int, Field(ge=0, le=1_000_000, strict=True)]
    reason: Annotated[str | None, Field(max_length=500)] = None


def _summary(o: OperationsRequest) -> ProductionOrderSummary:
    return ProductionOrderSummary(
        id=o.id,
        order_number=o.external_id,
        product=o.product.external_id,
        quantity=o.quantity,
        unit=o.unit,
        priority=o.priority,
        due=o.due,
        state=o.state,
        late=o.late,
        links={"self": f"{API}/production-orders/{o.id}"},
    )


async def _act(
    state: State,
    request: Request[Principal, Any, Any],
    order_id: int,
    action: str,
    update: str,
    command: dict[str, Any],
) -> production_orders.ProductionOrderOut:
    svc = services(state)
    await svc.act_on_order(order_id, action, update, {"actor": caller(request).actor} | command)
    return await svc.db(
        lambda s: production_orders.order_out(s, production_orders.get_order(s, order_id))
    )


async def _set_order_state(
    state: State,
    request: Request[Principal, Any, Any],
    order_id: int,
    new_state: str,
    reason: str | None,
) -> production_orders.ProductionOrderOut:
    actor = caller(request).actor

    def write(s: Session) -> production_orders.ProductionOrderOut:
        production_orders.set_order_state(s, order_id, new_state, actor, reason)
        return production_orders.order_out(s, production_orders.get_order(s, order_id))

    svc = services(state)
    out = await svc.db(write)
    await svc.report(out.workflow_id)
    return out


class ProductionOrderController(Controller):
    path = f"{API}/production-orders"
    tags = ["production orders"]

    @post(
        "/",
        status_code=202,
        guards=[allow(POST_ORDERS)],
        summary="Accept a production order from the ERP",
        description=(
            "Stores the order (an ISA-95 operations request with one segment requirement per "
            "routing step) and starts its workflow `order-<order_number>`. Answers 202 for a new "
            "order, 200 when the same order number is posted again with the same body, and 409 "
            "when it is posted with a different body. A due date already past is accepted and "
            "the order is marked late. " + roles_note(POST_ORDERS)
        ),
    )
    async def create(
        self,
        data: JSONBody[production_orders.ProductionOrderIn],
        state: State,
        request: Request[Principal, Any, Any],
    ) -> Response[production_orders.ProductionOrderOut]:
        svc = services(state)
        actor = caller(request).actor

        source = caller(request).name

        def store(s: Session) -> tuple[production_orders.ProductionOrderOut, bool]:
            order, created = production_orders.create_order(s, data, actor, source)
            return production_orders.order_out(s, production_orders.get_order(s, order.id)), created

        out, created = await svc.db(store)
        try:
            await svc.start_order_workflow(out.id, out.order_number, out.workflow_id)
        except Exception:
            log.exception("could not start workflow %s", out.workflow_id)
            # The order is stored; the same post again starts the workflow (idempotent).
            return problem(  # type: ignore[return-value]
                503,
                "Workflow engine unavailable",
                f"order {out.order_number} is stored but could not be started yet; "
                "post the same order again to retry",
            )
        return Response(
            out, status_code=202 if created else 200, headers={"Location": out.links["self"]}
        )

    @get(
        "/",
        guards=[allow(READ_ORDERS)],
        summary="List production orders, newest first",
        description=roles_note(READ_ORDERS),
    )
    async def list_orders(
        self,
        state: State,
        order_state: Annotated[
            RequestState | None,
            QueryParameter(name="state", description="Only orders in this state"),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0)] = 0,
    ) -> list[ProductionOrderSummary]:
        found = await services(state).db(
            lambda s: production_orders.list_orders(s, order_state, limit, offset)
        )
        return [_summary(o) for o in found]

    @get(
        "/{order_id:int}",
        guards=[allow(READ_ORDERS)],
        summary="One production order with its work orders and lots",
        description=roles_note(READ_ORDERS),
    )
    async def detail(
        self, order_id: FromPath[int], state: State
    ) -> production_orders.ProductionOrderOut:
        return await services(state).db(
            lambda s: production_orders.order_out(s, production_orders.get_order(s, order_id))
        )

    @post(
        "/{order_id:int}/hold",
        status_code=200,
        guards=[allow(STEER)],
        summary="Hold every open work order of a production order",
        description="Running jobs pause on their PLC. " + roles_note(STEER),
    )
    async def hold(
        self,
        order_id: FromPath[int],
        state: State,
        request: Request[Principal, Any, Any],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        reason = data.reason if data else None
        await _act(state, request, order_id, "hold", "hold", {"reason": reason})
        return await _set_order_state(state, request, order_id, RequestState.HELD, reason)

    @post(
        "/{order_id:int}/resume",
        status_code=200,
        guards=[allow(STEER)],
        summary="Resume the held work orders of a production order",
        description=roles_note(STEER),
    )
    async def resume(
        self,
        order_id: FromPath[int],
        state: State,
        request: Request[Principal, Any, Any],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        reason = data.reason if data else None
        out = await _act(state, request, order_id, "resume", "resume", {"reason": reason})
        back = RequestState.RUNNING if out.started_at else RequestState.RELEASED
        return await _set_order_state(state, request, order_id, back, reason)

    @post(
        "/{order_id:int}/cancel",
        status_code=200,
        guards=[allow(STEER)],
        summary="Cancel a production order: its open work orders are cancelled or aborted",
        description=roles_note(STEER),
    )
    async def cancel(
        self,
        order_id: FromPath[int],
        state: State,
        request: Request[Principal, Any, Any],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        reason = data.reason if data else None
        return await _act(state, request, order_id, "cancel", "cancel", {"reason": reason})

    @patch(
        "/{order_id:int}",
        guards=[allow(STEER)],
        summary="Reprioritise a production order and its open work orders",
        description=roles_note(STEER),
    )
    async def change(
        self,
        order_id: FromPath[int],
        data: JSONBody[OrderChange],
        state: State,
        request: Request[Principal, Any, Any],
    ) -> production_orders.ProductionOrderOut:
        actor = caller(request).actor
        await services(state).db(
            lambda s: production_orders.set_order_priority(
                s, order_id, data.priority, actor, data.reason
            )
        )
        return await _act(
            state,
            request,
            order_id,
            "priority",
            "change",
            {"priority": data.priority, "reason": data.reason},
        )
