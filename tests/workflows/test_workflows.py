"""The order and job workflows against an in-memory plant: no database, no PLC, seconds.

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.workflow import UpdateMethodMultiParam

from mes.machines import JobOrderData, JobState
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow
from workflows.types import (
    GONE,
    Dispatch,
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
                self.moves[job] += [RUNNING, ENDED]
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
            description=f"{self.order_number} step {self.jobs.index(job_order_id) + 1}",
            priority=self.priority[job_order_id],
            equipment_id=self.equipment[job_order_id],
        )
        return Dispatch("opcua", "opc.tcp://fake-plc:4840/", "unit-1", order)

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
        return await self.status(job, lambda s: s.state == state)

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


@pytest.fixture
def steps() -> int:
    """Routing steps of the test's order (override with ``parametrize("steps", ...)``)."""
    return 2


@pytest.fixture
async def rig(workflow_env: WorkflowEnvironment, steps: int) -> AsyncIterator[Rig]:
    plant = FakePlant(steps)
    task_queue = f"wf-test-{uuid.uuid4().hex}"
    worker = Worker(
        workflow_env.client,
        task_queue=task_queue,
        workflows=[ProductionOrderWorkflow, JobOrderWorkflow],
        activities=plant.activities(),
        # Not the default, a hash of the bytecode of every loaded module: seconds.
        build_id="workflow-tests",
        # Heartbeats go out at once, so a cancelled activity learns it promptly.
        max_heartbeat_throttle_interval=timedelta(milliseconds=100),
        default_heartbeat_throttle_interval=timedelta(milliseconds=100),
    )
    rig = Rig(workflow_env.client, task_queue, plant)
    async with worker:
        yield rig
        for handle in rig.started:  # a failed test leaves nothing running
            with contextlib.suppress(RPCError):
                await handle.terminate("test over")


WAITING_ACTIONS = ["hold", "cancel", "priority", "equipment"]
READY_ACTIONS = ["hold", "cancel", "priority"]
RUNNING_ACTIONS = ["hold", "cancel"]
HELD_DISPATCHED_ACTIONS = ["resume", "cancel", "priority"]
HELD_WAITING_ACTIONS = ["resume", "cancel", "priority", "equipment"]
#: What a job that ran to its end did, activity by activity.
RAN = [
    "prepare_job",
    "plc_room",
    "dispatch_job",
    "await_job",
    "await_job",
    "record_job_response",
    "plc_command",
]


# --- the happy path ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [3])
async def test_order_runs_steps_in_turn_and_completes(rig: Rig) -> None:
    plant = rig.plant
    j1, j2, j3 = plant.jobs
    plant.late = True
    await plant.run(j1, j2, j3)

    outcome = await finished(await rig.start_order())

    assert outcome == OrderOutcome(plant.order_number, "Completed", True, [f"LOT-{j3}"])
    assert plant.calls[0] in (Call("plan_order", "", str(plant.order_id)), Call("deliver_reports"))
    for job in plant.jobs:
        assert plant.names(job) == RAN
        assert [c.detail for c in plant.calls if c.job == job and c.activity == "await_job"] == [
            "ALLOWED_TO_START",
            "RUNNING",
        ]
        # Recorded, then cleared from the PLC: it takes no room any more.
        assert plant.plc_commands(job) == ["clear"]
        assert plant.index(Call("record_job_response", job)) < plant.index(
            Call("plc_command", job, "clear")
        )
        assert await finished(rig.job(job)) == JobOutcome(job, "Completed", [f"LOT-{job}"])
        assert await rig.job(job).query(JobOrderWorkflow.status) == WorkOrderStatus(
            job, "Completed", PRIORITY, UNIT, False, []
        )
    assert plant.plc == {}
    # One step after the other: the next is prepared only when the previous is cleared.
    assert plant.index(Call("plc_command", j1, "clear")) < plant.index(Call("prepare_job", j2))
    assert plant.index(Call("plc_command", j2, "clear")) < plant.index(Call("prepare_job", j3))
    assert [d.order.job_order_id for d in plant.dispatches] == [j1, j2, j3]
    assert plant.count("complete_order") == 1
    completed = plant.index(Call("complete_order", "", "Completed"))
    assert completed > plant.index(Call("plc_command", j3, "clear"))
    # ERP reports: on release, after a dispatch, and once more after the order ended; the
    # workflow ended, so the last delivery finished.
    reports = [i for i, c in enumerate(plant.calls) if c.activity == "deliver_reports"]
    assert reports[0] < plant.index(Call("dispatch_job", j1))
    assert any(plant.index(Call("dispatch_job", j1)) < i < completed for i in reports)
    assert reports[-1] > completed
    # Nobody steered: no supervisor records, no PLC commands beyond Clear.
    assert plant.state_changes == []
    assert [c.command for c in plant.commands] == ["clear"] * 3
    assert plant.changes == []


