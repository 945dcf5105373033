"""The order and job workflows steered: the happy path, hold and resume, cancel, refused
actions, and changes of priority and equipment (see ``plant.py`` for the stand-in plant)."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.exceptions import ActivityError, ApplicationError

from tests.workflows.plant import (
    ABORTED,
    ALLOWED,
    ENDED,
    HELD_DISPATCHED_ACTIONS,
    HELD_WAITING_ACTIONS,
    INTERRUPTED,
    NOT_ALLOWED,
    PRIORITY,
    RAN,
    READY_ACTIONS,
    RUNNING,
    RUNNING_ACTIONS,
    SUPERVISOR,
    TIMEOUT_S,
    UNIT,
    WAITING_ACTIONS,
    Call,
    Rig,
    SupervisorUpdate,
    cmd,
    finished,
    refusal,
    signal_handled,
    until,
)
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow
from workflows.types import (
    JobChange,
    JobOutcome,
    OrderOutcome,
    OrderStatus,
    WorkOrderCommand,
    WorkOrderStatus,
)

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
