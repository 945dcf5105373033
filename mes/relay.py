"""The relay: start the workflows of stored orders that have none yet.

``accept_order`` stores an order and answers; the order's row, its
``workflow_started_at`` still empty, is the request to start its workflow (an outbox of
one column). The relay, running beside every worker (``mes worker``, and so ``mes dev`` and
``mes demo``), finds such orders (state not final) and starts them in batches, oldest
first, a few at a time, and records each start. It runs when it is woken: by the
``NOTIFY`` the accepting transaction sends on PostgreSQL (the relay ``LISTEN``\\ s on its own
connection), by ``production_orders.wake_relays`` when the API runs in the same process,
and every ``MES_RELAY_SECONDS`` in any case, which also covers a missed notification and a
Temporal that was away (a failed pass is retried at that pace). Starting is idempotent on
the workflow id, so relays in several workers may start the same order at once: one start
wins, the others find it; each records the time once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import psycopg
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from mes.models import FINAL_STATES, OperationsRequest, utcnow
from mes.production_orders import START_CHANNEL, on_order_stored
from mes.workflow_client import WorkflowClient

log = logging.getLogger(__name__)

#: How long a new order is left alone before the relay starts it (none: nothing else does).
GRACE = timedelta(0)
#: Orders taken in one pass; a full batch is followed by the next pass at once.
BATCH = 100
#: Starts in flight at once within a batch: enough to hide Temporal's round trip, few
#: enough not to flood it (it takes what it can, the rest wait for the next pass).
CONCURRENT_STARTS = 16


def unstarted_orders(
    session: Session, grace: timedelta = GRACE, limit: int = BATCH
) -> list[tuple[int, str]]:
    """(id, order number) of orders whose workflow is not known to be started, oldest first:
    not in a final state, stored at least ``grace`` ago."""
    query = select(OperationsRequest.id, OperationsRequest.external_id).where(
        OperationsRequest.workflow_started_at.is_(None),
        OperationsRequest.state.not_in(FINAL_STATES),
    )
    if grace:
        query = query.where(OperationsRequest.created_at <= utcnow() - grace)
    rows = session.execute(query.order_by(OperationsRequest.id).limit(limit)).all()
    return [(order_id, number) for order_id, number in rows]


def mark_started(session: Session, order_ids: list[int]) -> None:
    """Record that these orders' workflows run or ran (once each: the first time is kept)."""
    session.execute(
        update(OperationsRequest)
        .where(OperationsRequest.id.in_(order_ids), OperationsRequest.workflow_started_at.is_(None))
        .values(workflow_started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


async def start_unstarted(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    *,
    grace: timedelta = GRACE,
    limit: int = BATCH,
) -> list[str]:
    """Start the workflow of every stored order that has none yet (up to ``limit``, oldest
    first) and record the starts; returns the order numbers started (or found started).

    The oldest is started first and alone: when it fails (the engine is most likely away for
    all of them) its error is raised and nothing else is tried. The others then start
    ``CONCURRENT_STARTS`` at a time; those that started are recorded, and the first failure
    among the rest is raised after that.
    """

    def find() -> list[tuple[int, str]]:
        with sessions() as s:
            return unstarted_orders(s, grace, limit)

    def mark(order_ids: list[int]) -> None:
        with sessions() as s:
            mark_started(s, order_ids)

    orders = await asyncio.to_thread(find)
    if not orders:
        return []
    first_id, first = orders[0]
    await workflows.start_order(first_id, first)
    gate = asyncio.Semaphore(CONCURRENT_STARTS)

    async def start(order_id: int, number: str) -> None:
        async with gate:
            await workflows.start_order(order_id, number)

    results = await asyncio.gather(
        *(start(order_id, number) for order_id, number in orders[1:]), return_exceptions=True
    )
    done = [orders[0]] + [o for o, r in zip(orders[1:], results, strict=True) if r is None]
    await asyncio.to_thread(mark, [order_id for order_id, _ in done])
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
