"""The workflows of one production order: the order, and one child per job order.

Workflow code is deterministic: every side effect (database, PLC) is an activity in
``workflows.activities``. The order's workflow id is ``order-<ERP order number>`` and each
job's ``job-<JobOrderID>``, so a duplicate post or a retried start cannot run anything twice.

Every job workflow starts when the order is planned and waits for its turn (the order
workflow releases the steps one after another), so a supervisor can steer any work order,
queued or running, through the same Temporal updates: hold, resume, cancel, priority and
equipment. Each update's validator checks ``mes.work_orders.allowed_actions``; the handler
does the PLC's half (OPC UA job control) and then records the change.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from mes.machines import JobState
    from mes.states import RequestState, allowed_actions, is_final
    from workflows.activities import MesActivities
    from workflows.types import (
        Dispatch,
        JobChange,
        JobInput,
        JobOutcome,
        JobStateChange,
        OrderInput,
        OrderOutcome,
        PlcCommand,
        WaitArgs,
        WorkOrderCommand,
        WorkOrderStatus,
        job_workflow_id,
    )

WAITING, READY, RUNNING, HELD = (
    RequestState.WAITING,
    RequestState.READY,
    RequestState.RUNNING,
    RequestState.HELD,
)
COMPLETED, ABORTED, CANCELLED = RequestState.COMPLETED, RequestState.ABORTED, RequestState.CANCELLED

#: Every step is short; a database or PLC that is away for a while is waited for with
#: backoff (up to a minute between tries), never given up on by timeout alone.
STEP_TIMEOUT = timedelta(seconds=60)
RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))


class NotAllowed(ApplicationError):
    """An action the work order's state does not allow (the API answers 409)."""

    def __init__(self, action: str, state: str, allowed: list[str]) -> None:
        super().__init__(
            f"{action} is not allowed for a work order in state {state}",
            {"state": state, "allowed_actions": allowed},
            type="NotAllowed",
            non_retryable=True,
        )


