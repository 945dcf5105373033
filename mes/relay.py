"""The relay: start the workflows of stored orders that have none yet.

``accept_order`` stores an order and answers; the order's row, its
``workflow_started_at`` still empty, is the request to start its workflow (an outbox of
one column). The relay, running beside every worker (``mes worker``, and so ``mes dev`` and
``mes demo``), claims such orders and starts them in batches, oldest first, a few at a
time, and records each start in the transaction that holds their row locks; whatever acts
on an order not yet started in the database takes the same lock (``start_unstarted``).
It runs when it is woken: by the ``NOTIFY`` the accepting transaction sends on PostgreSQL
(the relay ``LISTEN``\\ s on its own connection), by ``production_orders.wake_relays``
when the API runs in the same process, and every ``MES_RELAY_SECONDS`` in any case, which
also covers a missed notification and a Temporal that was away (a failed pass is retried
at that pace). Starting is idempotent on the workflow id, and relays in several workers
skip the orders another has claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import psycopg
from sqlalchemy import Engine, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from mes.models import FINAL_STATES, ErpMessage, OperationsRequest, utcnow
from mes.production_orders import START_CHANNEL, START_LOCK, on_order_stored
from mes.workflow_client import WorkflowClient

log = logging.getLogger(__name__)

#: How long a new order is left alone before the relay starts it (none: nothing else does).
GRACE = timedelta(0)
#: Orders taken in one pass; a full batch is followed by the next pass at once.
BATCH = 100
#: Starts in flight at once within a batch: enough to hide Temporal's round trip, few
#: enough not to flood it (it takes what it can, the rest wait for the next pass).
CONCURRENT_STARTS = 16
#: How long one pass may spend starting its batch (it holds the orders' row locks, which a
#: cancel of one of them waits for): a Temporal that hangs fails the pass, retried later.
START_TIMEOUT_S = 10.0


def claim_unstarted(
    session: Session, grace: timedelta = GRACE, limit: int = BATCH
) -> list[tuple[int, str]]:
    """(id, order number) of orders whose workflow is not known to be started, oldest
    first, stored at least ``grace`` ago; on PostgreSQL their rows stay locked until the
    session's transaction ends, and rows another transaction holds (a relay, a cancel) are
    skipped.

    A final order is taken only while it has ERP messages to deliver (one cancelled before
    its workflow started): its workflow plans nothing and only delivers them
    (``execution.plan_order``); one with nothing to deliver is left alone."""
    undelivered = exists().where(
        ErpMessage.operations_request_id == OperationsRequest.id,
        ErpMessage.delivered_at.is_(None),
        ErpMessage.rejected_at.is_(None),
    )
    query = select(OperationsRequest.id, OperationsRequest.external_id).where(
        OperationsRequest.workflow_started_at.is_(None),
        OperationsRequest.state.not_in(FINAL_STATES) | undelivered,
    )
    if grace:
        query = query.where(OperationsRequest.created_at <= utcnow() - grace)
    query = query.order_by(OperationsRequest.id).limit(limit).with_for_update(skip_locked=True)
    rows = session.execute(query).all()
    return [(order_id, number) for order_id, number in rows]


def mark_started(session: Session, order_ids: list[int]) -> None:
    """Record that these orders' workflows run or ran (once each: the first time is kept)."""
    session.execute(
        update(OperationsRequest)
        .where(OperationsRequest.id.in_(order_ids), OperationsRequest.workflow_started_at.is_(None))
        .values(workflow_started_at=utcnow())
        .execution_options(synchronize_session=False)
    )


