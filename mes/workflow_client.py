"""The MES's side of Temporal: start an order's workflow, steer a work order's, ask its state.

Every call names the workflow method it reaches (``ProductionOrderWorkflow.run``,
``JobOrderWorkflow.hold``, …) and passes a typed argument, so a rename breaks the type
check, not production; workflow ids come from ``workflows.types``. A refusal by a workflow
(its update validator, or a step it could not take) comes back as a ``DomainError`` the API
answers with (409 naming the state and the allowed actions, or the status the domain gave).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mes.errors import DomainError, FieldError
from mes.settings import Settings
from mes.states import Action
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow
from workflows.types import (
    DispositionCommand,
    OrderCommand,
    OrderInput,
    WorkOrderCommand,
    WorkOrderStatus,
    job_workflow_id,
    order_workflow_id,
)


class WorkflowClient:
    """The Temporal client (connected on first use) and the calls the MES makes with it."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await Client.connect(
                    self._settings.temporal_address, namespace=self._settings.temporal_namespace
                )
            return self._client

    async def start_order(self, order_id: int, order_number: str) -> None:
        """Start the order's workflow unless it already runs or ran (its id is the order's)."""
        client = await self.client()
        # A workflow that already runs or ran for this order is the order's workflow.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await client.start_workflow(
                ProductionOrderWorkflow.run,
                OrderInput(order_id, order_number),
                id=order_workflow_id(order_number),
                task_queue=self._settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )

    async def report(self, order_number: str) -> None:
        """Tell an order's workflow that its state changed (it reports to the ERP)."""
        client = await self.client()
        handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(
            order_workflow_id(order_number)
        )
        with contextlib.suppress(RPCError):  # an ended workflow has nothing left to report
            await handle.signal(ProductionOrderWorkflow.report)

    async def order_changed(self, order_number: str) -> None:
        """Tell an order's workflow that the ERP changed it (its queued jobs are re-sent)."""
        client = await self.client()
        handle: WorkflowHandle[ProductionOrderWorkflow, Any] = client.get_workflow_handle_for(
            ProductionOrderWorkflow.run, order_workflow_id(order_number)
        )
        with contextlib.suppress(RPCError):  # no workflow yet: it plans the changed order
            await handle.signal(ProductionOrderWorkflow.order_changed)

    async def cancel_order(self, order_number: str, command: OrderCommand) -> bool:
        """Cancel an order through its workflow (answered at once; the machines follow).

        False when the order has no workflow (stored while Temporal was away, never
        started); a workflow that has ended, or is already cancelling, answers 409.
        """
        client = await self.client()
        handle: WorkflowHandle[ProductionOrderWorkflow, Any] = client.get_workflow_handle_for(
            ProductionOrderWorkflow.run, order_workflow_id(order_number)
        )
        try:
            await handle.execute_update(ProductionOrderWorkflow.cancel, command)
        except WorkflowUpdateFailedError as e:
            raise _problem_from_failure(e.cause, "cancel") from e
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
            with contextlib.suppress(RPCError):
                await handle.describe()
                # It exists but takes no update: it has ended.
                raise DomainError(
                    title="Not allowed",
                    detail=f"order {order_number} has ended; it takes no cancel",
                    status=409,
                ) from e
            return False
        return True

    async def steer(
        self, job_order_id: str, action: Action, command: WorkOrderCommand, state_now: str
    ) -> WorkOrderStatus:
        """Send a supervisor action to the work order's workflow as a Temporal update.

        ``state_now`` is the recorded state, for the answer when the workflow has ended.
        """
        client = await self.client()
        handle: WorkflowHandle[JobOrderWorkflow, Any] = client.get_workflow_handle_for(
            JobOrderWorkflow.run, job_workflow_id(job_order_id)
        )
        try:
            if action == "hold":
                return await handle.execute_update(JobOrderWorkflow.hold, command)
            if action == "resume":
                return await handle.execute_update(JobOrderWorkflow.resume, command)
            if action == "cancel":
                return await handle.execute_update(JobOrderWorkflow.cancel, command)
            return await handle.execute_update(JobOrderWorkflow.change, command)
        except WorkflowUpdateFailedError as e:
            raise _problem_from_failure(e.cause, action) from e
        except RPCError as e:
            if e.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise DomainError(
                    title="Not allowed",
                    detail=f"work order {job_order_id} is {state_now}; it takes no {action}",
                    status=409,
                ) from e
            raise

    async def dispose(self, job_order_id: str, command: DispositionCommand) -> bool:
        """Send a disposition to the work order's workflow held on the nonconformance (it
        records it and moves the job on). False when the work order has no workflow."""
        client = await self.client()
        handle: WorkflowHandle[JobOrderWorkflow, Any] = client.get_workflow_handle_for(
            JobOrderWorkflow.run, job_workflow_id(job_order_id)
        )
        try:
            await handle.execute_update(JobOrderWorkflow.dispose, command)
        except WorkflowUpdateFailedError as e:
            raise _problem_from_failure(e.cause, "disposition") from e
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def job_status(self, job_order_id: str) -> WorkOrderStatus | None:
        """The work order workflow's live status, or None when it does not run (any more)."""
        client = await self.client()
        handle: WorkflowHandle[JobOrderWorkflow, Any] = client.get_workflow_handle_for(
            JobOrderWorkflow.run, job_workflow_id(job_order_id)
        )
        try:
            return await handle.query(JobOrderWorkflow.status)
        except Exception:
            return None

    async def machine_retries(self, job_order_id: str) -> list[dict[str, object]]:
        """The work order workflow's activities that are being retried (a PLC or database
        that cannot be reached): which, how many attempts, the last error and since when."""
        client = await self.client()
        try:
            described = await client.get_workflow_handle(job_workflow_id(job_order_id)).describe()
        except RPCError:
            return []
        retries: list[dict[str, object]] = []
        for pending in described.raw_description.pending_activities:
            if pending.attempt <= 1 and not pending.HasField("last_failure"):
                continue
            retries.append(
                {
                    "activity": pending.activity_type.name,
                    "attempt": pending.attempt,
                    "last_error": pending.last_failure.message,
                    "since": pending.last_attempt_complete_time.ToJsonString()
                    if pending.HasField("last_attempt_complete_time")
                    else None,
                }
            )
        return retries


def _problem_from_failure(cause: BaseException | None, action: str) -> DomainError:
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
        return DomainError(title="Refused", detail=f"{action}: {cause.message}", status=409)
    return DomainError(title="Refused", detail=f"{action} failed: {cause}", status=409)
