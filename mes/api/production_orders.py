"""Production orders (ISA-95 operations requests): the ERP's way in, the supervisor's levers."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated

from litestar import Controller, Response, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from mes import production_orders
from mes.api.params import NEXT_LINK, Id, NextLink, Paging
from mes.api.security import POST_ORDERS, READ_ORDERS, STEER, allow, roles_note
from mes.auth import Principal
from mes.db import Database
from mes.models import OperationsRequest, RequestState
from mes.quantities import QuantityNumber
from mes.steering import Steering

API = "/api/v1"


class ProductionOrderSummary(BaseModel):
    """A production order (ISA-95 operations request) in a list."""

    id: int
    order_number: str
    product: str
    quantity: QuantityNumber
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
    """A new priority for a whole production order and its open work orders."""

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
            "when it is posted with a different body, or when another ERP client took the number "
            "(without telling of that order). A due date already past is accepted and "
            "the order is marked late. " + roles_note(POST_ORDERS)
        ),
    )
    async def create(
        self,
        data: JSONBody[production_orders.ProductionOrderIn],
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
    ) -> Response[production_orders.ProductionOrderOut]:
        out, created = await production_orders.accept_order(db, data, caller.actor, caller.name)
        return Response(
            out, status_code=202 if created else 200, headers={"Location": out.links["self"]}
        )

    @get(
        "/",
        guards=[allow(READ_ORDERS)],
        summary="List production orders, newest first",
        description="An ERP token sees the orders it sent; the other roles see all. "
        + roles_note(READ_ORDERS),
        response_headers=[NEXT_LINK],
    )
    async def list_orders(
        self,
        db: NamedDependency[Database],
        next_link: NamedDependency[NextLink],
        caller: NamedDependency[Principal],
        paging: NamedDependency[Paging],
        order_state: Annotated[
            RequestState | None,
            QueryParameter(name="state", description="Only orders in this state"),
        ] = None,
    ) -> Response[list[ProductionOrderSummary]]:
        found, next_after = await db.run(
            partial(
                production_orders.list_orders,
                state=order_state,
                paging=paging,
                source=caller.order_scope,
            )
        )
        headers = {"Link": next_link.to(next_after)} if next_after else {}
        return Response([_summary(o) for o in found], headers=headers)

    @get(
        "/{order_id:int}",
        guards=[allow(READ_ORDERS)],
        summary="One production order with its work orders and lots",
        description="An ERP token reads the orders it sent (another's: 404). "
        + roles_note(READ_ORDERS),
    )
    async def detail(
        self,
        order_id: Id,
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
    ) -> production_orders.ProductionOrderOut:
        def read(s: Session) -> production_orders.ProductionOrderOut:
            order = production_orders.get_order(s, order_id, caller.order_scope)
            return production_orders.order_out(s, order)

        return await db.run(read)

    @post(
        "/{order_id:int}/hold",
        status_code=200,
        guards=[allow(STEER)],
        summary="Hold every open work order of a production order",
        description="Running jobs pause on their PLC. " + roles_note(STEER),
    )
    async def hold(
        self,
        order_id: Id,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        return await steering.hold_order(order_id, caller.actor, data.reason if data else None)

    @post(
        "/{order_id:int}/resume",
        status_code=200,
        guards=[allow(STEER)],
        summary="Resume the held work orders of a production order",
        description=roles_note(STEER),
    )
    async def resume(
        self,
        order_id: Id,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        return await steering.resume_order(order_id, caller.actor, data.reason if data else None)

    @post(
        "/{order_id:int}/cancel",
        status_code=200,
        guards=[allow(STEER)],
        summary="Cancel a production order: its open work orders are cancelled or aborted",
        description=roles_note(STEER),
    )
    async def cancel(
        self,
        order_id: Id,
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
        data: JSONBody[Reason | None] = None,
    ) -> production_orders.ProductionOrderOut:
        return await steering.cancel_order(order_id, caller.actor, data.reason if data else None)

    @patch(
        "/{order_id:int}",
        guards=[allow(STEER)],
        summary="Reprioritise a production order and its open work orders",
        description=roles_note(STEER),
    )
    async def change(
        self,
        order_id: Id,
        data: JSONBody[OrderChange],
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
    ) -> production_orders.ProductionOrderOut:
        return await steering.reprioritise_order(order_id, data.priority, caller.actor, data.reason)
