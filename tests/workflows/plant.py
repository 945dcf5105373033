"""The in-memory plant and the rig for the workflow tests: no database, no PLC, seconds.

The real ``ProductionOrderWorkflow`` and ``JobOrderWorkflow`` run on the Temporal dev server
(see ``conftest.py``); every activity is a stand-in of :class:`FakePlant`, registered under
the real activity name. The plant records every call and plays one PLC that follows the
OPC 10031-4 job state machine as the simulator does: a command the job's state does not
allow is refused, and ``plc_command`` answers, like the real activity, the job's state
afterwards (``GONE`` when the PLC does not hold it). Each test scripts what the machine does
and asserts what the workflows decided, answered, sent and recorded, in which order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.workflow import UpdateMethodMultiParam

from mes.machines import JobOrderData, JobState
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow
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
)

T = TypeVar("T")
#: A job workflow update by method reference (hold, resume, cancel, change).
SupervisorUpdate = UpdateMethodMultiParam[[JobOrderWorkflow, WorkOrderCommand], WorkOrderStatus]

UNIT = "FILL-1"
PRIORITY = 500
TIMEOUT_S = 10.0
#: An update that never waits on a machine answers within this (a loaded machine included).
PROMPT_S = 3.0
SUPERVISOR = "sup"
ERP = "erp"

NOT_ALLOWED, ALLOWED = JobState.NOT_ALLOWED_TO_START, JobState.ALLOWED_TO_START
RUNNING, INTERRUPTED = JobState.RUNNING, JobState.INTERRUPTED
ENDED, ABORTED = JobState.ENDED, JobState.ABORTED

# What the machine does on its own, and from which states (a unit starts a job it is
# allowed to start, ends or aborts a running one).
_MACHINE_FROM: dict[JobState, tuple[JobState, ...]] = {
    RUNNING: (ALLOWED,),
    INTERRUPTED: (RUNNING,),
    ENDED: (RUNNING,),
    ABORTED: (RUNNING, INTERRUPTED),
}
# Job-control methods: the states that accept them and the state they lead to (None: the
# job leaves the PLC's list). As in adapters/opcua/simulator.py.
_NOT_FINAL = (NOT_ALLOWED, ALLOWED, RUNNING, INTERRUPTED)
_COMMANDS: dict[str, tuple[tuple[JobState, ...], JobState | None]] = {
    "start": ((NOT_ALLOWED,), ALLOWED),
    "revoke_start": ((ALLOWED,), NOT_ALLOWED),
    "pause": ((RUNNING,), INTERRUPTED),
    "resume": ((INTERRUPTED,), RUNNING),
    "abort": (_NOT_FINAL, ABORTED),
    "cancel": ((NOT_ALLOWED, ALLOWED), None),
    "clear": ((ENDED, ABORTED), None),
}
_UPDATABLE = (NOT_ALLOWED, ALLOWED)
#: The activities that talk to the PLC (``FakePlant.down`` makes them fail retryably).
PLC_ACTIVITIES = ("plc_room", "dispatch_job", "await_job", "plc_command", "record_job_response")


@dataclass(frozen=True)
class Call:
    """One activity call: its name, the job order (if any) and one telling detail."""

    activity: str
    job: str = ""
    detail: str = ""


@dataclass
class FakePlant:
    """The MES's side effects in memory: database records and one PLC for all jobs.

    Scripting: ``moves`` are the machine's next own moves per job (taken while a workflow
    follows the job: ``run`` queues start and end), ``machine`` moves a job at once,
    ``lose`` makes the PLC forget it; ``max_jobs`` is the PLC's capacity; ``down`` names
    PLC activities that find the PLC unreachable (retryable, retried every 50 ms);
    ``*_errors`` make an activity fail; ``gate`` holds an activity call until released.
    """

    steps: int = 3
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    late: bool = False
    #: False: Abort is accepted but the PLC reports Aborted only when ``machine`` says so.
    abort_reported_at_once: bool = True
    #: MaxDownloadableJobOrders (None: no limit published).
    max_jobs: int | None = None
    down: set[str] = field(default_factory=set)
    change_error: ApplicationError | None = None
    #: Raised once each (the next attempt, after a resume, succeeds).
    prepare_errors: dict[str, ApplicationError] = field(default_factory=dict)
    #: Raised in turn, one per attempt; further attempts succeed.
    dispatch_errors: dict[str, list[ApplicationError]] = field(default_factory=dict)
    #: Raised once each, by the next await_job of the job.
    await_errors: dict[str, ApplicationError] = field(default_factory=dict)
    #: Raised once each, by the next record_job_response of the job.
    record_errors: dict[str, ApplicationError] = field(default_factory=dict)
    #: Jobs whose next recorded response fails a test (the job is held on a nonconformance).
    out_of_spec: set[str] = field(default_factory=set)
    #: Per job, what its next preparations wait for (one entry per preparation).
    material_waits: dict[str, list[str]] = field(default_factory=dict)
    dispositions: list[DispositionCommand] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    plc: dict[str, JobState] = field(default_factory=dict)
    #: Every job the PLC stored (StoreAndStart), in order, repeats included.
    stored: list[str] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    commands: list[PlcCommand] = field(default_factory=list)
    state_changes: list[JobStateChange] = field(default_factory=list)
    changes: list[JobChange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order_id = int(self.tag, 16) % 1_000_000_000
        self.order_number = f"PO-{self.tag}"
        self.jobs = [f"JO-{self.tag}-{n}" for n in range(1, self.steps + 1)]
        self.priority = dict.fromkeys(self.jobs, PRIORITY)
        self.equipment = dict.fromkeys(self.jobs, UNIT)
        self.moves: dict[str, list[JobState]] = {j: [] for j in self.jobs}
        self._gates: dict[Call, asyncio.Event] = {}
        self._changed = asyncio.Condition()

    # --- scripting and reading, for the tests -------------------------------------------

    def gate(self, activity_name: str, job: str = "", detail: str = "") -> asyncio.Event:
        """Hold that call (once logged) until the returned event is set."""
        event = asyncio.Event()
        self._gates[Call(activity_name, job, detail)] = event
        return event

    async def run(self, *jobs: str) -> None:
        """The machine will start and end these jobs as soon as it may."""
        async with self._changed:
            for job in jobs:
                self.moves.setdefault(job, []).extend([RUNNING, ENDED])
            self._changed.notify_all()

    async def machine(self, job: str, state: JobState) -> None:
        """The machine puts the job in ``state`` now."""
        async with self._changed:
            assert job in self.plc, f"{job} is not on the PLC"
            self.plc[job] = state
            self._changed.notify_all()

    async def lose(self, job: str) -> None:
        """The PLC forgets the job (a restart)."""
        async with self._changed:
            del self.plc[job]
            self._changed.notify_all()

    def names(self, job: str) -> list[str]:
        return [c.activity for c in self.calls if c.job == job]

    def plc_commands(self, job: str) -> list[str]:
        return [c.detail for c in self.calls if c.activity == "plc_command" and c.job == job]

    def recorded(self, job: str) -> list[tuple[str, str, str | None]]:
        """The supervisor/system state changes recorded for the job: (state, actor, reason)."""
        return [(s.state, s.actor, s.reason) for s in self.state_changes if s.job_order_id == job]

    def index(self, call: Call) -> int:
        return self.calls.index(call)

    def count(self, activity_name: str, job: str = "") -> int:
        return sum(1 for c in self.calls if c.activity == activity_name and c.job == job)

    # --- the stand-in activities --------------------------------------------------------

    def activities(self) -> Sequence[Callable[..., Any]]:
        return [
            self.plan_order,
            self.prepare_job,
            self.plc_room,
            self.dispatch_job,
            self.await_job,
            self.record_job_response,
            self.complete_order,
            self.plc_command,
            self.set_job_state,
            self.change_job,
            self.deliver_reports,
            self.dispose_nonconformance,
        ]

    async def _enter(self, call: Call) -> None:
        """Log the call, wait at its gate (heartbeating, so a cancel reaches the attempt),
        and fail it if the PLC is down for it."""
        self.calls.append(call)
        gate = self._gates.get(call)
        if gate is not None:
            await self._wait(gate)
        if call.activity in self.down:
            raise ApplicationError(
                "PLC unreachable",
                type="MachineUnreachableError",
                next_retry_delay=timedelta(milliseconds=50),
            )

    @staticmethod
    async def _wait(gate: asyncio.Event) -> None:
        while not gate.is_set():
            activity.heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), 0.05)

    @activity.defn(name="plan_order")
    async def plan_order(self, order_id: int) -> list[str]:
        assert order_id == self.order_id
        await self._enter(Call("plan_order", "", str(order_id)))
        return list(self.jobs)

    @activity.defn(name="prepare_job")
    async def prepare_job(self, job_order_id: str) -> Dispatch:
        await self._enter(Call("prepare_job", job_order_id))
        if job_order_id in self.prepare_errors:
            raise self.prepare_errors.pop(job_order_id)
        order = JobOrderData(
            job_order_id=job_order_id,
            work_master_id="WM-FILL",
            description=f"{self.order_number} {job_order_id}",
            priority=self.priority.get(job_order_id, PRIORITY),
            equipment_id=self.equipment.get(job_order_id, UNIT),
        )
        waits = self.material_waits.get(job_order_id)
        waiting_for = waits.pop(0) if waits else ""
        dispatch = Dispatch("opcua", "opc.tcp://fake-plc:4840/", "unit-1", order, waiting_for)
        if not waiting_for:  # as the real one: the PLC's room with the job it may send
            dispatch.room = PlcRoom(self.max_jobs, len(self.plc))
        return dispatch

    @activity.defn(name="plc_room")
    async def plc_room(self, dispatch: Dispatch) -> PlcRoom:
        await self._enter(Call("plc_room", dispatch.order.job_order_id))
        return PlcRoom(self.max_jobs, len(self.plc))

    @activity.defn(name="dispatch_job")
    async def dispatch_job(self, dispatch: Dispatch) -> None:
        job = dispatch.order.job_order_id
        try:
            await self._enter(Call("dispatch_job", job))
            errors = self.dispatch_errors.get(job)
            if errors:
                raise errors.pop(0)
            async with self._changed:
                if job not in self.plc:  # StoreAndStart; a retry finds it stored
                    self.plc[job] = ALLOWED
                    self.stored.append(job)
                self._changed.notify_all()
            self.dispatches.append(dispatch)
            # Stored, the reply not yet back (a gate here: the cancel finds it on the PLC).
            gate = self._gates.get(Call("dispatch_job", job, "stored"))
            if gate is not None:
                await self._wait(gate)
        except asyncio.CancelledError:
            self.calls.append(Call("dispatch_job", job, "cancelled"))
            raise

    @activity.defn(name="await_job")
    async def await_job(self, wait: WaitArgs) -> int:
        job = wait.dispatch.order.job_order_id
        known = JobState(wait.known)
        await self._enter(Call("await_job", job, known.name))
        if job in self.await_errors:
            raise self.await_errors.pop(job)
        try:
            while True:
                async with self._changed:
                    state = self.plc.get(job)
                    moves = self.moves.get(job, [])
                    if state == known and moves and state in _MACHINE_FROM[moves[0]]:
                        state = self.plc[job] = moves.pop(0)
                        self._changed.notify_all()
                    if state is not None and state != known:
                        return int(state)
                    if state is None:
                        break
                    activity.heartbeat(int(state))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.05)
        except asyncio.CancelledError:
            self.calls.append(Call("await_job", job, "cancelled"))
            raise
        raise ApplicationError(
            f"unknown job order {job}", type="UnknownJobOrderError", non_retryable=True
        )

    @activity.defn(name="record_job_response")
    async def record_job_response(self, dispatch: Dispatch) -> JobOutcome:
        job = dispatch.order.job_order_id
        await self._enter(Call("record_job_response", job))
        if job in self.record_errors:
            raise self.record_errors.pop(job)
        state = self.plc[job]
        assert state.is_final, f"job response of {job} asked in state {state.name}"
        if state == ENDED and job in self.out_of_spec:
            self.out_of_spec.discard(job)
            return JobOutcome(job, "Held", [f"LOT-{job}"], f"quality hold: NC-LOT-{job}-1")
        if state == ENDED:
            return JobOutcome(job, "Completed", [f"LOT-{job}"])
        return JobOutcome(job, "Aborted", [])

    @activity.defn(name="complete_order")
    async def complete_order(self, order_id: int, state: str) -> tuple[str, bool]:
        assert order_id == self.order_id
        await self._enter(Call("complete_order", "", state))
        return state, self.late

    @activity.defn(name="plc_command")
    async def plc_command(self, cmd: PlcCommand) -> int:
        """As the real activity: a command the job's state refuses (or for a job the PLC
        does not hold) is no error; the answer is the job's state afterwards, or GONE."""
        job = cmd.dispatch.order.job_order_id
        await self._enter(Call("plc_command", job, cmd.command))
        self.commands.append(cmd)
        async with self._changed:
            state = self.plc.get(job)
            if state is None:
                return GONE
            if cmd.command == "update":
                accepted: tuple[JobState, ...] = _UPDATABLE
                after: JobState | None = state
            else:
                accepted, after = _COMMANDS[cmd.command]
            if state not in accepted:
                return int(state)  # InvalidJobOrderStatus, swallowed
            if after is None:
                del self.plc[job]
            elif cmd.command != "abort" or self.abort_reported_at_once:
                self.plc[job] = after
            self._changed.notify_all()
            return int(self.plc.get(job, GONE))

    @activity.defn(name="set_job_state")
    async def set_job_state(self, change: JobStateChange) -> None:
        await self._enter(Call("set_job_state", change.job_order_id, change.state))
        self.state_changes.append(change)

    @activity.defn(name="change_job")
    async def change_job(self, change: JobChange) -> None:
        await self._enter(Call("change_job", change.job_order_id))
        if self.change_error is not None:
            raise self.change_error
        self.changes.append(change)
        if change.priority is not None:
            self.priority[change.job_order_id] = change.priority
        if change.equipment is not None:
            self.equipment[change.job_order_id] = change.equipment

    @activity.defn(name="dispose_nonconformance")
    async def dispose_nonconformance(self, cmd: DispositionCommand) -> DispositionOutcome:
        job = cmd.nonconformance.removeprefix("NC-LOT-").removesuffix("-1")
        await self._enter(Call("dispose_nonconformance", job, cmd.disposition))
        self.dispositions.append(cmd)
        if cmd.disposition == "scrap":
            return DispositionOutcome("Aborted")
        if cmd.disposition == "rework":
            return DispositionOutcome("Completed", f"{job}-RW1")
        return DispositionOutcome("Completed")

    @activity.defn(name="deliver_reports")
    async def deliver_reports(self, order_id: int) -> int:
        assert order_id == self.order_id
        await self._enter(Call("deliver_reports"))
        return 1


