"""The workflows of one production order: the order, and one child per job order.

Workflow code is deterministic: every side effect (database, PLC) is an activity in
``workflows.activities``. Workflow ids come from ``workflows.types`` (``order-<ERP order
number>``, ``job-<JobOrderID>``), so a duplicate post or a retried start cannot run anything
twice.

Every job workflow starts when the order is planned and waits for its turn (the order
workflow releases the steps one after another, and ends each one it does not release with
``cancel_remaining``), so a supervisor can steer any work order, queued or running, through
the same Temporal updates: hold, resume, cancel, priority and equipment.

**Steering never waits on a machine.** An update checks ``mes.states.allowed_actions``,
records the decision (the work order's state, with its audit event) and answers; the job's
main line carries the decision out on the PLC when it can, reconciling what the supervisor
wants with what the PLC reports: a queued job is revoked or removed, a running one paused or
aborted, a cancel that finds the job started becomes Abort. What is decided but not yet done
on the machine is in the status (``pending_on_machine``).

**Nothing is stranded.** A job that its PLC lost (a restart), or whose step failed for good,
is put on hold with the reason; a supervisor's resume sends it again, a cancel ends it. A
finished job is cleared from its PLC once its response is recorded, and dispatch waits while
the PLC is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from mes.machines import JobState
    from mes.states import RequestState, allowed_actions, is_final
    from workflows.activities import MesActivities
    from workflows.types import (
        GONE,
        Dispatch,
        DispositionCommand,
        DispositionOutcome,
        JobChange,
        JobInput,
        JobOutcome,
        JobStateChange,
        OrderCommand,
        OrderInput,
        OrderOutcome,
        OrderStatus,
        PlcCommand,
        PlcRoom,
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
#: backoff (up to 30 s between tries), never given up on by timeout alone.
STEP_TIMEOUT = timedelta(seconds=60)
RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))
#: A PLC that is back is found within a few seconds, so what waits on it (a cancel, say)
#: is carried out before the machine does anything else.
PLC_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=5)
)
#: Activities that talk to a PLC heartbeat, so a lost worker is noticed in seconds.
PLC_HEARTBEAT = timedelta(seconds=30)
#: How often a job waiting for room on a full PLC looks again (grows to the maximum).
ROOM_POLL = (timedelta(milliseconds=250), timedelta(seconds=3))

#: The PLC states in which the job has not started (it can still be removed by Cancel).
_NOT_STARTED = (JobState.NOT_ALLOWED_TO_START, JobState.ALLOWED_TO_START)


class NotAllowed(ApplicationError):
    """An action the work order's state does not allow (the API answers 409)."""

    def __init__(self, action: str, state: str, allowed: list[str]) -> None:
        super().__init__(
            f"{action} is not allowed for a work order in state {state}",
            {"state": state, "allowed_actions": allowed},
            type="NotAllowed",
            non_retryable=True,
        )


class _Attention(Exception):
    """A step failed for good: the job is held with this reason until a supervisor acts."""


