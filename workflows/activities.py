"""Activities of the order workflows: every side effect an order causes happens here.

Database work runs in the worker's thread pool (synchronous SQLAlchemy, one transaction per
call, idempotent by business key: see ``mes.execution``); PLC work is asynchronous
(asyncua). Errors a retry cannot fix are raised as non-retryable ``ApplicationError``s, so
the workflow sees them at once instead of after the retry policy runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import TypeVar

import httpx
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.erp.client import DeliveryError, ErpClients, deliver
from adapters.machines import CONNECTORS, connect
from mes import execution, quality, reporting, work_orders
from mes.callbacks import PUBLIC_ONLY, CallbackPolicy
from mes.errors import DomainError
from mes.execution import ProductionError
from mes.machines import (
    EquipmentAdapter,
    InvalidJobOrderStatusError,
    JobControlError,
    JobState,
    MachineConnector,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)
from workflows.types import (
    GONE,
    Dispatch,
    DispositionCommand,
    DispositionOutcome,
    JobChange,
    JobOutcome,
    JobStateChange,
    PlcCommand,
    PlcRoom,
    WaitArgs,
)

T = TypeVar("T")

# How often await_job re-reads the job's state and heartbeats while it waits: far inside
# the workflow's 30 s heartbeat timeout, rare enough to cost nothing.
_HEARTBEAT_TICK_S = 5.0
# How long the ERP may take to connect, and then for each read and write, per message: well
# inside deliver_reports' 30 s heartbeat timeout (it heartbeats while it waits, too).
_ERP_TIMEOUT_S = 10.0
# How long preparing a job waits for its PLC's room before leaving it to plc_room.
_ROOM_TIMEOUT_S = 5.0


async def _heartbeating(work: Awaitable[T], details: object) -> T:
    """Await ``work``, heartbeating every few seconds until it is done; cancelled with the
    activity (e.g. by a heartbeat timeout's retry elsewhere), it cancels ``work`` too."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_HEARTBEAT_TICK_S)
            if done:
                return task.result()
            activity.heartbeat(details)
    finally:
        task.cancel()


class MesActivities:
    """The activities, bound to one database (a session factory), the PLC poll interval and
    the machine adapters by protocol (``adapters.machines.CONNECTORS`` unless given).

    ``poll_seconds`` is how fresh the PLC's job states are: the publishing interval of
    the subscription ``await_job`` waits on. ``callback_policy`` says which addresses ERP
    callbacks may go to (public ones only, unless it allows more). ``erp_clients`` keeps
    one HTTP client per ERP (the worker's); without it each delivery run opens its own.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        poll_seconds: float = 0.5,
        connectors: Mapping[str, MachineConnector] = CONNECTORS,
        callback_policy: CallbackPolicy = PUBLIC_ONLY,
        erp_clients: ErpClients | None = None,
    ) -> None:
        self._sessions = session_factory
        self._poll_seconds = poll_seconds
        self._connectors = connectors
        self._callback_policy = callback_policy
        self._erp_clients = erp_clients

    def _plc(self, dispatch: Dispatch) -> contextlib.AbstractAsyncContextManager[EquipmentAdapter]:
        return _session(dispatch, self._connectors)

    def _db(self, fn: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            try:
                return fn(session)
            except ProductionError as e:
                raise ApplicationError(str(e), type="ProductionError", non_retryable=True) from e
            except DomainError as e:
                # A refused change (e.g. a work unit that cannot run the job): final, and the
                # API turns it back into the same 4xx answer.
                raise ApplicationError(
                    e.detail,
                    {"status": e.status, "title": e.title},
                    type="DomainError",
                    non_retryable=True,
                ) from e

    @activity.defn
    def plan_order(self, order_id: int) -> list[str]:
        """Create the order's job orders (one per routing step); returns their JobOrderIDs."""
        return self._db(lambda s: execution.plan_order(s, order_id))

    @activity.defn
    async def prepare_job(self, job_order_id: str) -> Dispatch:
        """Fix the job's recipe and material lots; say which controller gets it and, when
        the job may go, how much room its PLC has now (one round trip fewer for the
        workflow; a PLC that does not answer at once is left to ``plc_room`` and its
        retries)."""
        target, order = await asyncio.to_thread(
            self._db, lambda s: execution.prepare_job(s, job_order_id)
        )
        e = target.endpoint
        dispatch = Dispatch(
            e.protocol, e.url, e.machine, order, target.waiting_for, e.security, e.settings
        )
        if not target.waiting_for:
            with contextlib.suppress(ApplicationError, TimeoutError):
                async with asyncio.timeout(_ROOM_TIMEOUT_S):
                    dispatch.room = await self.plc_room(dispatch)
        return dispatch

    @activity.defn
    async def plc_room(self, dispatch: Dispatch) -> PlcRoom:
        """How many job orders the work unit's PLC takes (None: no limit) and holds now."""
        async with self._plc(dispatch) as plc:
            room = await plc.capacity()
        return PlcRoom(room.max_job_orders, room.job_orders)

    @activity.defn
    async def dispatch_job(self, dispatch: Dispatch) -> None:
        """Send the job to its PLC (StoreAndStart; a retry finds it stored) and record it.

        Heartbeats before the PLC call, so a cancel reaches it (the workflow then waits for
        the attempt to end and withdraws whatever reached the machine).
        """
        activity.heartbeat()
        async with self._plc(dispatch) as plc:
            activity.heartbeat()
            try:
                await plc.store_and_start(dispatch.order)
            except UnableToAcceptJobOrderError as e:
                # Full after all (another job took the last place): the workflow waits for
                # room again instead of this attempt being retried blindly.
                raise ApplicationError(str(e), type="PlcFull", non_retryable=True) from e
        await asyncio.to_thread(
            self._db, lambda s: execution.mark_dispatched(s, dispatch.order.job_order_id)
        )

    @activity.defn
    async def await_job(self, wait: WaitArgs) -> int:
        """Wait until the PLC reports the job in a state other than ``wait.known``.

        Subscribes to the PLC's job list (OPC UA data change, published at most every
        ``poll_seconds``) instead of polling it, so a hundred waiting jobs cost next to
        nothing; the state is still re-read and heartbeated every few seconds, well inside
        the workflow's 30 s heartbeat timeout. Returns the new OPC 10031-4 job state, so
        the workflow sees each change (started, interrupted, ended) with a handful of
        activities per job. A worker crash resumes the wait on another worker after the
        heartbeat timeout.
        """
        job_id = wait.dispatch.order.job_order_id
        async with self._plc(wait.dispatch) as plc:
            state = await plc.wait_for_change(
                job_id,
                JobState(wait.known),
                on_tick=lambda s: activity.heartbeat(int(s)),
                tick_s=_HEARTBEAT_TICK_S,
                publish_ms=max(1, int(self._poll_seconds * 1000)),
            )
            if state in (JobState.RUNNING, JobState.ENDED):
                await asyncio.to_thread(self._db, lambda s: execution.mark_running(s, job_id))
            return int(state)

    @activity.defn
    async def plc_command(self, cmd: PlcCommand) -> int:
        """Call one job-control method (pause, resume, start, revoke_start, cancel, abort,
        update, clear) for the job on its PLC; return the job's state afterwards (``GONE``,
        0, when the PLC does not hold it).

        A method the job's state refuses (InvalidJobOrderStatus: it moved on meanwhile) is
        not an error: the state returned tells the workflow what to do instead. A PLC that
        cannot be reached is retried.
        """
        order = cmd.dispatch.order
        job_id = order.job_order_id
        async with self._plc(cmd.dispatch) as plc:
            try:
                if cmd.command == "update":
                    await plc.update(order)
                else:
                    method = {
                        "pause": plc.pause,
                        "resume": plc.resume,
                        "start": plc.start,
                        "revoke_start": plc.revoke_start,
                        "cancel": plc.cancel,
                        "abort": plc.abort,
                        "clear": plc.clear,
                    }[cmd.command]
                    await method(job_id)
            except (InvalidJobOrderStatusError, UnknownJobOrderError):
                pass
            try:
                return int(await plc.job_state(job_id))
            except UnknownJobOrderError:
                return GONE

    @activity.defn
    def set_job_state(self, change: JobStateChange) -> None:
        """Record a supervisor-driven state change of a job order."""
        self._db(
            lambda s: work_orders.set_state(
                s, change.job_order_id, change.state, change.actor, change.reason
            )
        )

    @activity.defn
    def change_job(self, change: JobChange) -> None:
        """Record a new priority or work unit (refused if the unit cannot run the job)."""
        self._db(
            lambda s: work_orders.change(
                s,
                change.job_order_id,
                change.actor,
                change.reason,
                change.priority,
                change.equipment,
            )
        )

    @activity.defn
    async def record_job_response(self, dispatch: Dispatch) -> JobOutcome:
        """Read the job response from the PLC and record it (genealogy, data, quality)."""
        async with self._plc(dispatch) as plc:
            response = await plc.job_response(dispatch.order.job_order_id, dispatch.order)
        job_id = dispatch.order.job_order_id

        def record(s: Session) -> tuple[str, list[str], str]:
            state, lots = execution.record_job_response(s, response)
            return state, lots, quality.quality_hold_reason(s, job_id)

        state, lots, reason = await asyncio.to_thread(self._db, record)
        return JobOutcome(job_id, state, lots, reason)

    @activity.defn
    def dispose_nonconformance(self, cmd: DispositionCommand) -> DispositionOutcome:
        """Record a supervisor's disposition of the nonconformance a work order is held on."""
        done = self._db(
            lambda s: quality.dispose(s, cmd.nonconformance, cmd.disposition, cmd.reason, cmd.actor)
        )
        return DispositionOutcome(done.job_state or "", done.rework_job_order)

    @activity.defn
    async def deliver_reports(self, order_id: int) -> int:
        """Send the order's undelivered ERP messages, oldest first (read in one statement,
        then again until none is left); returns how many went.

        An ERP that is away makes the activity fail retryably: Temporal tries again with
        backoff (honouring Retry-After), always from the oldest message, so the ERP gets
        every message in order once it is back. A message the ERP refuses for good (4xx) is
        recorded as rejected and skipped. It heartbeats before each message and every few
        seconds while the ERP answers, so a worker lost mid-delivery is replaced within the
        workflow's heartbeat timeout.
        """
        sent = 0
        async with contextlib.AsyncExitStack() as stack:
            own: httpx.AsyncClient | None = None
            while True:
                activity.heartbeat(sent)
                batch = await asyncio.to_thread(
                    self._db, lambda s: reporting.undelivered(s, order_id)
                )
                if not batch:
                    return sent
                for msg in batch:
                    activity.heartbeat(sent)
                    http = self._erp_clients.for_url(msg.url) if self._erp_clients else None
                    if http is None:
                        if own is None:
                            own = await stack.enter_async_context(httpx.AsyncClient())
                        http = own
                    try:
                        await _heartbeating(
                            deliver(
                                msg.url,
                                msg.body.encode(),
                                msg.content_type,
                                msg.message_id,
                                msg.order_number,
                                signing_secret=msg.signing_secret,
                                policy=self._callback_policy,
                                timeout_s=_ERP_TIMEOUT_S,
                                client=http,
                            ),
                            sent,
                        )
                    except DeliveryError as e:
                        await asyncio.to_thread(
                            self._db,
                            partial(
                                reporting.mark_attempt,
                                message_pk=msg.id,
                                error=str(e),
                                rejected=not e.retryable,
                            ),
                        )
                        if not e.retryable:
                            continue
                        delay = timedelta(seconds=e.retry_after_s) if e.retry_after_s else None
                        raise ApplicationError(
                            f"ERP unreachable for {msg.message_id}: {e}",
                            type="DeliveryError",
                            next_retry_delay=delay,
                        ) from e
                    await asyncio.to_thread(
                        self._db,
                        partial(
                            reporting.mark_attempt, message_pk=msg.id, error=None, rejected=False
                        ),
                    )
                    sent += 1

    @activity.defn
    def complete_order(self, order_id: int, state: str) -> tuple[str, bool]:
        """End the order in ``state``; returns the final state and whether it is late."""
        return self._db(lambda s: execution.complete_order(s, order_id, state))


@contextlib.asynccontextmanager
async def _session(
    dispatch: Dispatch, connectors: Mapping[str, MachineConnector]
) -> AsyncIterator[EquipmentAdapter]:
    """A session with the work unit's controller, through the machine port.

    Its typed errors (connecting included) become retryable or final activity failures.
    """
    try:
        async with connect(dispatch.endpoint, connectors) as plc:
            yield plc
    except JobControlError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=not e.retryable) from e