# --- the rig: one worker and task queue per test ------------------------------------------


@dataclass
class Rig:
    client: Client
    task_queue: str
    plant: FakePlant
    started: list[WorkflowHandle[Any, Any]] = field(default_factory=list)

    async def start_order(self) -> WorkflowHandle[ProductionOrderWorkflow, OrderOutcome]:
        handle = await self.client.start_workflow(
            ProductionOrderWorkflow.run,
            OrderInput(self.plant.order_id, self.plant.order_number),
            id=f"order-{self.plant.order_number}",
            task_queue=self.task_queue,
            execution_timeout=timedelta(minutes=2),
        )
        self.started.append(handle)
        return handle

    async def start_job(self, job: str) -> WorkflowHandle[JobOrderWorkflow, JobOutcome]:
        """A job workflow on its own (no order workflow as parent)."""
        handle = await self.client.start_workflow(
            JobOrderWorkflow.run,
            JobInput(self.plant.order_id, job),
            id=f"job-{job}",
            task_queue=self.task_queue,
            execution_timeout=timedelta(minutes=2),
        )
        self.started.append(handle)
        return handle

    def job(self, job: str) -> WorkflowHandle[JobOrderWorkflow, JobOutcome]:
        return self.client.get_workflow_handle_for(JobOrderWorkflow.run, f"job-{job}")

    async def status(
        self, job: str, until: Callable[[WorkOrderStatus], bool] = lambda s: True
    ) -> WorkOrderStatus:
        """The job's status once ``until`` holds (bounded poll of the status query)."""
        handle = self.job(job)
        last: WorkOrderStatus | None = None
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while True:
            with contextlib.suppress(RPCError):  # not started yet
                last = await handle.query(JobOrderWorkflow.status)
                if until(last):
                    return last
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{job}: status condition not met, last status {last}")
            await asyncio.sleep(0.02)

    async def following(self, job: str, plc_state: JobState = ALLOWED) -> WorkOrderStatus:
        """The job's status once its workflow follows it on the PLC in ``plc_state``
        (waits on the plant, then asks the workflow once)."""
        await until(
            lambda: Call("await_job", job, plc_state.name) in self.plant.calls,
            f"{job} followed in {plc_state.name}",
        )
        return await self.status(job)

    async def state(self, job: str, state: str) -> WorkOrderStatus:
        """The job's status once it is in ``state``; for a state the workflow records itself
        (Held, Cancelled), once the record is made too (the workflow's own view changes
        first, the database's just after)."""
        status = await self.status(job, lambda s: s.state == state)
        if state in ("Held", "Cancelled"):
            await until(
                lambda: [r[0] for r in self.plant.recorded(job)][-1:] == [state],
                f"{job} recorded {state}",
            )
        return status

    async def settled(self, job: str) -> WorkOrderStatus:
        """The job's status once nothing decided is left to do on its PLC."""
        return await self.status(job, lambda s: not s.pending_on_machine)

    async def update(
        self, job: str, update: SupervisorUpdate, cmd: WorkOrderCommand
    ) -> WorkOrderStatus:
        """Run a supervisor update; it never waits on a machine, so it answers promptly."""
        result: WorkOrderStatus = await asyncio.wait_for(
            self.job(job).execute_update(update, cmd), PROMPT_S
        )
        return result

    async def cancel_order(
        self, order: WorkflowHandle[ProductionOrderWorkflow, OrderOutcome], reason: str
    ) -> OrderStatus:
        result: OrderStatus = await asyncio.wait_for(
            order.execute_update(ProductionOrderWorkflow.cancel, OrderCommand(ERP, reason)),
            PROMPT_S,
        )
        return result


