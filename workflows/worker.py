"""The Temporal worker: runs the order workflows and their activities on one task queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from adapters.erp.client import ErpClients
from adapters.machines import pooled
from adapters.opcua.pool import SessionPool
from mes.callbacks import PUBLIC_ONLY, CallbackPolicy
from workflows.activities import MesActivities
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow

WORKFLOWS = [ProductionOrderWorkflow, JobOrderWorkflow]


class MesWorker(Worker):
    """The worker, owning the PLC sessions and ERP clients its activities share: closed
    when it stops."""

    def __init__(
        self, *args: Any, plc_sessions: SessionPool, erp_clients: ErpClients, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.plc_sessions = plc_sessions
        self.erp_clients = erp_clients

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.plc_sessions.close()
            await self.erp_clients.aclose()


def build_worker(
    client: Client,
    task_queue: str,
    session_factory: sessionmaker[Session],
    poll_seconds: float = 0.5,
    max_concurrent: int = 100,
    callback_policy: CallbackPolicy = PUBLIC_ONLY,
) -> MesWorker:
    """A worker for the order workflows; database activities run in a thread pool, PLC
    activities on one OPC UA session per endpoint (``adapters.opcua.pool``), ERP deliveries
    on one HTTP client per ERP (``adapters.erp.client.ErpClients``).

    ``callback_policy``: where ERP callbacks may go (``mes.callbacks``)."""
    plc_sessions = SessionPool()
    erp_clients = ErpClients()
    acts = MesActivities(
        session_factory,
        poll_seconds,
        connectors=pooled(plc_sessions),
        callback_policy=callback_policy,
        erp_clients=erp_clients,
    )
    return MesWorker(
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
        plc_sessions=plc_sessions,
        erp_clients=erp_clients,
    )
