"""The relay: start the workflows of stored orders that have none yet.

``accept_order`` stores an order, then starts its workflow; when the workflow engine cannot
be reached it answers 503 and the order stays stored without a workflow. The relay, running
beside every worker (``mes worker``, and so ``mes dev`` and ``mes demo``), finds such orders
(``operations_request.workflow_started_at`` empty, state not final) and starts them, every
``MES_RELAY_SECONDS``. Starting is idempotent on the workflow id, so relays in several
workers, or a relay and the API, may start the same order at once: one start wins, the
others find it; each records the time once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mes.models import FINAL_STATES, OperationsRequest, utcnow
from mes.production_orders import mark_workflow_started
from mes.workflow_client import WorkflowClient

log = logging.getLogger(__name__)

#: How long a new order is left to the API that stores it before the relay starts it too.
GRACE = timedelta(seconds=5)


def unstarted_orders(
    session: Session, grace: timedelta = GRACE, limit: int = 100
) -> list[tuple[int, str]]:
    """(id, order number) of orders whose workflow is not known to be started, oldest first:
    not in a final state, stored at least ``grace`` ago."""
    rows = session.execute(
        select(OperationsRequest.id, OperationsRequest.external_id)
        .where(
            OperationsRequest.workflow_started_at.is_(None),
            OperationsRequest.state.not_in(FINAL_STATES),
            OperationsRequest.created_at <= utcnow() - grace,
        )
        .order_by(OperationsRequest.id)
        .limit(limit)
    ).all()
    return [(order_id, number) for order_id, number in rows]


async def start_unstarted(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    *,
    grace: timedelta = GRACE,
    limit: int = 100,
) -> list[str]:
    """Start the workflow of every stored order that has none yet (up to ``limit``, oldest
    first) and record each start; returns the order numbers started (or found started).

    Stops at the first start that fails (the engine is most likely away for all of them)
    and raises its error; the orders started before it stay recorded.
    """

    def find() -> list[tuple[int, str]]:
        with sessions() as s:
            return unstarted_orders(s, grace, limit)

    def mark(order_id: int) -> None:
        with sessions() as s:
            mark_workflow_started(s, order_id)

    started: list[str] = []
    for order_id, number in await asyncio.to_thread(find):
        await workflows.start_order(order_id, number)
        await asyncio.to_thread(mark, order_id)
        log.info("relay: started the workflow of order %s", number)
        started.append(number)
    return started


async def run_relay(
    sessions: sessionmaker[Session],
    workflows: WorkflowClient,
    interval_s: float = 5.0,
    *,
    grace: timedelta = GRACE,
) -> None:
    """Call ``start_unstarted`` every ``interval_s`` seconds until cancelled.

    A pass that fails (the workflow engine or the database away) is logged and the next
    one tries again; only cancellation ends the loop.
    """
    while True:
        try:
            await start_unstarted(sessions, workflows, grace=grace)
        except Exception as e:
            log.warning(
                "relay: could not start waiting orders (retrying in %gs): %s", interval_s, e
            )
        await asyncio.sleep(interval_s)


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