@workflow.defn
class JobOrderWorkflow:
    """One job order on one work unit: wait for its turn, dispatch, follow the machine,
    record; steered meanwhile by supervisor updates."""

    def __init__(self) -> None:
        self._job_id = ""
        self._state: str = WAITING
        self._held_from: str = WAITING
        self._released = False
        self._dispatch: Dispatch | None = None
        # Known once the job is prepared for its PLC (the database has them before).
        self._priority: int | None = None
        self._equipment: str | None = None
        self._plc_state = JobState.NOT_ALLOWED_TO_START
        self._waiting: workflow.ActivityHandle[int] | None = None
        self._cancel_reason = ""
        self._cancelling = False
        # Handlers and the main line take turns around PLC calls.
        self._lock = asyncio.Lock()

    # --- the main line --------------------------------------------------------------------

    @workflow.run
    async def run(self, job: JobInput) -> JobOutcome:
        self._job_id = job.job_order_id
        outcome = await self._run()
        self._state = outcome.state
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome

    async def _run(self) -> JobOutcome:
        while self._dispatch is None:
            await workflow.wait_condition(
                lambda: self._state == CANCELLED or (self._released and self._state == WAITING)
            )
            async with self._lock:
                if self._state == CANCELLED:
                    return JobOutcome(self._job_id, CANCELLED, [], self._cancel_reason)
                if self._state != WAITING:
                    continue  # held while we waited for the lock
                try:
                    dispatch = await self._prepare()
                    await workflow.execute_activity_method(
                        MesActivities.dispatch_job,
                        dispatch,
                        start_to_close_timeout=STEP_TIMEOUT,
                        retry_policy=RETRY,
                    )
                except ActivityError as e:
                    reason = _reason(e)
                    await workflow.execute_activity_method(
                        MesActivities.abort_job,
                        args=[self._job_id, reason],
                        start_to_close_timeout=STEP_TIMEOUT,
                        retry_policy=RETRY,
                    )
                    return JobOutcome(self._job_id, ABORTED, [], reason)
                self._dispatch = dispatch
                self._state = READY
                self._plc_state = JobState.ALLOWED_TO_START
            await self._tell_order()

        while not self._plc_state.is_final:
            if self._state == CANCELLED:
                return JobOutcome(self._job_id, CANCELLED, [], self._cancel_reason)
            self._waiting = workflow.start_activity_method(
                MesActivities.await_job,
                WaitArgs(self._dispatch, int(self._plc_state)),
                # A job may run for days; the heartbeat, not the timeout, detects a lost worker.
                start_to_close_timeout=timedelta(days=7),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RETRY,
            )
            try:
                self._plc_state = JobState(await self._waiting)
            except ActivityError:
                if not self._cancelling:
                    raise
                # The cancel handler stopped the wait; see whether the cancel went through.
                await workflow.wait_condition(lambda: not self._cancelling)
                continue
            if self._plc_state == JobState.RUNNING and self._state == READY:
                self._state = RUNNING

        async with self._lock:
            return await workflow.execute_activity_method(
                MesActivities.record_job_response,
                self._dispatch,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )

    async def _tell_order(self) -> None:
        """The first dispatch makes the order Running: its workflow reports that."""
        parent = workflow.info().parent
        if parent is not None:
            await workflow.get_external_workflow_handle(parent.workflow_id).signal("report")

    async def _prepare(self) -> Dispatch:
        dispatch: Dispatch = await workflow.execute_activity_method(
            MesActivities.prepare_job,
            self._job_id,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        self._priority = dispatch.order.priority
        self._equipment = dispatch.order.equipment_id
        return dispatch

    # --- the order workflow's signals ---------------------------------------------------------

    @workflow.signal
    def release(self) -> None:
        """The previous step is done: this job may go to its PLC (unless held)."""
        self._released = True

    @workflow.signal
    async def cancel_remaining(self, reason: str) -> None:
        """An earlier step ended without completing: this job cannot run."""
        async with self._lock:
            if self._state in (WAITING, HELD) and self._dispatch is None:
                await self._record(CANCELLED, "system", reason)
                self._cancel_reason = reason

    # --- supervisor updates ---------------------------------------------------------------

    @workflow.query
    def status(self) -> WorkOrderStatus:
        """The live state and the actions allowed now."""
        return WorkOrderStatus(
            self._job_id,
            self._state,
            self._priority,
            self._equipment,
            self._dispatch is not None,
            allowed_actions(self._state, self._dispatch is not None),
        )

    def _check(self, action: str) -> None:
        allowed = allowed_actions(self._state, self._dispatch is not None)
        if action not in allowed:
            raise NotAllowed(action, self._state, allowed)

    @workflow.update
    async def hold(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Hold: a running job pauses on its PLC (Interrupted), a queued one may not start."""
        async with self._lock:
            self._check("hold")
            held_from = self._state
            if held_from == RUNNING:
                await self._plc("pause")
            elif held_from == READY:
                await self._plc("revoke_start")
            await self._record(HELD, cmd.actor, cmd.reason)
            self._held_from = held_from
            return self.status()

    @hold.validator
    def _validate_hold(self, cmd: WorkOrderCommand) -> None:
        self._check("hold")

    @workflow.update
    async def resume(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Resume a held job where it was held."""
        async with self._lock:
            self._check("resume")
            back = self._held_from
            if back == RUNNING:
                await self._plc("resume")
            elif back == READY:
                await self._plc("start")
            await self._record(back, cmd.actor, cmd.reason)
            return self.status()

    @resume.validator
    def _validate_resume(self, cmd: WorkOrderCommand) -> None:
        self._check("resume")

    @workflow.update
    async def cancel(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Cancel: a job not started is removed (Cancelled); a started one aborts on its PLC."""
        async with self._lock:
            self._check("cancel")
            started = self._state == RUNNING or (self._state == HELD and self._held_from == RUNNING)
            if started:
                await self._plc("abort")
            else:
                if self._dispatch is not None:
                    # Stop following the job first: once cancelled the PLC forgets it.
                    self._cancelling = True
                    try:
                        if self._waiting is not None:
                            self._waiting.cancel()
                        await self._plc("cancel")
                        self._cancel_reason = cmd.reason or f"cancelled by {cmd.actor}"
                        await self._record(CANCELLED, cmd.actor, cmd.reason)
                    finally:
                        self._cancelling = False
                else:
                    self._cancel_reason = cmd.reason or f"cancelled by {cmd.actor}"
                    await self._record(CANCELLED, cmd.actor, cmd.reason)
        if started:
            # The job ends Aborted when the PLC reports it and the response is recorded.
            await workflow.wait_condition(lambda: is_final(self._state))
        return self.status()

    @cancel.validator
    def _validate_cancel(self, cmd: WorkOrderCommand) -> None:
        self._check("cancel")

    @workflow.update
    async def change(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Change priority and/or target equipment (equipment only before dispatch)."""
        async with self._lock:
            self._validate_change(cmd)
            await workflow.execute_activity_method(
                MesActivities.change_job,
                JobChange(self._job_id, cmd.actor, cmd.reason, cmd.priority, cmd.equipment),
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
            if cmd.priority is not None:
                self._priority = cmd.priority
            if cmd.equipment is not None:
                self._equipment = cmd.equipment
            if self._dispatch is not None and cmd.priority is not None:
                # The PLC picks its next job by priority: tell it.
                self._dispatch = await self._prepare()
                await self._plc("update")
            return self.status()

    @change.validator
    def _validate_change(self, cmd: WorkOrderCommand) -> None:
        if cmd.priority is None and cmd.equipment is None:
            raise ApplicationError("nothing to change", type="InvalidChange", non_retryable=True)
        if cmd.priority is not None:
            self._check("priority")
        if cmd.equipment is not None:
            self._check("equipment")

    async def _plc(self, command: str) -> None:
        assert self._dispatch is not None
        await workflow.execute_activity_method(
            MesActivities.plc_command,
            PlcCommand(self._dispatch, command),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=10)),
        )

    async def _record(self, state: str, actor: str, reason: str | None) -> None:
        await workflow.execute_activity_method(
            MesActivities.set_job_state,
            JobStateChange(self._job_id, state, actor, reason),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        self._state = state


@workflow.defn
class ProductionOrderWorkflow:
    """One ERP production order: plan its job orders, run them along the routing, finish;
    meanwhile report every state change of the order back to its ERP."""

    def __init__(self) -> None:
        self._report = True  # the order was just released: that is news for the ERP
        self._closing = False

    @workflow.signal
    def report(self) -> None:
        """The order's state changed: deliver the new ERP message(s)."""
        self._report = True

    async def _reporter(self, order_id: int) -> None:
        """Deliver ERP messages one batch at a time, so they arrive in order; the order
        workflow ends only when the ERP has every message."""
        while True:
            await workflow.wait_condition(lambda: self._report or self._closing)
            if not self._report:
                return
            self._report = False
            await workflow.execute_activity_method(
                MesActivities.deliver_reports,
                order_id,
                start_to_close_timeout=timedelta(minutes=5),
                # It heartbeats per message and while the ERP answers: a lost worker is
                # noticed in 30 s, not after the 5 minutes.
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RETRY,
            )

    @workflow.run
    async def run(self, order: OrderInput) -> OrderOutcome:
        reporter = asyncio.create_task(self._reporter(order.order_id))
        job_ids: list[str] = await workflow.execute_activity_method(
            MesActivities.plan_order,
            order.order_id,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        # Every step's workflow exists from now on, so any work order can be steered.
        jobs = [
            await workflow.start_child_workflow(
                JobOrderWorkflow.run, JobInput(order.order_id, job_id), id=job_workflow_id(job_id)
            )
            for job_id in job_ids
        ]
        state: str = COMPLETED
        lots: list[str] = []
        for step, job in enumerate(jobs, start=1):
            await job.signal(JobOrderWorkflow.release)
            outcome = await job
            if outcome.state != COMPLETED:
                state = outcome.state
                for rest in jobs[step:]:
                    # A later step a supervisor already cancelled has ended: nothing to tell.
                    with contextlib.suppress(Exception):
                        await rest.signal(
                            JobOrderWorkflow.cancel_remaining,
                            f"step {step} ended {outcome.state}",
                        )
                for rest in jobs[step:]:
                    await rest
                break
            lots = outcome.produced_lots
        final_state, late = await workflow.execute_activity_method(
            MesActivities.complete_order,
            args=[order.order_id, state],
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        self._report = True
        self._closing = True
        await reporter
        await workflow.wait_condition(workflow.all_handlers_finished)
        return OrderOutcome(
            order.order_number, final_state, late, lots if state == COMPLETED else []
        )


def _reason(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}"
    return str(cause or error)
