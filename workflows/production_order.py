"""The workflows of one production order: the order, and one child per job order.

Workflow code is deterministic: every side effect (database, PLC) is an activity in
``workflows.activities``. The order's workflow id is ``order-<ERP order number>`` and each
job's ``job-<JobOrderID>``, so a duplicate post or a retried start cannot run anything twice.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.activities import MesActivities
    from workflows.types import Dispatch, JobInput, JobOutcome, OrderInput, OrderOutcome

COMPLETED = "Completed"
ABORTED = "Aborted"

#: Every step is short; a database or PLC that is away for a while is waited for with
#: backoff (up to a minute between tries), never given up on by timeout alone.
STEP_TIMEOUT = timedelta(seconds=60)
RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))


@workflow.defn
class JobOrderWorkflow:
    """One job order on one work unit: prepare, dispatch, wait for the machine, record."""

    @workflow.run
    async def run(self, job: JobInput) -> JobOutcome:
        try:
            dispatch: Dispatch = await workflow.execute_activity_method(
                MesActivities.prepare_job,
                job.job_order_id,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
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
                args=[job.job_order_id, reason],
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
            return JobOutcome(job.job_order_id, ABORTED, [], reason)

        await workflow.execute_activity_method(
            MesActivities.await_job,
            dispatch,
            # A job may run for days; the heartbeat, not the timeout, detects a lost worker.
            start_to_close_timeout=timedelta(days=7),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RETRY,
        )
        return await workflow.execute_activity_method(
            MesActivities.record_job_response,
            dispatch,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )


@workflow.defn
class ProductionOrderWorkflow:
    """One ERP production order: plan its job orders, run them along the routing, finish."""

    @workflow.run
    async def run(self, order: OrderInput) -> OrderOutcome:
        job_ids: list[str] = await workflow.execute_activity_method(
            MesActivities.plan_order,
            order.order_id,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        state = COMPLETED
        lots: list[str] = []
        for job_id in job_ids:
            outcome: JobOutcome = await workflow.execute_child_workflow(
                JobOrderWorkflow.run,
                JobInput(order.order_id, job_id),
                id=f"job-{job_id}",
            )
            if outcome.state != COMPLETED:
                state = ABORTED
                break
            lots = outcome.produced_lots
        final_state, late = await workflow.execute_activity_method(
            MesActivities.complete_order,
            args=[order.order_id, state],
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        return OrderOutcome(
            order.order_number, final_state, late, lots if state == COMPLETED else []
        )


def _reason(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}"
    return str(cause or error)