async def finished(handle: WorkflowHandle[Any, T]) -> T:
    return await asyncio.wait_for(handle.result(), TIMEOUT_S)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until ``condition`` holds."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def signal_handled(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """Wait until the workflow has received signal ``name`` and run a task after it."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        seen = False
        async for event in handle.fetch_history_events():
            if (
                event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                and event.workflow_execution_signaled_event_attributes.signal_name == name
            ):
                seen = True
            elif seen and event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"signal {name} not handled by {handle.id}")
        await asyncio.sleep(0.02)


def cmd(
    reason: str | None = None, priority: int | None = None, equipment: str | None = None
) -> WorkOrderCommand:
    return WorkOrderCommand(SUPERVISOR, reason, priority, equipment)


def refusal(error: WorkflowUpdateFailedError) -> ApplicationError:
    assert isinstance(error.cause, ApplicationError), repr(error.cause)
    return error.cause


def lost(job: str, during: str) -> str:
    """The reason a job is held with when its PLC no longer holds it."""
    return (
        f"the PLC no longer holds job {job} (lost during {during}, e.g. a restart); "
        "resume sends it again, cancel ends it"
    )


WAITING_ACTIONS = ["hold", "cancel", "priority", "equipment"]
READY_ACTIONS = ["hold", "cancel", "priority"]
RUNNING_ACTIONS = ["hold", "cancel"]
HELD_DISPATCHED_ACTIONS = ["resume", "cancel", "priority"]
HELD_WAITING_ACTIONS = ["resume", "cancel", "priority", "equipment"]
#: What a job that ran to its end did, activity by activity.
RAN = [
    "prepare_job",
    "dispatch_job",
    "await_job",
    "await_job",
    "record_job_response",
    "plc_command",
]
