"""Activities of the order workflows: every side effect an order causes happens here.

Database work runs in the worker's thread pool (synchronous SQLAlchemy, one transaction per
call, idempotent by business key: see ``mes.production``); PLC work is asynchronous
(asyncua). Errors a retry cannot fix are raised as non-retryable ``ApplicationError``s, so
the workflow sees them at once instead of after the retry policy runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.jobcontrol import JobControlError, JobState
from adapters.opcua.client import JobControlClient
from mes import production
from mes.production import ProductionError
from workflows.types import Dispatch, JobOutcome

T = TypeVar("T")


class MesActivities:
    """The activities, bound to one database (a session factory) and PLC poll interval."""

    def __init__(self, session_factory: sessionmaker[Session], poll_seconds: float = 0.5) -> None:
        self._sessions = session_factory
        self._poll_seconds = poll_seconds

    def _db(self, fn: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            try:
                return fn(session)
            except ProductionError as e:
                raise ApplicationError(str(e), type="ProductionError", non_retryable=True) from e

    @activity.defn
    def plan_order(self, order_id: int) -> list[str]:
        """Create the order's job orders (one per routing step); returns their JobOrderIDs."""
        return self._db(lambda s: production.plan_order(s, order_id))

    @activity.defn
    def prepare_job(self, job_order_id: str) -> Dispatch:
        """Fix the job's recipe and material lots; say which controller gets it."""
        target, order = self._db(lambda s: production.prepare_job(s, job_order_id))
        return Dispatch(target.protocol, target.url, target.machine, order)

    @activity.defn
    async def dispatch_job(self, dispatch: Dispatch) -> None:
        """Send the job to its PLC (StoreAndStart; a retry finds it stored) and record it."""
        async with _plc(dispatch) as plc:
            await plc.store_and_start(dispatch.order)
        await asyncio.to_thread(
            self._db, lambda s: production.mark_dispatched(s, dispatch.order.job_order_id)
        )

    @activity.defn
    async def await_job(self, dispatch: Dispatch) -> int:
        """Wait, polling the PLC and heartbeating, until the job ends or aborts.

        Returns the final OPC 10031-4 job state. A worker crash resumes the wait on another
        worker after the heartbeat timeout; the PLC keeps running meanwhile.
        """
        job_id = dispatch.order.job_order_id
        seen_running = False
        async with _plc(dispatch) as plc:
            while True:
                state = await plc.job_state(job_id)
                activity.heartbeat(int(state))
                started = state in (JobState.RUNNING, JobState.INTERRUPTED, JobState.ENDED)
                if started and not seen_running:
                    seen_running = True
                    await asyncio.to_thread(self._db, lambda s: production.mark_running(s, job_id))
                if state.is_final:
                    return int(state)
                await asyncio.sleep(self._poll_seconds)

    @activity.defn
    async def record_job_response(self, dispatch: Dispatch) -> JobOutcome:
        """Read the job response from the PLC and record it (genealogy, data, quality)."""
        async with _plc(dispatch) as plc:
            response = await plc.job_response(dispatch.order.job_order_id)
        state, lots = await asyncio.to_thread(
            self._db, lambda s: production.record_job_response(s, response)
        )
        return JobOutcome(dispatch.order.job_order_id, state, lots)

    @activity.defn
    def abort_job(self, job_order_id: str, reason: str) -> None:
        """Record that a job could not run."""
        self._db(lambda s: production.abort_job(s, job_order_id, reason))

    @activity.defn
    def complete_order(self, order_id: int, state: str) -> tuple[str, bool]:
        """End the order in ``state``; returns the final state and whether it is late."""
        return self._db(lambda s: production.complete_order(s, order_id, state))


@contextlib.asynccontextmanager
async def _plc(dispatch: Dispatch) -> AsyncIterator[JobControlClient]:
    """A job-control session with the work unit's PLC.

    Its typed errors (connecting included) become retryable or final activity failures.
    """
    if dispatch.protocol != "opcua":
        raise ApplicationError(
            f"protocol {dispatch.protocol!r} is not supported yet", non_retryable=True
        )
    try:
        async with JobControlClient(dispatch.url, dispatch.machine) as client:
            yield client
    except JobControlError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=not e.retryable) from e
