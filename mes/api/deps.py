"""What the route handlers share: the database, the Temporal client, and the caller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from litestar import Request
from litestar.datastructures import State
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mes import production_orders
from mes.auth import Principal
from mes.db import make_engine, make_sessionmaker
from mes.errors import DomainError, FieldError
from mes.settings import Settings
from mes.states import allowed_actions

log = logging.getLogger(__name__)
T = TypeVar("T")


class Services:
    """The database (a session factory) and the Temporal client (connected on first use)."""

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

    async def start_order_workflow(self, order_id: int, order_number: str, wf_id: str) -> None:
        """Start the order's workflow unless it already runs or ran (its id is the order's)."""
        client = await self.temporal()
        # A workflow that already runs or ran for this order is the order's workflow.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            # By name: the API does not import workflow code; the worker knows the type.
            await client.start_workflow(
                "ProductionOrderWorkflow",
                {"order_id": order_id, "order_number": order_number},
                id=wf_id,
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )

    async def update_job(
        self, job_order_id: str, update: str, command: dict[str, Any], state_now: str
    ) -> None:
        """Send a supervisor action to the job's workflow as a Temporal update.

        A refusal (validator or handler) becomes a problem: 409 with the state and the
        allowed actions, or the status the domain gave (e.g. 422 for a unit that cannot
        run the job).
        """
        client = await self.temporal()
        handle = client.get_workflow_handle(f"job-{job_order_id}")
        try:
            await handle.execute_update(update, command)
        except WorkflowUpdateFailedError as e:
            raise _problem_from_failure(e.cause, update) from e
        except RPCError as e:
            if e.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise DomainError(
                    title="Not allowed",
                    detail=f"work order {job_order_id} is {state_now}; it takes no {update}",
                    status=409,
                ) from e
            raise

    async def act_on_order(
        self, order_id: int, action: str, update: str, command: dict[str, Any]
    ) -> None:
        """Apply a supervisor action to every open work order of an order that allows it.

        A work order that moved on meanwhile (ended, or cancelled with its order) is skipped;
        refused only when no work order took the action.
        """
        detail = await self.db(
            lambda s: production_orders.order_out(s, production_orders.get_order(s, order_id))
        )
        targets = [
            j
            for j in detail.job_orders
            if action in allowed_actions(j.state, j.dispatched_at is not None)
        ]
        refusal = DomainError(
            title="Not allowed in this state",
            detail=f"order {detail.order_number} ({detail.state}) has no work order "
            f"that allows {action}",
            status=409,
        )
        took = False
        # Cancel later steps first: cancelling step 1 makes the order workflow cancel the
        # rest itself. Other actions go in routing order (the running job first).
        for job in reversed(targets) if action == "cancel" else targets:
            try:
                await self.update_job(job.id, update, command, job.state)
                took = True
            except DomainError as e:
                if e.status != 409:
                    raise
                refusal = e
        if not took:
            raise refusal

    async def report(self, workflow_id: str) -> None:
        """Tell an order's workflow that its state changed (it reports to the ERP)."""
        client = await self.temporal()
        with contextlib.suppress(RPCError):  # an ended workflow has nothing left to report
            await client.get_workflow_handle(workflow_id).signal("report")

    async def query_job(self, job_order_id: str) -> dict[str, Any] | None:
        """The job workflow's live status, or None when it does not run (any more)."""
        client = await self.temporal()
        try:
            status: Any = await client.get_workflow_handle(f"job-{job_order_id}").query("status")
        except Exception:
            return None
        return dict(status) if isinstance(status, dict) else None


def _problem_from_failure(cause: BaseException | None, update: str) -> DomainError:
    # A handler's activity failure arrives wrapped: ActivityError → ApplicationError.
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        details = cause.details[0] if cause.details else {}
        if cause.type == "NotAllowed" and isinstance(details, dict):
            allowed = details.get("allowed_actions", [])
            return DomainError(
                title="Not allowed in this state",
                detail=f"{cause.message}; allowed now: {', '.join(allowed) or 'nothing'}",
                status=409,
                errors=[FieldError("state", str(details.get("state")))],
            )
        if cause.type == "DomainError" and isinstance(details, dict):
            return DomainError(
                title=str(details.get("title", "Refused")),
                detail=cause.message,
                status=int(details.get("status", 422)),
            )
        return DomainError(title="Refused", detail=f"{update}: {cause.message}", status=409)
    return DomainError(title="Refused", detail=f"{update} failed: {cause}", status=409)


def services(state: State) -> Services:
    svc: Services = state.services
    return svc


def caller(request: Request[Principal, Any, Any]) -> Principal:
    """The authenticated caller of a request."""
    return request.user
