"""The Temporal worker: runs the order workflows and their activities on one task queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from mes.callbacks import PUBLIC_ONLY, CallbackPolicy
from workflows.activities import MesActivities
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow

WORKFLOWS = [ProductionOrderWorkflow, JobOrderWorkflow]


def build_worker(
    client: Client,
    task_queue: str,
    session_factory: sessionmaker[Session],
    poll_seconds: float = 0.5,
    max_concurrent: int = 100,
    callback_policy: CallbackPolicy = PUBLIC_ONLY,
) -> Worker:
    """A worker for the order workflows; database activities run in a thread pool.

    ``callback_policy``: where ERP callbacks may go (``mes.callbacks``)."""
    acts = MesActivities(session_factory, poll_seconds, callback_policy=callback_policy)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=[
            acts.plan_order,
            acts.prepare_job,
            acts.dispatch_job,
            acts.await_job,
            acts.record_job_response,
            acts.plc_room,
            acts.complete_order,
            acts.plc_command,
            acts.set_job_state,
            acts.dispose_nonconformance,
            acts.change_job,
            acts.deliver_reports,
        ],
        # Threads are made on demand; every activity slot may be a database activity.
        activity_executor=ThreadPoolExecutor(max_workers=max_concurrent),
        max_concurrent_activities=max_concurrent,
    )
