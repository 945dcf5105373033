"""The Litestar application: routes, error handling, OpenAPI, and its connections.

``create_app`` builds the app from settings; the database session factory and the Temporal
client can be handed in (tests, ``mes demo``) or are made from the settings at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from litestar import Controller, Litestar, Response, get, post
from litestar.datastructures import State
from litestar.logging.config import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Tag
from litestar.params import FromPath, JSONBody, QueryParameter
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from mes import genealogy, masterdata, orders
from mes.api.problems import EXCEPTION_HANDLERS, problem
from mes.db import make_engine, make_sessionmaker
from mes.models import OperationsRequest, RequestState
from mes.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
API = "/api/v1"


class Services:
    """What the handlers need: the database and the Temporal client (connected lazily)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None = None,
        temporal: Client | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions or make_sessionmaker(make_engine(settings.database_url))
        self._temporal = temporal
        self._lock = asyncio.Lock()

    async def temporal(self) -> Client:
        async with self._lock:
            if self._temporal is None:
                self._temporal = await Client.connect(
                    self.settings.temporal_address, namespace=self.settings.temporal_namespace
                )
            return self._temporal

    async def db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` with a session in a worker thread (the ORM is synchronous)."""

        def run() -> T:
            with self.sessions() as session:
                return fn(session)

        return await asyncio.to_thread(run)

    async def start_order_workflow(self, order: orders.ProductionOrderOut) -> None:
        """Start the order's workflow unless it already runs or ran (its id is the order's)."""
        client = await self.temporal()
        # A workflow that already runs or ran for this order is the order's workflow.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            # By name: the API does not import workflow code; the worker knows the type.
            await client.start_workflow(
                "ProductionOrderWorkflow",
                {"order_id": order.id, "order_number": order.order_number},
                id=order.workflow_id,
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )


def services(state: State) -> Services:
    svc: Services = state.services
    return svc


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
        summary="Accept a production order from the ERP",
        description=(
            "Stores the order (an ISA-95 operations request with one segment requirement per "
            "routing step) and starts its workflow `order-<order_number>`. Answers 202 for a new "
            "order, 200 when the same order number is posted again with the same body, and 409 "
            "when it is posted with a different body. A due date already past is accepted and "
            "the order is marked late."
        ),
        responses={},
    )
    async def create(
        self, data: JSONBody[orders.ProductionOrderIn], state: State
    ) -> Response[orders.ProductionOrderOut]:
        svc = services(state)

        def store(s: Session) -> tuple[orders.ProductionOrderOut, bool]:
            order, created = orders.create_order(s, data)
            return orders.order_out(s, orders.get_order(s, order.id)), created

        out, created = await svc.db(store)
        try:
            await svc.start_order_workflow(out)
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

    @get("/", summary="List production orders, newest first")
    async def list(
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
            lambda s: orders.list_orders(s, order_state, limit, offset)
        )
        return [_summary(o) for o in found]

    @get("/{order_id:int}", summary="One production order with its work orders and lots")
    async def detail(self, order_id: FromPath[int], state: State) -> orders.ProductionOrderOut:
        return await services(state).db(
            lambda s: orders.order_out(s, orders.get_order(s, order_id))
        )


class GenealogyController(Controller):
    path = f"{API}/genealogy/lots"
    tags = ["genealogy"]

    @get("/{lot:str}/backward", summary="Where a lot came from (its components, recursively)")
    async def backward(
        self,
        lot: FromPath[str],
        state: State,
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await services(state).db(lambda s: genealogy.trace(s, lot, "backward", depth))

    @get("/{lot:str}/forward", summary="Where a lot went (what was made from it, recursively)")
    async def forward(
        self,
        lot: FromPath[str],
        state: State,
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await services(state).db(lambda s: genealogy.trace(s, lot, "forward", depth))


class MasterDataController(Controller):
    path = API
    tags = ["master data"]

    @get("/products", summary="Products: material definitions that have a routing")
    async def products(self, state: State) -> list[dict[str, Any]]:
        return await services(state).db(masterdata.list_products)

    @get("/equipment", summary="The equipment hierarchy, with each work unit's endpoint")
    async def equipment(self, state: State) -> list[dict[str, Any]]:
        return await services(state).db(masterdata.equipment_tree)


@get("/health", summary="Liveness and the reachability of the database", tags=["health"])
async def health(state: State) -> Response[dict[str, str]]:
    try:
        await services(state).db(lambda s: s.execute(text("SELECT 1")))
    except Exception as e:
        return Response({"status": "unavailable", "database": str(e)[:200]}, status_code=503)
    return Response({"status": "ok", "database": "ok"})


def create_app(
    settings: Settings | None = None,
    sessions: sessionmaker[Session] | None = None,
    temporal: Client | None = None,
) -> Litestar:
    """Build the API. Nothing connects until the first request that needs it."""
    settings = settings or Settings.from_env()
    return Litestar(
        route_handlers=[
            ProductionOrderController,
            GenealogyController,
            MasterDataController,
            health,
        ],
        state=State({"services": Services(settings, sessions, temporal)}),
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="MES API",
            version="1.0.0",
            description=(
                "An ISA-95 Manufacturing Execution System. Production orders are ISA-95 "
                "operations requests; work orders are job orders. Errors are "
                "application/problem+json (RFC 9457)."
            ),
            tags=[
                Tag(name="production orders", description="ERP orders (operations requests)"),
                Tag(name="genealogy", description="Lot traces over material actuals"),
                Tag(name="master data", description="Products, routings and equipment"),
            ],
            path="/schema",
        ),
        # The process that runs the app (uvicorn, mes dev) configures logging, not the app.
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="never"),
        debug=False,
    )