async def test_status_queries_of_job_and_order(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()

    ready = await rig.following(j1)
    assert ready == WorkOrderStatus(j1, "Ready", PRIORITY, UNIT, True, READY_ACTIONS)
    assert await order.query(ProductionOrderWorkflow.status) == OrderStatus(
        plant.order_number, False, 1, False
    )
    # Not prepared yet: priority and equipment are the database's, not known here.
    assert await rig.status(j2) == WorkOrderStatus(
        j2, "Waiting", None, None, False, WAITING_ACTIONS
    )
    await plant.machine(j1, RUNNING)
    assert await rig.following(j1, RUNNING) == WorkOrderStatus(
        j1, "Running", PRIORITY, UNIT, True, RUNNING_ACTIONS
    )
    await plant.run(j2)
    await plant.machine(j1, ENDED)
    # Recorded and cleared: off the PLC.
    assert await rig.state(j1, "Completed") == WorkOrderStatus(
        j1, "Completed", PRIORITY, UNIT, False, []
    )
    assert await finished(rig.job(j2)) == JobOutcome(j2, "Completed", [f"LOT-{j2}"])
    assert (await finished(order)).state == "Completed"
    assert await order.query(ProductionOrderWorkflow.status) == OrderStatus(
        plant.order_number, False, None, True
    )


# --- hold and resume --------------------------------------------------------------------


async def test_hold_and_resume_waiting_job(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)

    held = await rig.update(j2, JobOrderWorkflow.hold, cmd("material late"))
    assert held == WorkOrderStatus(j2, "Held", None, None, False, HELD_WAITING_ACTIONS)
    await plant.run(j1, j2)
    assert (await finished(rig.job(j1))).state == "Completed"
    # Step 1 is done and step 2 released, but a held job does not go to its PLC.
    await signal_handled(rig.job(j2), "release")
    assert (await rig.status(j2)).state == "Held"
    assert plant.names(j2) == ["set_job_state"]

    resumed = await rig.update(j2, JobOrderWorkflow.resume, cmd("material here"))
    assert resumed.state in ("Waiting", "Ready", "Running", "Completed")
    outcome = await finished(order)
    assert outcome == OrderOutcome(plant.order_number, "Completed", False, [f"LOT-{j2}"])
    assert plant.recorded(j2) == [
        ("Held", SUPERVISOR, "material late"),
        ("Waiting", SUPERVISOR, "material here"),
    ]
    assert plant.plc_commands(j2) == ["clear"]  # nothing was on a PLC to tell
    assert plant.index(Call("set_job_state", j2, "Waiting")) < plant.index(Call("prepare_job", j2))


async def test_hold_racing_the_release_keeps_the_job_off_the_plc(rig: Rig) -> None:
    """Released while its hold is being recorded: the decision is taken before the record,
    so the main line finds the job Held and does not dispatch."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    recording = plant.gate("set_job_state", j2, "Held")
    hold = await rig.job(j2).start_update(
        JobOrderWorkflow.hold, cmd(), wait_for_stage=WorkflowUpdateStage.ACCEPTED
    )
    await until(lambda: Call("set_job_state", j2, "Held") in plant.calls, "hold being recorded")
    await plant.run(j1)
    await finished(rig.job(j1))
    await signal_handled(rig.job(j2), "release")

    recording.set()
    assert (await asyncio.wait_for(hold.result(), TIMEOUT_S)).state == "Held"
    assert (await rig.status(j2)).dispatched is False
    assert "prepare_job" not in plant.names(j2)

    await plant.run(j2)
    await rig.update(j2, JobOrderWorkflow.resume, cmd())
    assert (await finished(order)).state == "Completed"
    assert [s for s, _, _ in plant.recorded(j2)] == ["Held", "Waiting"]


async def test_hold_and_resume_ready_job_revokes_and_restarts_on_plc(rig: Rig) -> None:
    """The update records the decision and answers with what is still to do on the PLC;
    the job's main line does it (here while the PLC command is held at a gate)."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)

    revoke = plant.gate("plc_command", j1, "revoke_start")
    held = await rig.update(j1, JobOrderWorkflow.hold, cmd("check recipe"))
    assert held == WorkOrderStatus(
        j1, "Held", PRIORITY, UNIT, True, HELD_DISPATCHED_ACTIONS, ["revoke_start"]
    )
    revoke.set()
    assert await rig.settled(j1) == WorkOrderStatus(
        j1, "Held", PRIORITY, UNIT, True, HELD_DISPATCHED_ACTIONS
    )
    assert plant.plc[j1] == NOT_ALLOWED

    start = plant.gate("plc_command", j1, "start")
    resumed = await rig.update(j1, JobOrderWorkflow.resume, cmd("recipe ok"))
    assert resumed == WorkOrderStatus(j1, "Ready", PRIORITY, UNIT, True, READY_ACTIONS, ["start"])
    start.set()
    assert await rig.settled(j1) == WorkOrderStatus(
        j1, "Ready", PRIORITY, UNIT, True, READY_ACTIONS
    )
    assert plant.plc_commands(j1) == ["revoke_start", "start"]
    assert plant.plc[j1] == ALLOWED
    assert plant.recorded(j1) == [
        ("Held", SUPERVISOR, "check recipe"),
        ("Ready", SUPERVISOR, "recipe ok"),
    ]

    await plant.run(j1, j2)
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Completed", [f"LOT-{j1}"])
    assert (await finished(order)).state == "Completed"


async def test_hold_during_dispatch_is_applied_once_the_job_is_on_the_plc(rig: Rig) -> None:
    """A hold while the job is being dispatched answers at once; the dispatch goes on, and
    the job's start is revoked on the PLC once it is there (Ready on resume)."""
    plant = rig.plant
    j1, j2 = plant.jobs
    dispatching = plant.gate("dispatch_job", j1)
    order = await rig.start_order()
    await until(lambda: Call("dispatch_job", j1) in plant.calls, "dispatch in flight")

    held = await rig.update(j1, JobOrderWorkflow.hold, cmd())
    assert held == WorkOrderStatus(
        j1, "Held", PRIORITY, UNIT, False, HELD_DISPATCHED_ACTIONS, [], "dispatching"
    )
    dispatching.set()
    await until(lambda: plant.plc.get(j1) == NOT_ALLOWED, "start revoked")
    assert await rig.settled(j1) == WorkOrderStatus(
        j1, "Held", PRIORITY, UNIT, True, HELD_DISPATCHED_ACTIONS
    )
    assert plant.plc_commands(j1) == ["revoke_start"]
    await plant.run(j1, j2)
    assert (await rig.update(j1, JobOrderWorkflow.resume, cmd())).state == "Ready"
    assert (await finished(order)).state == "Completed"
    assert plant.plc_commands(j1) == ["revoke_start", "start", "clear"]


async def test_hold_and_resume_running_job_pauses_and_resumes_on_plc(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    await plant.machine(j1, RUNNING)
    await rig.following(j1, RUNNING)

    pause = plant.gate("plc_command", j1, "pause")
    held = await rig.update(j1, JobOrderWorkflow.hold, cmd("jam"))
    assert held == WorkOrderStatus(
        j1, "Held", PRIORITY, UNIT, True, HELD_DISPATCHED_ACTIONS, ["pause"]
    )
    pause.set()
    await rig.settled(j1)
    assert plant.plc[j1] == INTERRUPTED

    resume = plant.gate("plc_command", j1, "resume")
    resumed = await rig.update(j1, JobOrderWorkflow.resume, cmd("cleared"))
    assert resumed == WorkOrderStatus(
        j1, "Running", PRIORITY, UNIT, True, RUNNING_ACTIONS, ["resume"]
    )
    resume.set()
    await rig.settled(j1)
    assert plant.plc_commands(j1) == ["pause", "resume"]
    assert plant.plc[j1] == RUNNING
    assert plant.recorded(j1) == [("Held", SUPERVISOR, "jam"), ("Running", SUPERVISOR, "cleared")]

    await plant.run(j2)
    await plant.machine(j1, ENDED)
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Completed", [f"LOT-{j1}"])
    assert await finished(order) == OrderOutcome(
        plant.order_number, "Completed", False, [f"LOT-{j2}"]
    )


# --- cancel -----------------------------------------------------------------------------


async def test_cancel_waiting_job_without_plc(rig: Rig) -> None:
    """Nothing on a machine: the cancel is the whole of it. The job ends when the order
    workflow gives its word (here: releases it), so the order can still signal it."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)

    cancelled = await rig.update(j2, JobOrderWorkflow.cancel, cmd("not needed"))

    assert cancelled == WorkOrderStatus(j2, "Cancelled", None, None, False, [])
    assert plant.recorded(j2) == [("Cancelled", SUPERVISOR, "not needed")]
    assert (await rig.status(j1)).state == "Ready"  # the step in progress goes on
    await plant.run(j1)
    assert await finished(rig.job(j2)) == JobOutcome(j2, "Cancelled", [], "not needed")
    assert plant.names(j2) == ["set_job_state"]  # no prepare, no PLC
    assert await finished(order) == OrderOutcome(plant.order_number, "Cancelled", False, [])


@pytest.mark.parametrize("steps", [3])
async def test_order_ends_cancelled_after_a_waiting_step_was_cancelled(rig: Rig) -> None:
    """Old bug 1 (fixed): the order released a step a supervisor had cancelled, which had
    ended already, and failed. Now the step waits for the order's word."""
    plant = rig.plant
    j1, j2, j3 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    await rig.update(j2, JobOrderWorkflow.cancel, cmd("not needed"))

    await plant.run(j1)
    outcome = await finished(order)

    assert outcome == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert await finished(rig.job(j2)) == JobOutcome(j2, "Cancelled", [], "not needed")
    assert plant.recorded(j3) == [("Cancelled", "system", "step 2 ended Cancelled")]
    assert plant.names(j3) == ["set_job_state"]
    assert plant.calls.count(Call("complete_order", "", "Cancelled")) == 1


async def test_cancel_held_waiting_job_names_the_actor(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    await rig.start_order()
    await rig.following(j1)
    await rig.update(j2, JobOrderWorkflow.hold, cmd())

    cancelled = await rig.update(j2, JobOrderWorkflow.cancel, cmd())

    assert cancelled.state == "Cancelled"
    assert plant.recorded(j2) == [
        ("Held", SUPERVISOR, None),
        ("Cancelled", SUPERVISOR, f"cancelled by {SUPERVISOR}"),
    ]
    await plant.run(j1)
    assert await finished(rig.job(j2)) == JobOutcome(
        j2, "Cancelled", [], f"cancelled by {SUPERVISOR}"
    )
    assert plant.plc_commands(j2) == []


@pytest.mark.parametrize("held", [False, True], ids=["ready", "held-ready"])
async def test_cancel_dispatched_job_not_started_cancels_on_plc(rig: Rig, held: bool) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    if held:
        await rig.update(j1, JobOrderWorkflow.hold, cmd())
        await rig.settled(j1)
    plc_cancel = plant.gate("plc_command", j1, "cancel")

    cancelled = await rig.update(j1, JobOrderWorkflow.cancel, cmd("wrong material"))

    state = "Held" if held else "Ready"
    assert cancelled == WorkOrderStatus(j1, state, PRIORITY, UNIT, True, [], ["cancel"])
    # Cancelling: nothing else is allowed meanwhile.
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await rig.update(j1, JobOrderWorkflow.hold, cmd())
    assert refusal(failed.value).message == "hold is not allowed for a work order in state " + (
        "Cancelling"
    )
    plc_cancel.set()
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Cancelled", [], "wrong material")
    assert plant.plc_commands(j1) == (["revoke_start", "cancel"] if held else ["cancel"])
    assert j1 not in plant.plc  # the PLC forgot it
    assert "record_job_response" not in plant.names(j1)
    # The workflow stopped following the job on the PLC before cancelling it there.
    events = [e.event_type async for e in rig.job(j1).fetch_history_events()]
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in events

    outcome = await finished(order)
    assert outcome == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert plant.recorded(j1)[-1] == ("Cancelled", SUPERVISOR, "wrong material")
    assert plant.recorded(j2) == [("Cancelled", "system", "step 1 ended Cancelled")]
    assert plant.names(j2) == ["set_job_state"]
    assert await finished(rig.job(j2)) == JobOutcome(j2, "Cancelled", [], "step 1 ended Cancelled")
    assert plant.calls.count(Call("complete_order", "", "Cancelled")) == 1


@pytest.mark.parametrize("held", [False, True], ids=["running", "held-running"])
async def test_cancel_started_job_aborts_on_plc_and_ends_aborted(rig: Rig, held: bool) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.abort_reported_at_once = False
    order = await rig.start_order()
    await rig.following(j1)
    await plant.machine(j1, RUNNING)
    await rig.following(j1, RUNNING)
    if held:
        await rig.update(j1, JobOrderWorkflow.hold, cmd())
        await rig.settled(j1)

    cancelled = await rig.update(j1, JobOrderWorkflow.cancel, cmd("scrap"))

    state = "Held" if held else "Running"
    assert cancelled == WorkOrderStatus(j1, state, PRIORITY, UNIT, True, [], ["abort"])
    await until(lambda: "abort" in plant.plc_commands(j1), "abort sent to the PLC")
    # Sent; the job ends when the PLC reports it aborted.
    assert (await rig.status(j1)).state == state
    assert "record_job_response" not in plant.names(j1)
    await plant.machine(j1, ABORTED)

    assert await finished(rig.job(j1)) == JobOutcome(j1, "Aborted", [])
    assert await rig.status(j1) == WorkOrderStatus(j1, "Aborted", PRIORITY, UNIT, False, [])
    assert plant.plc_commands(j1) == (["pause", "abort", "clear"] if held else ["abort", "clear"])
    # Aborted comes from the PLC's job response, not from a supervisor record.
    assert [s for s, _, _ in plant.recorded(j1)] == (["Held"] if held else [])
    assert plant.names(j1)[-2:] == ["record_job_response", "plc_command"]

    outcome = await finished(order)
    assert outcome == OrderOutcome(plant.order_number, "Aborted", False, [])
    assert plant.recorded(j2) == [("Cancelled", "system", "step 1 ended Aborted")]
    assert plant.calls.count(Call("complete_order", "", "Aborted")) == 1


@pytest.mark.parametrize("stored", [False, True], ids=["before-store", "after-store"])
async def test_cancel_during_dispatch_ends_cancelled(rig: Rig, stored: bool) -> None:
    """Old bug 2 (fixed): the cancel answers at once; the dispatch attempt is cancelled and
    waited for, and whatever reached the PLC is withdrawn (Cancel)."""
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.gate("dispatch_job", j1, "stored" if stored else "")
    order = await rig.start_order()
    if stored:
        await until(lambda: j1 in plant.plc, "job stored on the PLC")
    else:
        await until(lambda: Call("dispatch_job", j1) in plant.calls, "dispatch in flight")

    cancelled = await rig.update(j1, JobOrderWorkflow.cancel, cmd("stop"))

    assert cancelled == WorkOrderStatus(
        j1, "Waiting", PRIORITY, UNIT, False, [], ["cancel"], "dispatching"
    )
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Cancelled", [], "stop")
    assert Call("dispatch_job", j1, "cancelled") in plant.calls
    assert plant.stored == ([j1] if stored else [])
    assert plant.plc_commands(j1) == ["cancel"]
    assert j1 not in plant.plc
    assert plant.recorded(j1) == [("Cancelled", SUPERVISOR, "stop")]
    assert await finished(order) == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert plant.recorded(j2) == [("Cancelled", "system", "step 1 ended Cancelled")]


# --- refused actions --------------------------------------------------------------------


async def test_actions_the_state_does_not_allow_are_refused(rig: Rig) -> None:
    """Each update's validator refuses what ``allowed_actions`` does not list for the
    state: NotAllowed, with the state and the allowed actions as details; nothing runs."""
    plant = rig.plant
    j1, j2 = plant.jobs
    await rig.start_order()
    await rig.following(j1)

    async def refused(
        job: str, update: SupervisorUpdate, command: WorkOrderCommand, action: str
    ) -> None:
        before = await rig.status(job)
        calls = len(plant.calls)
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await rig.update(job, update, command)
        error = refusal(failed.value)
        assert (error.type, error.non_retryable) == ("NotAllowed", True)
        assert error.message == f"{action} is not allowed for a work order in state {before.state}"
        assert error.details == (
            {"state": before.state, "allowed_actions": before.allowed_actions},
        )
        assert await rig.status(job) == before
        steering = ("set_job_state", "change_job", "plc_command", "prepare_job")
        assert [c for c in plant.calls[calls:] if c.activity in steering] == [], action

    assert (await rig.status(j2)).allowed_actions == WAITING_ACTIONS
    await refused(j2, JobOrderWorkflow.resume, cmd(), "resume")

    assert (await rig.status(j1)).allowed_actions == READY_ACTIONS
    await refused(j1, JobOrderWorkflow.resume, cmd(), "resume")
    # Equipment is fixed once dispatched, also together with an allowed priority.
    await refused(j1, JobOrderWorkflow.change, cmd(equipment="FILL-2"), "equipment")
    await refused(j1, JobOrderWorkflow.change, cmd(priority=1, equipment="FILL-2"), "equipment")

    await plant.machine(j1, RUNNING)
    assert (await rig.following(j1, RUNNING)).allowed_actions == RUNNING_ACTIONS
    await refused(j1, JobOrderWorkflow.resume, cmd(), "resume")
    await refused(j1, JobOrderWorkflow.change, cmd(priority=1), "priority")

    await rig.update(j2, JobOrderWorkflow.hold, cmd())
    assert (await rig.status(j2)).allowed_actions == HELD_WAITING_ACTIONS
    await refused(j2, JobOrderWorkflow.hold, cmd(), "hold")

    await plant.machine(j1, ENDED)
    assert (await rig.state(j1, "Completed")).allowed_actions == []
    assert plant.changes == []


async def test_empty_change_is_refused(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    await rig.start_order()
    await rig.following(j1)

    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await rig.update(j2, JobOrderWorkflow.change, cmd("nothing"))

    error = refusal(failed.value)
    assert (error.type, error.message) == ("InvalidChange", "nothing to change")
    assert "change_job" not in plant.names(j2)
    assert (await rig.status(j2)).state == "Waiting"


# --- change priority and equipment ------------------------------------------------------


async def test_change_before_dispatch_is_recorded_and_dispatched(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)

    changed = await rig.update(
        j2, JobOrderWorkflow.change, cmd("rush", priority=900, equipment="FILL-2")
    )

    assert changed == WorkOrderStatus(j2, "Waiting", 900, "FILL-2", False, WAITING_ACTIONS)
    assert plant.changes == [JobChange(j2, SUPERVISOR, "rush", 900, "FILL-2")]
    assert plant.names(j2) == ["change_job"]  # recorded only: no PLC has the job yet
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"
    sent = next(d for d in plant.dispatches if d.order.job_order_id == j2)
    assert (sent.order.priority, sent.order.equipment_id) == (900, "FILL-2")
    assert [c.command for c in plant.commands] == ["clear", "clear"]


async def test_change_priority_after_dispatch_updates_the_plc(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)

    changed = await rig.update(j1, JobOrderWorkflow.change, cmd("urgent", priority=100))

    assert changed == WorkOrderStatus(j1, "Ready", 100, UNIT, True, READY_ACTIONS, ["update"])
    assert plant.changes == [JobChange(j1, SUPERVISOR, "urgent", 100, None)]
    assert await rig.settled(j1) == WorkOrderStatus(j1, "Ready", 100, UNIT, True, READY_ACTIONS)
    assert plant.plc_commands(j1) == ["update"]
    assert plant.commands[0].dispatch.order.priority == 100
    assert [n for n in plant.names(j1) if n != "await_job"] == [
        "prepare_job",
        "plc_room",
        "dispatch_job",
        "change_job",
        "prepare_job",  # the job order as it is now, for the PLC's Update
        "plc_command",
    ]
    assert plant.plc[j1] == ALLOWED
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"


async def test_order_changed_by_the_erp_resends_jobs_not_started(rig: Rig) -> None:
    """The ERP changed the order before a machine started on it: the queued job is
    prepared again and updated on its PLC; the job not yet sent is prepared again when it
    goes."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    assert plant.count("prepare_job", j2) == 0

    await order.signal(ProductionOrderWorkflow.order_changed)

    await until(lambda: plant.plc_commands(j1) == ["update"], "j1 updated on the PLC")
    assert plant.count("prepare_job", j1) == 2  # the job order as it is now
    assert plant.plc[j1] == ALLOWED
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"
    assert plant.count("prepare_job", j2) == 1  # prepared once, after the change
    assert plant.plc_commands(j2) == ["clear"]


async def test_change_priority_of_held_ready_job_updates_the_plc(rig: Rig) -> None:
    plant = rig.plant
    j1, _ = plant.jobs
    await rig.start_order()
    await rig.following(j1)
    await rig.update(j1, JobOrderWorkflow.hold, cmd())
    await rig.settled(j1)

    changed = await rig.update(j1, JobOrderWorkflow.change, cmd(priority=7))

    assert changed == WorkOrderStatus(
        j1, "Held", 7, UNIT, True, HELD_DISPATCHED_ACTIONS, ["update"]
    )
    await rig.settled(j1)
    assert plant.plc_commands(j1) == ["revoke_start", "update"]
    assert plant.commands[-1].dispatch.order.priority == 7


async def test_change_priority_of_held_running_job(rig: Rig) -> None:
    """Old bug 3, now handled: the PLC refuses Update for an Interrupted job; the real
    plc_command swallows that (InvalidJobOrderStatus) and answers the job's state, so the
    change is recorded, the update answers and the job goes on."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    await plant.machine(j1, RUNNING)
    await rig.following(j1, RUNNING)
    await rig.update(j1, JobOrderWorkflow.hold, cmd())
    await rig.settled(j1)

    changed = await rig.update(j1, JobOrderWorkflow.change, cmd(priority=7))

    assert changed == WorkOrderStatus(
        j1, "Held", 7, UNIT, True, HELD_DISPATCHED_ACTIONS, ["update"]
    )
    assert plant.changes == [JobChange(j1, SUPERVISOR, None, 7, None)]
    await until(lambda: "update" in plant.plc_commands(j1), "update sent")
    # Refused by the PLC (the job stays Interrupted); not sent again.
    assert await rig.settled(j1) == WorkOrderStatus(
        j1, "Held", 7, UNIT, True, HELD_DISPATCHED_ACTIONS
    )
    assert plant.plc[j1] == INTERRUPTED
    await rig.update(j1, JobOrderWorkflow.resume, cmd())
    await plant.run(j2)
    await rig.settled(j1)
    await plant.machine(j1, ENDED)
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Completed", [f"LOT-{j1}"])
    assert (await finished(order)).state == "Completed"
    assert plant.plc_commands(j1) == ["pause", "update", "resume", "clear"]


@pytest.mark.parametrize("equipment", [None, "FILL-2"], ids=["priority", "priority+equipment"])
async def test_change_while_queued_for_room_is_what_the_plc_gets(
    rig: Rig, equipment: str | None
) -> None:
    """A job waiting for room on a full PLC is not on it yet: a change is dispatched."""
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.max_jobs = 0
    order = await rig.start_order()
    await rig.status(j1, lambda s: s.note.startswith("Queued"))

    changed = await rig.update(j1, JobOrderWorkflow.change, cmd(priority=900, equipment=equipment))

    assert (changed.state, changed.priority, changed.equipment) == (
        "Waiting",
        900,
        equipment or UNIT,
    )
    plant.max_jobs = None
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"
    assert plant.stored[0] == j1
    sent = plant.dispatches[0].order
    assert (sent.job_order_id, sent.priority, sent.equipment_id) == (j1, 900, equipment or UNIT)
    assert plant.plc_commands(j1) == ["clear"]


async def test_change_priority_during_dispatch_updates_the_plc(rig: Rig) -> None:
    """The dispatch in flight carries the old priority: the PLC gets an Update once the job
    is there."""
    plant = rig.plant
    j1, j2 = plant.jobs
    stored = plant.gate("dispatch_job", j1, "stored")
    order = await rig.start_order()
    await until(lambda: j1 in plant.plc, "job stored on the PLC")

    changed = await rig.update(j1, JobOrderWorkflow.change, cmd(priority=900))

    assert (changed.state, changed.priority, changed.note) == ("Waiting", 900, "dispatching")
    stored.set()
    await until(lambda: "update" in plant.plc_commands(j1), "update sent")
    assert await rig.settled(j1) == WorkOrderStatus(j1, "Ready", 900, UNIT, True, READY_ACTIONS)
    assert plant.dispatches[0].order.priority == PRIORITY
    assert [c.dispatch.order.priority for c in plant.commands] == [900]
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"


async def test_change_refused_by_the_domain_fails_the_update_and_the_job_goes_on(
    rig: Rig,
) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.change_error = ApplicationError(
        "FILL-9 cannot run WM-FILL",
        {"status": 422, "title": "Unprocessable change"},
        type="DomainError",
        non_retryable=True,
    )
    order = await rig.start_order()
    await rig.following(j1)

    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await rig.update(j2, JobOrderWorkflow.change, cmd(equipment="FILL-9"))

    assert isinstance(failed.value.cause, ActivityError)
    domain = failed.value.cause.cause
    assert isinstance(domain, ApplicationError)
    assert (domain.type, domain.message) == ("DomainError", "FILL-9 cannot run WM-FILL")
    assert domain.details == ({"status": 422, "title": "Unprocessable change"},)
    assert plant.count("change_job", j2) == 1  # refused for good: not retried
    assert await rig.status(j2) == WorkOrderStatus(
        j2, "Waiting", None, None, False, WAITING_ACTIONS
    )
    await plant.run(j1, j2)
    assert (await finished(order)).state == "Completed"
    sent = next(d for d in plant.dispatches if d.order.job_order_id == j2)
    assert sent.order.equipment_id == UNIT


# --- failures: held for attention ---------------------------------------------------------


@pytest.mark.parametrize("then", ["cancel", "resume"])
@pytest.mark.parametrize(
    ("steps", "step", "activity_name", "error", "reason"),
    [
        (
            2,
            1,
            "dispatch_job",
            ApplicationError("unknown work master", type="InvalidRequestError", non_retryable=True),
            "dispatch failed: InvalidRequestError: unknown work master",
        ),
        (
            3,
            2,
            "prepare_job",
            ApplicationError(
                "work unit FILL-1 has no controller endpoint",
                type="ProductionError",
                non_retryable=True,
            ),
            "prepare failed: ProductionError: work unit FILL-1 has no controller endpoint",
        ),
    ],
    ids=["dispatch-step-1", "prepare-step-2"],
)
async def test_step_that_fails_for_good_is_held_for_attention(
    rig: Rig, step: int, activity_name: str, error: ApplicationError, reason: str, then: str
) -> None:
    """A step that fails for good holds its job with the reason (the order waits); a
    resume sends it again, a cancel ends it and the order."""
    plant = rig.plant
    failing = plant.jobs[step - 1]
    if activity_name == "dispatch_job":
        plant.dispatch_errors[failing] = [error]
    else:
        plant.prepare_errors[failing] = error
    await plant.run(*plant.jobs)
    order = await rig.start_order()

    held = await rig.state(failing, "Held")

    prepared = activity_name != "prepare_job"
    assert held == WorkOrderStatus(
        failing,
        "Held",
        PRIORITY if prepared else None,
        UNIT if prepared else None,
        False,
        HELD_WAITING_ACTIONS,
        [],
        f"needs attention: {reason}",
    )
    assert plant.recorded(failing) == [("Held", "system", reason)]
    assert plant.count(activity_name, failing) == 1  # non-retryable: tried once
    assert failing not in plant.plc
    for done in plant.jobs[: step - 1]:
        assert await finished(rig.job(done)) == JobOutcome(done, "Completed", [f"LOT-{done}"])
    assert (await order.query(ProductionOrderWorkflow.status)).current_step == step

    if then == "resume":
        resumed = await rig.update(failing, JobOrderWorkflow.resume, cmd("fixed"))
        # Sent again (the main line may be dispatching it already).
        assert (resumed.state, resumed.note in ("", "dispatching")) == ("Waiting", True)
        outcome = await finished(order)
        assert outcome == OrderOutcome(
            plant.order_number, "Completed", False, [f"LOT-{plant.jobs[-1]}"]
        )
        assert plant.recorded(failing) == [
            ("Held", "system", reason),
            ("Waiting", SUPERVISOR, "fixed"),
        ]
        assert plant.count(activity_name, failing) == 2
        assert plant.stored == plant.jobs
        return
    cancelled = await rig.update(failing, JobOrderWorkflow.cancel, cmd("give up"))
    assert (cancelled.state, cancelled.allowed_actions, cancelled.pending_on_machine) == (
        "Cancelled",
        [],
        [],
    )
    outcome = await finished(order)
    assert outcome == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert await finished(rig.job(failing)) == JobOutcome(failing, "Cancelled", [], "give up")
    for later in plant.jobs[step:]:
        assert plant.recorded(later) == [("Cancelled", "system", f"step {step} ended Cancelled")]
        assert "prepare_job" not in plant.names(later)
    assert plant.stored == plant.jobs[: step - 1]
    assert plant.calls.count(Call("complete_order", "", "Cancelled")) == 1


@pytest.mark.parametrize("steps", [1])
async def test_dispatch_retries_a_plc_that_is_away(rig: Rig) -> None:
    plant = rig.plant
    (j1,) = plant.jobs
    plant.dispatch_errors[j1] = [
        ApplicationError(
            "PLC unreachable",
            type="MachineUnreachableError",
            next_retry_delay=timedelta(milliseconds=50),
        )
    ]
    await plant.run(j1)

    outcome = await finished(await rig.start_order())

    assert outcome == OrderOutcome(plant.order_number, "Completed", False, [f"LOT-{j1}"])
    assert plant.count("dispatch_job", j1) == 2  # retried after the first (retryable) failure
    assert plant.state_changes == []


@pytest.mark.parametrize("then", ["resume", "cancel"])
@pytest.mark.parametrize("steps", [1])
async def test_job_whose_plc_wait_fails_for_good_is_held_for_attention(rig: Rig, then: str) -> None:
    """A PLC wait failing for good (not a lost job) holds the job; the job may still be on
    the PLC: a resume sends it again (found stored), a cancel withdraws it there."""
    plant = rig.plant
    (j1,) = plant.jobs
    plant.await_errors[j1] = ApplicationError(
        "bad browse path", type="InvalidRequestError", non_retryable=True
    )
    order = await rig.start_order()

    held = await rig.state(j1, "Held")

    reason = "following the job failed: InvalidRequestError: bad browse path"
    assert (held.note, held.allowed_actions) == (
        f"needs attention: {reason}",
        HELD_DISPATCHED_ACTIONS,
    )
    assert plant.recorded(j1) == [("Held", "system", reason)]
    if then == "resume":
        await plant.run(j1)
        await rig.update(j1, JobOrderWorkflow.resume, cmd())
        assert (await finished(order)).state == "Completed"
        assert plant.count("dispatch_job", j1) == 2
        assert plant.stored == [j1]  # the second StoreAndStart found it stored
        return
    await rig.update(j1, JobOrderWorkflow.cancel, cmd("drop"))
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Cancelled", [], "drop")
    assert (await finished(order)).state == "Cancelled"
    # Not left on the PLC, where the unit could still start it.
    assert plant.plc_commands(j1) == ["cancel"]
    assert j1 not in plant.plc


@pytest.mark.parametrize("steps", [1])
async def test_response_that_cannot_be_recorded_is_held_and_recorded_on_resume(
    rig: Rig,
) -> None:
    """The machine finished but its response could not be recorded for good: the job is
    held with the reason; a resume records it (the job is not sent to the PLC again)."""
    plant = rig.plant
    (j1,) = plant.jobs
    plant.record_errors[j1] = ApplicationError(
        "unknown material FLOUR-X", type="ProductionError", non_retryable=True
    )
    await plant.run(j1)
    order = await rig.start_order()

    held = await rig.state(j1, "Held")
    reason = "recording the job response failed: ProductionError: unknown material FLOUR-X"
    assert held.note == f"needs attention: {reason}"
    await until(lambda: plant.recorded(j1) == [("Held", "system", reason)], "j1 recorded Held")

    await rig.update(j1, JobOrderWorkflow.resume, cmd())
    assert (await finished(order)).state == "Completed"
    assert plant.count("dispatch_job", j1) == 1  # never sent again
    assert plant.count("record_job_response", j1) == 2
    assert plant.plc_commands(j1)[-1] == "clear"


# --- a job its PLC lost -------------------------------------------------------------------


@pytest.mark.parametrize("then", ["resume", "cancel"])
@pytest.mark.parametrize("during", ["wait", "revoke_start"])
@pytest.mark.parametrize("steps", [1])
async def test_job_the_plc_lost_is_held_with_the_reason(rig: Rig, during: str, then: str) -> None:
    """The PLC forgot the job (a restart): found by the wait (UnknownJobOrderError) or by a
    command (GONE). Held with the reason; resume dispatches it again, cancel ends it."""
    plant = rig.plant
    (j1,) = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    if during == "wait":
        await plant.lose(j1)
    else:
        revoke = plant.gate("plc_command", j1, "revoke_start")
        await rig.update(j1, JobOrderWorkflow.hold, cmd())
        await until(lambda: "revoke_start" in plant.plc_commands(j1), "revoke_start sent")
        await plant.lose(j1)
        revoke.set()

    held = await rig.status(j1, lambda s: s.note.startswith("needs attention"))

    assert held == WorkOrderStatus(
        j1,
        "Held",
        PRIORITY,
        UNIT,
        False,
        HELD_WAITING_ACTIONS,
        [],
        f"needs attention: {lost(j1, during)}",
    )
    first = ("Held", "system", lost(j1, "wait")) if during == "wait" else ("Held", SUPERVISOR, None)
    await until(lambda: len(plant.recorded(j1)) == 1, "the hold recorded")
    assert plant.recorded(j1) == [first]
    if then == "resume":
        await plant.run(j1)
        resumed = await rig.update(j1, JobOrderWorkflow.resume, cmd("sent again"))
        # Sent again (the main line may be dispatching it already).
        assert (resumed.state, resumed.note in ("", "dispatching")) == ("Waiting", True)
        assert await finished(order) == OrderOutcome(
            plant.order_number, "Completed", False, [f"LOT-{j1}"]
        )
        assert plant.stored == [j1, j1]
        assert plant.recorded(j1) == [first, ("Waiting", SUPERVISOR, "sent again")]
        return
    cancelled = await rig.update(j1, JobOrderWorkflow.cancel, cmd("lost"))
    assert (cancelled.state, cancelled.pending_on_machine) == ("Cancelled", [])
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Cancelled", [], "lost")
    assert (await finished(order)).state == "Cancelled"
    assert plant.stored == [j1]
    assert plant.plc_commands(j1) == ([] if during == "wait" else ["revoke_start"])


# --- steering while the PLC cannot be reached ---------------------------------------------


@pytest.mark.parametrize("action", ["hold-ready", "cancel-running"])
async def test_steering_answers_while_the_plc_is_unreachable(rig: Rig, action: str) -> None:
    """The update answers at once with what is pending on the machine; the main line keeps
    trying and carries it out once the PLC is back."""
    plant = rig.plant
    j1, j2 = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    if action == "cancel-running":
        await plant.machine(j1, RUNNING)
        await rig.following(j1, RUNNING)
    plant.down.add("plc_command")

    if action == "hold-ready":
        answer = await rig.update(j1, JobOrderWorkflow.hold, cmd("check"))
        expected = WorkOrderStatus(
            j1, "Held", PRIORITY, UNIT, True, HELD_DISPATCHED_ACTIONS, ["revoke_start"]
        )
        command = "revoke_start"
    else:
        answer = await rig.update(j1, JobOrderWorkflow.cancel, cmd("scrap"))
        expected = WorkOrderStatus(j1, "Running", PRIORITY, UNIT, True, [], ["abort"])
        command = "abort"
    assert answer == expected
    await until(lambda: plant.plc_commands(j1).count(command) >= 3, "retried")
    assert await rig.status(j1) == expected  # still to do
    plant.down.clear()

    if action == "hold-ready":
        assert (await rig.settled(j1)).state == "Held"
        assert plant.plc[j1] == NOT_ALLOWED
        await plant.run(j1, j2)
        await rig.update(j1, JobOrderWorkflow.resume, cmd())
        assert (await finished(order)).state == "Completed"
    else:
        assert await finished(rig.job(j1)) == JobOutcome(j1, "Aborted", [])
        assert (await finished(order)).state == "Aborted"
    sent = plant.plc_commands(j1)
    tries = sent.count(command)
    assert sent == [command] * tries + (
        ["start", "clear"] if command == "revoke_start" else ["clear"]
    )


async def test_cancel_during_a_dispatch_that_keeps_failing(rig: Rig) -> None:
    """The PLC is away while the job is dispatched: the cancel answers at once, the
    dispatch is given up, the job never reaches the PLC and ends Cancelled once the PLC
    confirms it does not hold it."""
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.down |= {"dispatch_job", "plc_command"}
    order = await rig.start_order()
    await until(lambda: plant.count("dispatch_job", j1) >= 2, "dispatch retried")

    cancelled = await rig.update(j1, JobOrderWorkflow.cancel, cmd("stop"))

    assert cancelled == WorkOrderStatus(
        j1, "Waiting", PRIORITY, UNIT, False, [], ["cancel"], "dispatching"
    )
    await until(lambda: plant.plc_commands(j1).count("cancel") >= 2, "cancel retried")
    assert (await rig.status(j1)).pending_on_machine == ["cancel"]
    tries = plant.count("dispatch_job", j1)
    plant.down.clear()
    assert await finished(rig.job(j1)) == JobOutcome(j1, "Cancelled", [], "stop")
    assert plant.count("dispatch_job", j1) == tries  # not tried again
    assert plant.stored == []
    assert plant.recorded(j1) == [("Cancelled", SUPERVISOR, "stop")]
    assert await finished(order) == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert plant.recorded(j2) == [("Cancelled", "system", "step 1 ended Cancelled")]


# --- room on the PLC, and clearing it -----------------------------------------------------


@pytest.mark.parametrize("steps", [1])
async def test_dispatch_waits_while_the_plc_is_full(rig: Rig) -> None:
    plant = rig.plant
    (j1,) = plant.jobs
    plant.max_jobs = 1
    plant.plc["JO-OTHER"] = RUNNING  # another order's job fills the PLC
    order = await rig.start_order()

    queued = await rig.status(j1, lambda s: s.note.startswith("Queued"))

    assert queued == WorkOrderStatus(
        j1, "Waiting", PRIORITY, UNIT, False, WAITING_ACTIONS, [], "Queued: PLC full (1/1 jobs)"
    )
    assert "dispatch_job" not in plant.names(j1)
    del plant.plc["JO-OTHER"]  # done and cleared
    await plant.run(j1)
    assert (await finished(order)).state == "Completed"
    assert plant.names(j1)[0] == "prepare_job"
    assert plant.count("plc_room", j1) >= 2
    assert plant.names(j1)[plant.count("plc_room", j1) + 1 :] == RAN[2:]


@pytest.mark.parametrize("steps", [1])
async def test_hold_while_queued_keeps_the_job_off_the_plc(rig: Rig) -> None:
    plant = rig.plant
    (j1,) = plant.jobs
    plant.max_jobs = 0
    order = await rig.start_order()
    await rig.status(j1, lambda s: s.note.startswith("Queued"))

    held = await rig.update(j1, JobOrderWorkflow.hold, cmd())
    assert (held.state, held.dispatched) == ("Held", False)
    assert (await rig.status(j1, lambda s: not s.note)).state == "Held"
    plant.max_jobs = None
    await asyncio.sleep(0.3)
    assert "dispatch_job" not in plant.names(j1)
    await plant.run(j1)
    await rig.update(j1, JobOrderWorkflow.resume, cmd())
    assert (await finished(order)).state == "Completed"


@pytest.mark.parametrize("steps", [1])
async def test_clear_after_record_retries_a_plc_that_is_away(rig: Rig) -> None:
    """The job response is recorded first; the Clear that frees the PLC's room waits for a
    PLC that is away."""
    plant = rig.plant
    (j1,) = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    plant.down.add("plc_command")
    await plant.run(j1)
    await until(lambda: plant.count("plc_command", j1) >= 2, "clear retried")
    assert "record_job_response" in plant.names(j1)
    assert plant.plc[j1] == ENDED
    plant.down.clear()
    assert (await finished(order)).state == "Completed"
    assert j1 not in plant.plc
    assert set(plant.plc_commands(j1)) == {"clear"}


# --- cancelling the whole order -----------------------------------------------------------


@pytest.mark.parametrize(
    "moment", ["planning", "queued", "ready", "running", "last-step-completed"]
)
async def test_order_cancel_at_each_moment(rig: Rig, moment: str) -> None:
    """The order's cancel answers at once; the step on a machine is withdrawn or aborted,
    the later ones never run; the order ends Cancelled, Completed only if its last step
    had finished already."""
    plant = rig.plant
    j1, j2 = plant.jobs
    reason = "customer withdrew"
    gates = {
        "planning": lambda: plant.gate("plan_order", "", str(plant.order_id)),
        "last-step-completed": lambda: plant.gate("complete_order", "", "Completed"),
    }
    gate = gates[moment]() if moment in gates else asyncio.Event()
    if moment == "queued":
        plant.max_jobs = 0
    order = await rig.start_order()
    step: int | None = 1
    if moment == "planning":
        await until(lambda: Call("plan_order", "", str(plant.order_id)) in plant.calls, "plan")
        step = None
    elif moment == "queued":
        await rig.status(j1, lambda s: s.note.startswith("Queued"))
    elif moment == "ready":
        await rig.following(j1)
    elif moment == "running":
        await rig.following(j1)
        await plant.machine(j1, RUNNING)
        await rig.following(j1, RUNNING)
    else:
        await plant.run(j1, j2)
        await until(lambda: Call("complete_order", "", "Completed") in plant.calls, "last step")
        step = None

    answer = await rig.cancel_order(order, reason)

    assert answer == OrderStatus(plant.order_number, True, step, False)
    gate.set()
    outcome = await finished(order)
    if moment == "last-step-completed":
        assert outcome == OrderOutcome(plant.order_number, "Completed", False, [f"LOT-{j2}"])
        assert plant.state_changes == []
        return
    assert outcome == OrderOutcome(plant.order_number, "Cancelled", False, [])
    assert plant.calls.count(Call("complete_order", "", "Cancelled")) == 1
    if moment == "planning":
        for job in plant.jobs:
            assert await finished(rig.job(job)) == JobOutcome(
                job, "Cancelled", [], "order cancelled"
            )
            assert plant.recorded(job) == [("Cancelled", "system", "order cancelled")]
            assert plant.names(job) == ["set_job_state"]
        return
    expected = {
        "queued": (JobOutcome(j1, "Cancelled", [], reason), [], []),
        "ready": (JobOutcome(j1, "Cancelled", [], reason), ["cancel"], [j1]),
        "running": (JobOutcome(j1, "Aborted", []), ["abort", "clear"], [j1]),
    }
    job_outcome, commands, stored = expected[moment]
    assert await finished(rig.job(j1)) == job_outcome
    assert plant.plc_commands(j1) == commands
    assert plant.stored == stored
    assert plant.plc == {}
    if job_outcome.state == "Cancelled":
        assert plant.recorded(j1) == [("Cancelled", ERP, reason)]
    assert plant.recorded(j2) == [("Cancelled", "system", f"step 1 ended {job_outcome.state}")]
    assert plant.names(j2) == ["set_job_state"]


async def test_order_cancel_is_refused_twice_and_while_ending(rig: Rig) -> None:
    plant = rig.plant
    j1, _ = plant.jobs
    order = await rig.start_order()
    await rig.following(j1)
    plc_cancel = plant.gate("plc_command", j1, "cancel")
    await rig.cancel_order(order, "first")

    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await rig.cancel_order(order, "second")
    error = refusal(failed.value)
    assert (error.type, error.details) == (
        "NotAllowed",
        ({"state": "Cancelling", "allowed_actions": []},),
    )

    ending = plant.gate("deliver_reports")
    plc_cancel.set()
    await until(lambda: Call("complete_order", "", "Cancelled") in plant.calls, "order ending")
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not (await order.query(ProductionOrderWorkflow.status)).ended:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await rig.cancel_order(order, "third")
    error = refusal(failed.value)
    assert (error.type, error.details) == (
        "NotAllowed",
        ({"state": "ending", "allowed_actions": []},),
    )
    ending.set()
    assert (await finished(order)).state == "Cancelled"


@pytest.mark.parametrize("steps", [1, 2])
async def test_order_cancel_racing_the_end_of_a_step(rig: Rig, steps: int) -> None:
    """The PLC ends the job before the Abort lands: Abort finds it Ended (refused, no
    error), so the job completes. An order with a later step ends Cancelled; one whose
    last step got done ends Completed."""
    plant = rig.plant
    j1 = plant.jobs[0]
    order = await rig.start_order()
    await rig.following(j1)
    await plant.machine(j1, RUNNING)
    await rig.following(j1, RUNNING)
    abort = plant.gate("plc_command", j1, "abort")

    await rig.cancel_order(order, "stop")
    await until(lambda: "abort" in plant.plc_commands(j1), "abort on its way")
    await plant.machine(j1, ENDED)
    abort.set()

    assert await finished(rig.job(j1)) == JobOutcome(j1, "Completed", [f"LOT-{j1}"])
    assert plant.plc_commands(j1) == ["abort", "clear"]
    outcome = await finished(order)
    if steps == 1:
        assert outcome == OrderOutcome(plant.order_number, "Completed", False, [f"LOT-{j1}"])
    else:
        assert outcome == OrderOutcome(plant.order_number, "Cancelled", False, [])
        j2 = plant.jobs[1]
        assert plant.recorded(j2) == [("Cancelled", "system", "order cancelled")]
        assert plant.names(j2) == ["set_job_state"]