async def start_unstarted(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    *,
    grace: timedelta = GRACE,
    limit: int = BATCH,
) -> list[str]:
    """Start the workflow of every stored order that has none yet (up to ``limit``, oldest
    first) and record the starts; returns the order numbers started (or found started).

    Claim, start and record are one transaction holding the orders' row locks
    (``claim_unstarted``), so whatever acts on an unstarted order in the database (a cancel,
    a change: ``production_orders.lock_order``) waits for it and then finds the order
    started, or goes first and the relay finds the order as it left it. SQLite has no row
    locks: there ``START_LOCK`` stands for them (the API and the relay share one process in
    ``mes demo`` and ``mes dev``), held for the whole pass, and the claim's read transaction
    is ended at once (a write after others wrote would fail on the stale snapshot).

    The oldest is started first and alone: when it fails (the engine is most likely away for
    all of them) its error is raised and nothing else is tried. The others then start
    ``CONCURRENT_STARTS`` at a time; those that started are recorded, and the first failure
    among the rest is raised after that.
    """
    session = sessions()
    sqlite = session.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Polled, not waited for in a thread: a pass cancelled while waiting must not take
        # the lock afterwards and keep it.
        while not START_LOCK.acquire(blocking=False):  # noqa: ASYNC110 (a thread lock)
            await asyncio.sleep(0.01)
    try:

        def claim() -> list[tuple[int, str]]:
            orders = claim_unstarted(session, grace, limit)
            if sqlite:
                session.rollback()
            return orders

        def mark(order_ids: list[int]) -> None:
            mark_started(session, order_ids)
            session.commit()

        orders = await asyncio.to_thread(claim)
        if not orders:
            await asyncio.to_thread(session.rollback)
            return []
        gate = asyncio.Semaphore(CONCURRENT_STARTS)

        async def start(order_id: int, number: str) -> None:
            async with gate:
                await workflows.start_order(order_id, number)

        async with asyncio.timeout(START_TIMEOUT_S):
            first_id, first = orders[0]
            await workflows.start_order(first_id, first)
            results = await asyncio.gather(
                *(start(order_id, number) for order_id, number in orders[1:]),
                return_exceptions=True,
            )
        done = [orders[0]] + [o for o, r in zip(orders[1:], results, strict=True) if r is None]
        await asyncio.to_thread(mark, [order_id for order_id, _ in done])
    finally:
        # Uncommitted (a failed pass): rolled back, the locks released.
        await asyncio.to_thread(session.close)
        if sqlite:
            START_LOCK.release()
    log.info("relay: started the workflows of %d orders", len(done))
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return [number for _, number in done]


async def run_relay(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    interval_s: float = 5.0,
    *,
    grace: timedelta = GRACE,
) -> None:
    """Call ``start_unstarted`` whenever woken (an order stored), and every ``interval_s``
    seconds in any case, until cancelled.

    A pass that fails (the workflow engine or the database away) is logged and the next one
    tries again after ``interval_s``; only cancellation ends the loop.
    """
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:  # from any thread
        with contextlib.suppress(RuntimeError):  # the loop closed
            loop.call_soon_threadsafe(woken.set)

    stop_waking = on_order_stored(wake)
    engine = sessions.kw.get("bind")
    listener = (
        asyncio.create_task(listen_for_orders(engine, wake, interval_s), name="mes-relay-listen")
        if isinstance(engine, Engine) and engine.dialect.name == "postgresql"
        else None
    )
    try:
        while True:
            woken.clear()
            try:
                started = await start_unstarted(sessions, workflows, grace=grace)
            except Exception as e:
                log.warning(
                    "relay: could not start waiting orders (retrying in %gs): %s", interval_s, e
                )
                await asyncio.sleep(interval_s)
                continue
            if len(started) >= BATCH:
                continue  # a full batch: more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), interval_s)
    finally:
        stop_waking()
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def listen_for_orders(engine: Engine, wake: Callable[[], None], retry_s: float) -> None:
    """Call ``wake`` at every ``NOTIFY`` on ``START_CHANNEL`` (and once on each (re)connect,
    for orders stored while not listening), on a connection of its own; reconnect after
    ``retry_s`` when it is lost. Runs until cancelled."""
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {START_CHANNEL}")
                wake()
                async for _ in conn.notifies():
                    wake()
        except (psycopg.Error, OSError) as e:
            log.warning("relay: not listening for new orders (retrying in %gs): %s", retry_s, e)
        await asyncio.sleep(retry_s)


@contextlib.asynccontextmanager
async def relay_running(
    sessions: sessionmaker[Session], workflows: WorkflowClient, interval_s: float = 5.0
) -> AsyncIterator[asyncio.Task[None]]:
    """``run_relay`` as a task for the duration of the context; cancelled on exit."""
    task = asyncio.create_task(run_relay(sessions, workflows, interval_s), name="mes-relay")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
