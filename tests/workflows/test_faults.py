"""The order and job workflows when things go wrong: steps that fail for good, a job its PLC
lost, a PLC that cannot be reached or is full, and the whole order cancelled at each moment
(see ``plant.py`` for the stand-in plant)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from tests.workflows.plant import (
    ENDED,
    ERP,
    HELD_DISPATCHED_ACTIONS,
    HELD_WAITING_ACTIONS,
    NOT_ALLOWED,
    PRIORITY,
    RAN,
    RUNNING,
    SUPERVISOR,
    TIMEOUT_S,
    UNIT,
    WAITING_ACTIONS,
    Call,
    Rig,
    cmd,
    finished,
    lost,
    refusal,
    until,
)
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow
from workflows.types import JobOutcome, OrderOutcome, OrderStatus, WorkOrderStatus

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
    # Full when prepared, then asked again until there was room.
    assert plant.count("plc_room", j1) >= 1
    assert plant.names(j1)[plant.count("plc_room", j1) + 1 :] == RAN[1:]


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
