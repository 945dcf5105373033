"""deliver_reports heartbeats before each message and while the ERP takes its time, so a
worker lost mid-delivery is replaced after the workflow's heartbeat timeout (30 s), not after
the activity's 5-minute start-to-close timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import ActivityEnvironment

import workflows.activities
from mes.callbacks import LOOPBACK, CallbackPolicy
from tests.conftest import order_for_erp_client
from workflows.activities import MesActivities

ERP_DELAY_S = 0.6
TICK_S = 0.05


@pytest.fixture
async def slow_erp() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An ERP that reads each callback, thinks for ERP_DELAY_S, then answers 200."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.append(await reader.readexactly(length))
        await asyncio.sleep(ERP_DELAY_S)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/callbacks", received


ALLOW_LOOPBACK = CallbackPolicy.allowing(LOOPBACK)


async def test_deliver_reports_heartbeats_while_the_erp_answers(
    plant_sqlite: sessionmaker[Session],
    slow_erp: tuple[str, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, received = slow_erp
    monkeypatch.setattr(workflows.activities, "_HEARTBEAT_TICK_S", TICK_S)
    order_id = order_for_erp_client(plant_sqlite, "erp-slow", url, ALLOW_LOOPBACK, "HB")

    beats: list[tuple[object, ...]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    sent = await env.run(
        MesActivities(plant_sqlite, callback_policy=ALLOW_LOOPBACK).deliver_reports, order_id
    )

    assert sent == 1
    assert len(received) == 1
    # One before the message, then one per tick while the ERP thought, then one before
    # looking for the next message.
    assert beats[0] == (0,)
    assert beats[-1] == (1,)
    waiting = [b for b in beats if b == (0,)]
    assert len(waiting) >= ERP_DELAY_S / TICK_S / 2


async def test_a_cancelled_delivery_stops_waiting_on_the_erp() -> None:
    """The activity cancelled (its heartbeat timed out, the workflow gave up): the HTTP call
    it waited on is cancelled with it, not left running."""

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0

    inner = asyncio.ensure_future(forever())
    outer = asyncio.ensure_future(workflows.activities._heartbeating(inner, 0))
    await asyncio.sleep(0.01)  # less than a tick: no heartbeat outside an activity
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.sleep(0)
    assert inner.cancelled()
