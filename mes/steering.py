"""What supervisors (and the ERP's cancel) do to work orders and production orders.

A work order (ISA-95 job order) is steered through its workflow: the action goes to the
``job-<JobOrderID>`` workflow as a Temporal update, whose validator checks
``mes.states.allowed_actions`` and whose handler does the PLC's half and records the change.
An action on a production order goes to each of its open work orders that allows it, and
the order's own state follows (held, resumed), reported to the ERP.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

from sqlalchemy.orm import Session

from mes import production_orders, quality, work_orders
from mes.db import Database
from mes.errors import DomainError
from mes.production_orders import ProductionOrderOut
from mes.states import Action, RequestState, allowed_actions, is_final
from mes.work_orders import WorkOrderDetail, WorkOrderOut
from mes.workflow_client import WorkflowClient
from workflows.types import DispositionCommand, OrderCommand, WorkOrderCommand


def _work_order(s: Session, job_id: str) -> WorkOrderOut:
    return work_orders.work_order_out(work_orders.get_job(s, job_id))


def _order(s: Session, order_id: int) -> ProductionOrderOut:
    return production_orders.order_out(s, production_orders.get_order(s, order_id))


class Steering:
    """Supervisor actions and the live view of work orders, over the database and Temporal."""

    def __init__(self, db: Database, workflows: WorkflowClient) -> None:
        self.db = db
        self.workflows = workflows

    # --- work orders --------------------------------------------------------------------

    async def work_order_detail(self, job_id: str) -> WorkOrderDetail:
        """A work order's recorded history and, while it runs, its workflow's live state."""
        out = await self.db.run(partial(work_orders.work_order_detail, job_order_id=job_id))
        if not is_final(out.state):
            live = await self.workflows.job_status(job_id)
            if live is not None:
                out.live = dataclasses.asdict(live) | {
                    "retrying": await self.workflows.machine_retries(job_id)
                }
                out.pending_on_machine = live.pending_on_machine
        return out

    async def act_on_work_order(
        self, job_id: str, action: Action, command: WorkOrderCommand
    ) -> WorkOrderOut:
        """Hold, resume, cancel or change one work order; 409 when its state refuses."""
        before = await self.db.run(partial(_work_order, job_id=job_id))
        status = await self.workflows.steer(job_id, action, command, before.state)
        out = await self.db.run(partial(_work_order, job_id=job_id))
        out.pending_on_machine = status.pending_on_machine
        return out

    # --- quality --------------------------------------------------------------------------

    async def record_result(self, entry: quality.ManualResult, actor: str) -> quality.TestResultOut:
        """Record a result by hand; out of specification, the lot is Restricted with a
        nonconformance, and work orders on a PLC that would consume it are held (paused)."""
        out, consumers = await self.db.run(partial(quality.record_result, entry=entry, actor=actor))
        reason = f"{out.nonconformance}: lot {out.lot} out of specification"
        for job_id in consumers:
            # One that moved on meanwhile (ended, or held already) takes no hold: fine.
            with contextlib.suppress(DomainError):
                await self.act_on_work_order(job_id, "hold", WorkOrderCommand(actor, reason))
        return out

    async def dispose(
        self, nc_id: str, disposition: str, reason: str, actor: str
    ) -> quality.NonconformanceOut:
        """A supervisor's disposition of a nonconformance. When its work order waits Held on
        it, its workflow records the disposition and moves the job on (a rework goes on in a
        new job order); otherwise the disposition is recorded alone."""
        job_id = await self.db.run(partial(quality.quality_held_job, nc_id=nc_id))
        command = DispositionCommand(actor, nc_id, disposition, reason)
        if job_id is None or not await self.workflows.dispose(job_id, command):
            await self.db.run(
                partial(
                    quality.dispose,
                    nc_id=nc_id,
                    disposition=disposition,
                    reason=reason,
                    actor=actor,
                )
            )
        return await self.db.run(
            lambda s: quality.nonconformance_out(s, quality.get_nonconformance(s, nc_id))
        )

    # --- production orders --------------------------------------------------------------

    async def hold_order(self, order_id: int, actor: str, reason: str | None) -> ProductionOrderOut:
        """Hold every open work order of the order (running jobs pause on their PLC)."""
        await self._act_on_order(order_id, "hold", WorkOrderCommand(actor, reason))
        return await self._set_order_state(order_id, RequestState.HELD, actor, reason)

    async def resume_order(
        self, order_id: int, actor: str, reason: str | None
    ) -> ProductionOrderOut:
        """Resume the order's held work orders; the order is Running again (or Released)."""
        out = await self._act_on_order(order_id, "resume", WorkOrderCommand(actor, reason))
        back = RequestState.RUNNING if out.started_at else RequestState.RELEASED
        return await self._set_order_state(order_id, back, actor, reason)

    async def cancel_order(
        self, order_id: int, actor: str, reason: str | None
    ) -> ProductionOrderOut:
        """Cancel the order: answered at once, carried out by its workflow (the step on a
        machine is withdrawn or aborted, the later ones never run). An order whose
        workflow has not started is cancelled in the database alone, under its row lock
        (``production_orders.cancel_unstarted``); one whose workflow the relay started
        meanwhile is found started once the lock is had, and cancelled through it."""
        order = await self.db.run(partial(_order, order_id=order_id))
        if is_final(order.state):
            raise DomainError(
                title="Not allowed in this state",
                detail=f"order {order.order_number} is {order.state}; it takes no cancel",
                status=409,
            )
        # Not started: cancelled in the database, under the lock the relay starts it under.
        if await self.db.run(
            partial(
                production_orders.cancel_unstarted, order_id=order_id, actor=actor, reason=reason
            )
        ):
            return await self.db.run(partial(_order, order_id=order_id))
        if not await self.workflows.cancel_order(order.order_number, OrderCommand(actor, reason)):
            # Recorded as started, so it was: Temporal lost it (or a namespace was reset).
            raise DomainError(
                title="Workflow missing",
                detail=f"order {order.order_number} was started but its workflow is not found",
                status=409,
            )
        out = await self.db.run(partial(_order, order_id=order_id))
        out.pending = ["cancel"] if not is_final(out.state) else []
        return out

    async def cancel_order_by_number(
        self, order_number: str, actor: str, reason: str, source: str | None
    ) -> None:
        """The ERP's cancel names the order by its number; with ``source``, only an order that
        ERP client sent (another's is ``NotFound``, as an unknown one)."""
        order_id = await self.db.run(
            partial(production_orders.order_id_by_number, order_number=order_number, source=source)
        )
        await self.cancel_order(order_id, actor, reason)

    async def reprioritise_order(
        self, order_id: int, priority: int, actor: str, reason: str | None
    ) -> ProductionOrderOut:
        """A new priority for the order and each of its open work orders (an order not
        started yet takes it in the database, and its workflow plans with it)."""
        started = await self.db.run(
            partial(
                production_orders.set_order_priority,
                order_id=order_id,
                priority=priority,
                actor=actor,
                reason=reason,
            )
        )
        if not started:
            return await self.db.run(partial(_order, order_id=order_id))
        return await self._act_on_order(
            order_id, "priority", WorkOrderCommand(actor, reason, priority=priority)
        )

    async def _act_on_order(
        self, order_id: int, action: Action, command: WorkOrderCommand
    ) -> ProductionOrderOut:
        """Apply an action to every open work order of an order that allows it.

        A work order that moved on meanwhile (ended, or cancelled with its order) is skipped;
        refused only when no work order took the action.
        """
        detail = await self.db.run(partial(_order, order_id=order_id))
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
                await self.workflows.steer(job.id, action, command, job.state)
                took = True
            except DomainError as e:
                if e.status != 409:
                    raise
                refusal = e
        if not took:
            raise refusal
        return await self.db.run(partial(_order, order_id=order_id))

    async def _set_order_state(
        self, order_id: int, state: str, actor: str, reason: str | None
    ) -> ProductionOrderOut:
        def write(s: Session) -> ProductionOrderOut:
            production_orders.set_order_state(s, order_id, state, actor, reason)
            return _order(s, order_id)

        out = await self.db.run(write)
        await self.workflows.report(out.order_number)
        return out
