"""The quality gate in the workflows: a job whose lot fails a test waits Held until a
supervisor disposes of the lot (release, rework, scrap), and a job whose material is on a
quality hold waits, saying why (see ``plant.py`` for the stand-in plant)."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowUpdateFailedError

from tests.workflows.plant import (
    SUPERVISOR,
    Call,
    Rig,
    cmd,
    finished,
    refusal,
    until,
)
from workflows.production_order import JobOrderWorkflow
from workflows.types import DispositionCommand, JobOutcome, OrderOutcome, WorkOrderStatus


def disposition(job: str, decision: str, reason: str = "checked") -> DispositionCommand:
    return DispositionCommand(SUPERVISOR, f"NC-LOT-{job}-1", decision, reason)


async def quality_held(rig: Rig, job: str) -> WorkOrderStatus:
    """The job's status once it waits Held on its nonconformance (cleared from its PLC)."""
    status = await rig.status(job, lambda s: s.state == "Held" and "quality hold" in s.note)
    await until(lambda: Call("plc_command", job, "clear") in rig.plant.calls, f"{job} cleared")
    return status


@pytest.mark.parametrize("steps", [2])
async def test_failed_test_holds_the_step_until_released(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.out_of_spec.add(j1)
    await plant.run(j1, j2)
    order = await rig.start_order()

    status = await quality_held(rig, j1)
    assert status.note == f"quality hold: NC-LOT-{j1}-1"
    assert status.allowed_actions == ["cancel"]
    # Only the disposition moves it on: a resume is refused, the next step waits.
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await rig.update(j1, JobOrderWorkflow.resume, cmd())
    assert refusal(refused.value).type == "NotAllowed"
    assert Call("prepare_job", j2) not in plant.calls

    answer = await rig.job(j1).execute_update(
        JobOrderWorkflow.dispose, disposition(j1, "release", "re-measured: in spec")
    )
    assert answer.state == "Completed"
    assert await finished(rig.job(j1)) == JobOutcome(
        j1, "Completed", [f"LOT-{j1}"], f"quality hold: NC-LOT-{j1}-1"
    )
    assert await finished(order) == OrderOutcome(
        plant.order_number, "Completed", False, [f"LOT-{j2}"]
    )
    assert [(d.disposition, d.reason) for d in plant.dispositions] == [
        ("release", "re-measured: in spec")
    ]
    # A second disposition of the same hold is refused by the workflow.
    assert plant.count("dispose_nonconformance", j1) == 1


@pytest.mark.parametrize("steps", [2])
async def test_rework_runs_a_new_job_order_on_the_same_step(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    rework = f"{j1}-RW1"
    plant.out_of_spec.add(j1)
    await plant.run(j1, rework, j2)
    order = await rig.start_order()
    await quality_held(rig, j1)

    await rig.job(j1).execute_update(JobOrderWorkflow.dispose, disposition(j1, "rework"))

    outcome = await finished(order)
    assert outcome == OrderOutcome(plant.order_number, "Completed", False, [f"LOT-{j2}"])
    assert await finished(rig.job(j1)) == JobOutcome(
        j1, "Completed", [], f"quality hold: NC-LOT-{j1}-1", rework
    )
    assert await finished(rig.job(rework)) == JobOutcome(rework, "Completed", [f"LOT-{rework}"])
    # The rework ran on the PLC between the first pass and the next step.
    assert plant.stored == [j1, rework, j2]


@pytest.mark.parametrize("steps", [2])
async def test_scrap_aborts_the_step_and_the_order(rig: Rig) -> None:
    plant = rig.plant
    j1, j2 = plant.jobs
    plant.out_of_spec.add(j1)
    await plant.run(j1)
    order = await rig.start_order()
    await quality_held(rig, j1)

    await rig.job(j1).execute_update(JobOrderWorkflow.dispose, disposition(j1, "scrap"))

    assert await finished(order) == OrderOutcome(plant.order_number, "Aborted", False, [])
    assert (await finished(rig.job(j1))).state == "Aborted"
    assert (await finished(rig.job(j2))).state == "Cancelled"
    assert Call("dispatch_job", j2) not in plant.calls


@pytest.mark.parametrize("steps", [1])
async def test_a_disposition_is_refused_when_nothing_failed(rig: Rig) -> None:
    (j1,) = rig.plant.jobs
    await rig.start_order()
    await rig.following(j1)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await rig.job(j1).execute_update(JobOrderWorkflow.dispose, disposition(j1, "release"))
    assert refusal(refused.value).type == "NotAllowed"
    assert rig.plant.dispositions == []


@pytest.mark.parametrize("steps", [1])
async def test_job_waits_while_its_material_is_on_a_quality_hold(rig: Rig) -> None:
    plant = rig.plant
    (j1,) = plant.jobs
    why = "Waiting for material: lot FLOUR-7 of FLOUR is Restricted and not enough released"
    plant.material_waits[j1] = [why, why]
    await plant.run(j1)
    order = await rig.start_order()

    status = await rig.status(j1, lambda s: s.note == why)
    assert status.state == "Waiting"
    assert Call("dispatch_job", j1) not in plant.calls
    # Prepared again until the material is there, then sent.
    assert (await finished(order)).state == "Completed"
    assert plant.count("prepare_job", j1) == 3
    assert plant.stored == [j1]