@workflow.defn
class JobOrderWorkflow:
    """One job order on one work unit: wait for its turn, dispatch, follow the machine,
    record, clear; steered meanwhile by supervisor updates that never wait on the machine."""

    def __init__(self) -> None:
        self._job_id = ""
        self._state: str = WAITING  # the work order's ISA-95 state, as recorded
        self._held_from: str = WAITING
        self._released = False  # the order workflow said: your turn
        self._parent_word = False  # the order workflow said release or cancel_remaining
        self._cancel_reason: str | None = None  # a cancel decided, not yet carried out
        self._cancel_actor = "system"
        self._dispatch: Dispatch | None = None
        self._on_plc = False  # the job was stored on its PLC (and not withdrawn since)
        self._sending = False  # a dispatch attempt is under way
        self._plc_state = JobState.NOT_ALLOWED_TO_START
        self._update_plc = False  # a new priority or recipe to send to the PLC
        self._changed = False  # the order changed: prepare the job again
        self._refused: tuple[str, int] | None = None  # a command the PLC refused in that state
        self._intent = 0  # bumped by every decision, so waits notice
        self._note = ""
        # A quality hold: the reason (a lot out of specification) until a supervisor
        # disposes of it; the disposition once recorded.
        self._quality: str | None = None
        self._recording = False  # the job response is being recorded
        self._disposing = False
        self._disposed: DispositionOutcome | None = None
        # Known once the job is prepared for its PLC (the database has them before).
        self._priority: int | None = None
        self._equipment: str | None = None

    # --- the main line --------------------------------------------------------------------

    @workflow.run
    async def run(self, job: JobInput) -> JobOutcome:
        self._job_id = job.job_order_id
        outcome = await self._run()
        self._state = outcome.state
        self._note = ""
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome

    async def _run(self) -> JobOutcome:
        while True:
            # Off the PLC: wait for our turn (not held), or a cancel.
            await workflow.wait_condition(
                lambda: (
                    self._cancel_reason is not None or (self._released and self._state == WAITING)
                )
            )
            if self._cancel_reason is not None:
                if self._on_plc:
                    # Held for attention while on its PLC: withdraw it there first (if the
                    # PLC fails for good again, the job ends Cancelled all the same).
                    with contextlib.suppress(_Attention):
                        outcome = await self._follow()
                        if outcome is not None:
                            return outcome
                return await self._cancelled()
            try:
                # A job the PLC has ended but whose response could not be recorded is not
                # sent again: resuming it records the response.
                ended = self._on_plc and self._plc_state.is_final
                if not ended and not await self._send():
                    continue  # held or cancelled before it reached the PLC
                outcome = await self._follow()
            except _Attention as e:
                await self._needs_attention(str(e))
                continue
            if outcome is not None:
                return outcome

    async def _cancelled(self) -> JobOutcome:
        """End Cancelled, once the order workflow has had its word (so it can still signal)."""
        reason = self._cancel_reason or "cancelled"
        if self._state != CANCELLED:
            await self._record(CANCELLED, self._cancel_actor, reason)
        await workflow.wait_condition(lambda: self._parent_word)
        return JobOutcome(self._job_id, CANCELLED, [], reason)

    async def _send(self) -> bool:
        """Prepare (once), wait for room on the PLC, dispatch. False when a hold or cancel
        came first and nothing is on the PLC."""
        poll = ROOM_POLL[0]
        fresh: PlcRoom | None = None  # the PLC's room as preparing found it, not used yet
        while True:
            if self._stopped():
                self._note = ""
                return False
            if self._changed:
                self._changed, self._dispatch = False, None
            if self._dispatch is None:  # not prepared yet, or changed since
                try:
                    self._dispatch = await self._activity(MesActivities.prepare_job, self._job_id)
                except ActivityError as e:
                    raise _Attention(f"prepare failed: {_reason(e)}") from e
                self._priority = self._dispatch.order.priority
                self._equipment = self._dispatch.order.equipment_id
                fresh = self._dispatch.room
                continue
            dispatch = self._dispatch
            if dispatch.waiting_for:
                # Its material is not Released (a quality hold) and no other lot is: look
                # again later (prepared anew, so a lot released meanwhile is taken).
                self._note = dispatch.waiting_for
                self._dispatch = None
            else:
                try:
                    room: PlcRoom = fresh or await self._activity(
                        MesActivities.plc_room, dispatch, plc=True
                    )
                except ActivityError as e:
                    raise _Attention(f"asking the PLC for room failed: {_reason(e)}") from e
                fresh = None
                if self._stopped():
                    self._note = ""
                    return False
                if self._dispatch is not dispatch:
                    continue  # changed meanwhile: send the job as it is now
                if not room.full:
                    sent = await self._dispatch_now(dispatch)
                    if sent is not None:
                        return sent
                    # Another job took the last place first: wait for room again.
                self._note = f"Queued: PLC full ({room.job_orders}/{room.max_job_orders} jobs)"
            seen = self._intent
            # Jittered, so the jobs waiting for one PLC do not all ask at once.
            wait = poll * (0.75 + 0.5 * workflow.random().random())
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(partial(self._decided_since, seen), timeout=wait)
            poll = min(poll * 1.5, ROOM_POLL[1])

    async def _dispatch_now(self, dispatch: Dispatch) -> bool | None:
        """Send the job; True once it is on the PLC (or may be, when a cancel interrupted
        the sending), None when the PLC had no room after all."""
        self._note = "dispatching"
        handle = workflow.start_activity_method(
            MesActivities.dispatch_job,
            dispatch,
            start_to_close_timeout=STEP_TIMEOUT,
            heartbeat_timeout=PLC_HEARTBEAT,
            retry_policy=PLC_RETRY,
            # A cancelled attempt may still have reached the PLC: wait for it to end, then
            # withdraw whatever is there.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._sending = True
        try:
            await workflow.wait_condition(lambda: handle.done() or self._cancel_reason is not None)
            if not handle.done():
                handle.cancel()
            await handle
        except ActivityError as e:
            if self._cancel_reason is None:
                if _error_type(e) == "PlcFull":
                    return None
                raise _Attention(f"dispatch failed: {_reason(e)}") from e
            # Cancelled on the way: the job may or may not have reached the PLC.
            self._on_plc = True
            self._plc_state = JobState.ALLOWED_TO_START
            self._note = ""
            return True
        finally:
            self._sending = False
        self._note = ""
        self._on_plc = True
        self._plc_state = JobState.ALLOWED_TO_START
        if self._state == WAITING:
            self._state = READY
        elif self._state == HELD and self._held_from == WAITING:
            self._held_from = READY  # held while dispatching: revoked below, Ready on resume
        return True

    async def _follow(self) -> JobOutcome | None:
        """Follow the job on its PLC to its end, carrying out the supervisor's decisions.

        Returns the outcome, or None when the job is off the PLC again (lost, withdrawn for
        a resume) and must be sent again.
        """
        dispatch = self._dispatch
        assert dispatch is not None
        while not self._plc_state.is_final:
            if self._changed:
                self._changed = False
                if self._plc_state in _NOT_STARTED:
                    # Queued on the PLC, not started: send it as it is now.
                    self._dispatch = dispatch = await self._activity(
                        MesActivities.prepare_job, self._job_id
                    )
                    self._update_plc = True
            command = self._next_command()
            if command is not None:
                before = self._plc_state
                after = await self._plc(command)
                if command == "update":
                    self._update_plc = False
                if after == GONE:
                    return await self._off_plc(command)
                self._plc_state = JobState(after)
                if self._plc_state == before and command != "update":
                    self._refused = (command, int(before))
                self._note_running()
                continue
            seen = self._intent
            waiting = workflow.start_activity_method(
                MesActivities.await_job,
                WaitArgs(dispatch, int(self._plc_state)),
                # A job may run for days; the heartbeat, not the timeout, finds a lost worker.
                start_to_close_timeout=timedelta(days=7),
                heartbeat_timeout=PLC_HEARTBEAT,
                retry_policy=PLC_RETRY,
            )
            await workflow.wait_condition(partial(self._decided_since, seen, waiting))
            if not waiting.done():
                waiting.cancel()  # a decision to carry out: stop waiting, act, wait again
                with contextlib.suppress(ActivityError, asyncio.CancelledError):
                    await waiting
                continue
            try:
                self._plc_state = JobState(await waiting)
            except ActivityError as e:
                if _error_type(e) == "UnknownJobOrderError":
                    return await self._off_plc("wait")
                raise _Attention(f"following the job failed: {_reason(e)}") from e
            self._refused = None
            started = self._state == READY and self._plc_state == JobState.RUNNING
            self._note_running()
            if started:
                await self._tell_order()  # the order may be Running now: that is news

        # While the response is recorded, a disposition may already find the hold in the
        # database: it waits for the outcome here (``dispose``).
        self._recording = True
        try:
            outcome: JobOutcome = await self._activity(MesActivities.record_job_response, dispatch)
        except ActivityError as e:
            # Ended, but the PLC forgot the job (a restart) before its response was read:
            # lost like any other job, not a failed workflow that strands the order.
            if _error_type(e) == "UnknownJobOrderError":
                return await self._off_plc("record")
            raise _Attention(f"recording the job response failed: {_reason(e)}") from e
        finally:
            self._recording = False
        if outcome.state == HELD:
            self._state = HELD
            self._quality = self._note = outcome.reason
        # Recorded: now the PLC may forget it (it takes room until cleared). A clear that
        # fails leaves an ended job on the PLC, never the outcome in doubt.
        with contextlib.suppress(_Attention):
            await self._plc("clear")
        self._on_plc = False
        if outcome.state == HELD:
            return await self._quality_hold(outcome)
        return outcome

    async def _quality_hold(self, outcome: JobOutcome) -> JobOutcome:
        """A test failed: the lot is Restricted and the job Held (recorded with the
        response) until a supervisor disposes of the lot; release and rework complete the
        job (a rework goes on in a new job order), scrap aborts it; a cancel ends it."""
        await workflow.wait_condition(
            lambda: self._disposed is not None or self._cancel_reason is not None
        )
        self._note = ""
        if self._disposed is None:
            return await self._cancelled()
        done = self._disposed
        kept = done.job_state == COMPLETED and done.rework_job_order is None
        return JobOutcome(
            self._job_id,
            done.job_state,
            outcome.produced_lots if kept else [],
            outcome.reason,
            done.rework_job_order,
        )

    def _next_command(self) -> str | None:
        """The PLC command that brings the machine to what was decided, if any."""
        plc = self._plc_state
        if self._cancel_reason is not None:
            command = "cancel" if plc in _NOT_STARTED else "abort"
        elif self._state == HELD:
            command = {JobState.ALLOWED_TO_START: "revoke_start", JobState.RUNNING: "pause"}.get(
                plc, ""
            )
        else:
            command = {JobState.NOT_ALLOWED_TO_START: "start", JobState.INTERRUPTED: "resume"}.get(
                plc, ""
            )
        if not command and self._update_plc:
            command = "update"
        if not command or self._refused == (command, int(plc)):
            return None  # nothing to do, or the PLC refused it in this state: wait for a change
        return command

    async def _off_plc(self, during: str) -> JobOutcome | None:
        """The PLC no longer holds the job."""
        self._on_plc = False
        self._plc_state = JobState.NOT_ALLOWED_TO_START
        if self._cancel_reason is not None:
            return await self._cancelled()  # withdrawn, as decided
        await self._needs_attention(
            f"the PLC no longer holds job {self._job_id} (lost during {during}, e.g. a "
            "restart); resume sends it again, cancel ends it"
        )
        return None

    async def _needs_attention(self, reason: str) -> None:
        """Hold the job with the reason; a resume sends it again (Waiting), a cancel ends it."""
        self._note = f"needs attention: {reason}"
        self._held_from = WAITING
        if self._state != HELD:
            await self._record(HELD, "system", reason[:500])

    def _note_running(self) -> None:
        if self._plc_state == JobState.RUNNING and self._state == READY:
            self._state = RUNNING
        if self._state == HELD and self._held_from == READY and self._plc_state not in _NOT_STARTED:
            self._held_from = RUNNING  # it started before the hold reached the PLC

    async def _tell_order(self) -> None:
        """The machine started a job: the order may be Running now; its workflow reports."""
        parent = workflow.info().parent
        if parent is not None:
            await workflow.get_external_workflow_handle(parent.workflow_id).signal("report")

    # --- the order workflow's signals ---------------------------------------------------------

    @workflow.signal
    def release(self) -> None:
        """The previous step is done: this job may go to its PLC (unless held)."""
        self._released = True
        self._parent_word = True
        self._intent += 1

    @workflow.signal
    def order_changed(self) -> None:
        """The ERP changed the order (quantity, due, priority) before this job started: it
        is prepared again and, if already queued on its PLC, updated there."""
        if not is_final(self._state):
            self._changed = True
            self._intent += 1

    @workflow.signal
    def cancel_remaining(self, reason: str) -> None:
        """An earlier step ended without completing, or the order was cancelled: this job
        does not run (a job already sent is withdrawn from its PLC)."""
        self._parent_word = True
        if not is_final(self._state) and self._cancel_reason is None:
            self._cancel_reason = reason
            self._cancel_actor = "system"
            self._intent += 1

    @workflow.signal
    def cancel_by_order(self, cmd: WorkOrderCommand) -> None:
        """The whole order is cancelled: the running job is withdrawn or aborted."""
        if not is_final(self._state) and self._cancel_reason is None:
            self._cancel_reason = cmd.reason or f"order cancelled by {cmd.actor}"
            self._cancel_actor = cmd.actor
            self._intent += 1

    # --- supervisor updates ---------------------------------------------------------------

    @workflow.query
    def status(self) -> WorkOrderStatus:
        """The live state, the actions allowed now, and what is still to do on the PLC."""
        return WorkOrderStatus(
            self._job_id,
            self._state,
            self._priority,
            self._equipment,
            self._on_plc,
            [] if self._cancel_reason is not None else self._allowed(),
            self._pending(),
            self._note,
        )

    def _allowed(self) -> list[str]:
        if self._quality is not None:
            # Held on a nonconformance: its disposition moves the job on (or a cancel).
            return ["cancel"] if self._disposed is None else []
        sent = self._on_plc or self._dispatching()
        allowed = allowed_actions(self._state, sent)
        return [a for a in allowed if a != "equipment"] if sent else allowed

    def _decided_since(self, seen: int, activity: asyncio.Task[Any] | None = None) -> bool:
        """A new decision since ``seen`` (or the activity ended): time to look again."""
        return self._intent != seen or (activity is not None and activity.done())

    def _stopped(self) -> bool:
        """A decision came that keeps the job off its PLC for now."""
        return self._cancel_reason is not None or self._state != WAITING

    def _dispatching(self) -> bool:
        """A dispatch attempt is under way: the job may be reaching its PLC."""
        return self._sending

    def _pending(self) -> list[str]:
        if not self._on_plc:
            return ["cancel"] if self._cancel_reason is not None and self._dispatching() else []
        command = self._next_command()
        return [command] if command is not None else []

    def _check(self, action: str) -> None:
        allowed = [] if self._cancel_reason is not None else self._allowed()
        if action not in allowed:
            state = "Cancelling" if self._cancel_reason is not None else self._state
            raise NotAllowed(action, state, allowed)

    @workflow.update
    async def hold(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Hold: a running job pauses on its PLC (Interrupted), a queued one may not start."""
        self._check("hold")
        self._held_from = self._state
        await self._decide(HELD, cmd)
        return self.status()

    @hold.validator
    def _validate_hold(self, cmd: WorkOrderCommand) -> None:
        self._check("hold")

    @workflow.update
    async def resume(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Resume a held job where it was held (a job off its PLC is sent again)."""
        self._check("resume")
        self._note = ""
        await self._decide(self._held_from, cmd)
        return self.status()

    @resume.validator
    def _validate_resume(self, cmd: WorkOrderCommand) -> None:
        self._check("resume")

    @workflow.update
    async def cancel(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Cancel: a job not on its PLC ends Cancelled at once; one on its PLC is removed
        there (Cancel) or, if it started, aborted (Abort) as soon as the PLC can be reached."""
        self._check("cancel")
        self._cancel_reason = cmd.reason or f"cancelled by {cmd.actor}"
        self._cancel_actor = cmd.actor
        self._intent += 1
        if not self._on_plc and not self._dispatching():
            # Nothing on a machine: the decision is the whole of it.
            await self._record(CANCELLED, cmd.actor, self._cancel_reason)
        return self.status()

    @cancel.validator
    def _validate_cancel(self, cmd: WorkOrderCommand) -> None:
        self._check("cancel")

    @workflow.update
    async def change(self, cmd: WorkOrderCommand) -> WorkOrderStatus:
        """Change priority and/or target equipment (equipment only before dispatch)."""
        self._validate_change(cmd)
        await self._activity(
            MesActivities.change_job,
            JobChange(self._job_id, cmd.actor, cmd.reason, cmd.priority, cmd.equipment),
        )
        if cmd.priority is not None:
            self._priority = cmd.priority
        if cmd.equipment is not None:
            self._equipment = cmd.equipment
            self._dispatch = None  # prepared again for the new unit
            self._intent += 1
        if self._dispatch is not None and cmd.priority is not None:
            # The PLC picks its next job by priority: tell it (the main line sends it; a
            # dispatch in flight carries the old priority).
            self._dispatch = await self._activity(MesActivities.prepare_job, self._job_id)
            self._update_plc = self._on_plc or self._dispatching()
            self._intent += 1
        return self.status()

    @change.validator
    def _validate_change(self, cmd: WorkOrderCommand) -> None:
        if cmd.priority is None and cmd.equipment is None:
            raise ApplicationError("nothing to change", type="InvalidChange", non_retryable=True)
        if cmd.priority is not None:
            self._check("priority")
        if cmd.equipment is not None:
            self._check("equipment")

    @workflow.update
    async def dispose(self, cmd: DispositionCommand) -> WorkOrderStatus:
        """Record a supervisor's disposition of the nonconformance the job is held on; the
        job then ends as decided (and a rework goes on in its new job order)."""
        self._validate_dispose(cmd)
        self._disposing = True
        await workflow.wait_condition(lambda: not self._recording)
        if self._quality is None or self._cancel_reason is not None:
            self._disposing = False
            raise NotAllowed("disposition", self._state, self._allowed())
        try:
            done: DispositionOutcome = await self._activity(
                MesActivities.dispose_nonconformance, cmd
            )
        finally:
            self._disposing = False
        self._disposed = done
        self._state = done.job_state
        self._intent += 1
        return self.status()

    @dispose.validator
    def _validate_dispose(self, cmd: DispositionCommand) -> None:
        held = self._quality is not None or self._recording
        if not held or self._disposed is not None or self._disposing or self._cancel_reason:
            raise NotAllowed("disposition", self._state, self._allowed())

    async def _decide(self, state: str, cmd: WorkOrderCommand) -> None:
        """Take a decision now (so every later check sees it) and record it."""
        self._state = state
        self._refused = None
        self._intent += 1
        await self._record(state, cmd.actor, cmd.reason)

    # --- activities -----------------------------------------------------------------------

    async def _plc(self, command: str) -> int:
        """Carry out one command on the PLC (retried while it cannot be reached); the job's
        PLC state afterwards, or GONE."""
        assert self._dispatch is not None
        try:
            state: int = await self._activity(
                MesActivities.plc_command, PlcCommand(self._dispatch, command), plc=True
            )
        except ActivityError as e:
            raise _Attention(f"{command} on the PLC failed: {_reason(e)}") from e
        return state

    async def _record(self, state: str, actor: str, reason: str | None) -> None:
        self._state = state
        await self._activity(
            MesActivities.set_job_state, JobStateChange(self._job_id, state, actor, reason)
        )

    async def _activity(self, method: Any, arg: Any, *, plc: bool = False) -> Any:
        """Run a short activity to its end; ``plc``: one that talks to the PLC (retried
        often while the PLC cannot be reached). Only the long ones (dispatch, the wait)
        heartbeat: a short one that is slow under load must not time out for that."""
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=PLC_RETRY if plc else RETRY,
        )


@workflow.defn
class ProductionOrderWorkflow:
    """One ERP production order: plan its job orders, run them along the routing, finish;
    meanwhile report every state change of the order back to its ERP."""

    def __init__(self) -> None:
        self._report = True  # the order was just released: that is news for the ERP
        self._closing = False
        self._order_number = ""
        self._cancel: OrderCommand | None = None
        self._jobs: list[workflow.ChildWorkflowHandle[JobOrderWorkflow, JobOutcome]] = []
        self._step: int | None = None
        self._ended = False

    @workflow.signal
    def report(self) -> None:
        """The order's state changed: deliver the new ERP message(s)."""
        self._report = True

    @workflow.signal
    async def order_changed(self) -> None:
        """The ERP changed the order before it started: the steps not done are told."""
        first = (self._step or 1) - 1
        for job in self._jobs[first:]:
            # A step that ended this very moment has nothing to change.
            with contextlib.suppress(Exception):
                await job.signal(JobOrderWorkflow.order_changed)

    @workflow.query
    def status(self) -> OrderStatus:
        return OrderStatus(self._order_number, self._cancel is not None, self._step, self._ended)

    @workflow.update
    async def cancel(self, cmd: OrderCommand) -> OrderStatus:
        """Cancel the whole order: the step on a machine is withdrawn or aborted, the later
        ones never run, and the order ends Cancelled (Completed only if the last step had
        already finished). Answers at once; the machines follow."""
        self._validate_cancel(cmd)
        self._cancel = cmd
        if self._step is not None:
            # The step may have ended this very moment; then the main line sees the cancel.
            with contextlib.suppress(Exception):
                await self._jobs[self._step - 1].signal(
                    JobOrderWorkflow.cancel_by_order, WorkOrderCommand(cmd.actor, cmd.reason)
                )
        return self.status()

    @cancel.validator
    def _validate_cancel(self, cmd: OrderCommand) -> None:
        if self._ended or self._closing:
            raise NotAllowed("cancel", "ending", [])
        if self._cancel is not None:
            raise NotAllowed("cancel", "Cancelling", [])

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
        self._order_number = order.order_number
        reporter = asyncio.create_task(self._reporter(order.order_id))
        job_ids: list[str] = await workflow.execute_activity_method(
            MesActivities.plan_order,
            order.order_id,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        # Every step's workflow exists from now on, so any work order can be steered. Each
        # waits for this workflow's word (release or cancel_remaining) before it ends, so
        # signalling it never finds it gone.
        self._jobs = [
            await workflow.start_child_workflow(
                JobOrderWorkflow.run, JobInput(order.order_id, job_id), id=job_workflow_id(job_id)
            )
            for job_id in job_ids
        ]
        state: str = COMPLETED
        lots: list[str] = []
        for step, job in enumerate(self._jobs, start=1):
            if self._cancel is not None:
                state = CANCELLED
                await self._end_rest(step - 1, "order cancelled")
                break
            self._step = step
            await job.signal(JobOrderWorkflow.release)
            outcome = await job
            while outcome.rework is not None:
                # A nonconforming lot goes to rework: the step goes on in the new job order.
                job = await workflow.start_child_workflow(
                    JobOrderWorkflow.run,
                    JobInput(order.order_id, outcome.rework),
                    id=job_workflow_id(outcome.rework),
                )
                self._jobs[step - 1] = job
                await job.signal(JobOrderWorkflow.release)
                outcome = await job
            self._step = None
            if outcome.state != COMPLETED:
                state = CANCELLED if self._cancel is not None else outcome.state
                await self._end_rest(step, f"step {step} ended {outcome.state}")
                break
            lots = outcome.produced_lots
        final_state, late = await workflow.execute_activity_method(
            MesActivities.complete_order,
            args=[order.order_id, state],
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        self._ended = True
        self._report = True
        self._closing = True
        await reporter
        await workflow.wait_condition(workflow.all_handlers_finished)
        return OrderOutcome(
            order.order_number, final_state, late, lots if state == COMPLETED else []
        )

    async def _end_rest(self, done: int, reason: str) -> None:
        """Tell every step after ``done`` that it will not run, and wait for them to end."""
        rest = self._jobs[done:]
        for job in rest:
            await job.signal(JobOrderWorkflow.cancel_remaining, reason)
        for job in rest:
            await job


def _error_type(error: ActivityError) -> str:
    cause = error.cause
    return cause.type or "" if isinstance(cause, ApplicationError) else ""


def _reason(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}"
    return str(cause or error)
