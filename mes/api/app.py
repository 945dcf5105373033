"""The Litestar application: routes, security, error handling and OpenAPI.

``create_app`` builds the app from settings; the database session factory and the Temporal
client can be handed in (tests, ``mes demo``) or are made from the settings on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.di import NamedDependency
from litestar.logging.config import LoggingConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme, Tag
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from mes.api.audit_trail import AuditController
from mes.api.deps import DEPENDENCIES, app_state
from mes.api.erp import B2mmlController, ErpClientController, PerformanceController
from mes.api.genealogy import GenealogyController
from mes.api.kpi import KpiController
from mes.api.master_data import MasterDataController
from mes.api.metrics import metrics_route
from mes.api.params import TYPE_DECODERS, CheckedRequest, ClosedModelSchema, InstantSchema
from mes.api.problems import EXCEPTION_HANDLERS, document_problems, problem
from mes.api.production_orders import ProductionOrderController
from mes.api.quality import QualityController
from mes.api.security import AUTH_MIDDLEWARE, PUBLIC_PATHS
from mes.api.tokens import TokenController
from mes.api.work_orders import WorkCenterController, WorkOrderController
from mes.db import Database, make_engine, make_sessionmaker
from mes.settings import Settings
from mes.workflow_client import WorkflowClient

log = logging.getLogger(__name__)


@get(
    "/health",
    summary="Liveness and the reachability of the database (no token needed)",
    tags=["health"],
    security=[],
    responses={
        503: ResponseSpec(
            dict[str, str], description="The database is unreachable", generate_examples=False
        )
    },
)
async def health(db: NamedDependency[Database]) -> Response[dict[str, Any]]:
    try:
        await db.run(lambda s: s.execute(text("SELECT 1")))
    except Exception:
        # The driver's text names hosts and ports: for the log, not for anyone who asks.
        log.warning("health: database unreachable", exc_info=True)
        return problem(503, "Database unavailable", "the database cannot be reached")
    return Response({"status": "ok", "database": "ok"})


async def answer_options(request: Request[Any, Any, Any]) -> Response[None] | None:
    """Answer ``OPTIONS`` with every method of the path. Litestar's own answer lists only the
    methods of the handlers registered first on a path that several handlers share."""
    if request.method != "OPTIONS":
        return None
    methods = request.app.route_handler_method_map.get(request.scope["path_template"], {})
    return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods))})


def create_app(
    settings: Settings | None = None,
    sessions: sessionmaker[Session] | None = None,
    temporal: Client | None = None,
) -> Litestar:
    """Build the API. Nothing connects until the first request that needs it."""
    settings = settings or Settings.from_env()
    app = Litestar(
        route_handlers=[
            ProductionOrderController,
            WorkOrderController,
            WorkCenterController,
            GenealogyController,
            QualityController,
            MasterDataController,
            AuditController,
            TokenController,
            B2mmlController,
            ErpClientController,
            PerformanceController,
            KpiController,
            metrics_route(settings.metrics_public),
            health,
        ],
        middleware=[AUTH_MIDDLEWARE],
        state=app_state(
            Database(sessions or make_sessionmaker(make_engine(settings.database_url))),
            WorkflowClient(settings, temporal),
            settings,
        ),
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=CheckedRequest,
        type_decoders=TYPE_DECODERS,
        plugins=[InstantSchema(), ClosedModelSchema()],
        before_request=answer_options,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="MES API",
            version="1.1.0",
            description=(
                "An ISA-95 Manufacturing Execution System. Production orders are ISA-95 "
                "operations requests; work orders are job orders. Every route but /health and "
                "the docs needs `Authorization: Bearer <token>`; each token has one role "
                "(erp, supervisor, auditor, admin). Errors are application/problem+json "
                "(RFC 9457)."
            ),
            tags=[
                Tag(name="production orders", description="ERP orders (operations requests)"),
                Tag(name="work orders", description="Job orders, steered by supervisors"),
                Tag(name="genealogy", description="Lot traces over material actuals"),
                Tag(
                    name="quality",
                    description="Test results, nonconformances and their disposition, yield",
                ),
                Tag(name="master data", description="Products, routings and equipment"),
                Tag(name="audit", description="The hash-chained audit trail"),
                Tag(name="tokens", description="API tokens and roles"),
                Tag(name="KPIs", description="OEE (ISO 22400-2) and on-time delivery"),
                Tag(name="operations", description="Prometheus metrics"),
                Tag(name="B2MML", description="ISA-95 messages in B2MML V0701; ERP callbacks"),
            ],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description="API token")
                }
            ),
            security=[{"bearer": []}],
            path="/schema",
        ),
        # The process that runs the app (uvicorn, mes dev) configures logging, not the app.
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="never"),
        debug=False,
    )
    document_problems(app, PUBLIC_PATHS)
    return app
