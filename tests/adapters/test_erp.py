"""ERP report-back over real HTTP on free loopback ports: ``deliver`` against the ERP receiver
(``mes sim erp``), an outage simulated by stopping and restarting the receiver on the same
port, and canned HTTP answers from a tiny asyncio server for the statuses the receiver never
gives (503, 429, 404, a hang, a hang-up)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import partial
from pathlib import Path

import httpx
import pytest

from adapters.erp.client import DeliveryError, ErpClients, parse_retry_after
from adapters.erp.client import deliver as deliver_signed
from adapters.erp.receiver import MAX_BODY_BYTES, ErpReceiver
from mes.callbacks import LOOPBACK, CallbackPolicy

SECRET = "test-secret"
# Every receiver here is on loopback; the fixture's checks each signature.
deliver = partial(deliver_signed, signing_secret=SECRET, policy=CallbackPolicy.allowing(LOOPBACK))

XML = "application/xml"
DOC = b'<?xml version="1.0"?><SyncOperationsPerformance releaseID="7.1"/>'


@pytest.fixture
async def erp(tmp_path: Path) -> AsyncIterator[ErpReceiver]:
    async with ErpReceiver(store=tmp_path / "erp.jsonl", signing_secret=SECRET) as receiver:
        yield receiver


# --- deliver against the receiver -------------------------------------------------------------


async def test_delivered_callback_is_recorded_with_its_headers(erp: ErpReceiver) -> None:
    status = await deliver(erp.url, DOC, XML, "BOD-1", "PO-1001")

    assert status == 200
    [m] = erp.messages
    assert (m.seq, m.message_id, m.order_number, m.content_type, m.body, m.duplicate) == (
        1,
        "BOD-1",
        "PO-1001",
        XML,
        DOC,
        False,
    )
    assert m.received_at.tzinfo is not None


async def test_messages_route_lists_callbacks_as_json_and_filters_by_order(
    erp: ErpReceiver,
) -> None:
    async with httpx.AsyncClient() as client:
        await deliver(erp.url, DOC, XML, "BOD-1", "PO-1", client=client)
        await deliver(erp.url, b'{"state": "running"}', "application/json", "m-2", "PO-2")
        everything = (await client.get(f"{erp.base_url}/messages")).json()
        only_po2 = (await client.get(f"{erp.base_url}/messages", params={"order": "PO-2"})).json()

    assert [(m["seq"], m["order_number"]) for m in everything] == [(1, "PO-1"), (2, "PO-2")]
    assert everything[0]["body"] == DOC.decode()
    assert only_po2 == [everything[1]]
    assert only_po2[0] == {
        "seq": 2,
        "received_at": only_po2[0]["received_at"],
        "message_id": "m-2",
        "order_number": "PO-2",
        "content_type": "application/json",
        "duplicate": False,
        "signature_valid": True,
        "body": '{"state": "running"}',
    }


async def test_repeated_message_id_is_acknowledged_and_flagged_duplicate(erp: ErpReceiver) -> None:
    assert await deliver(erp.url, DOC, XML, "BOD-7", "PO-1") == 200
    # A retry after a lost answer: same id, and the ERP must still say 200 so retries stop.
    assert await deliver(erp.url, DOC, XML, "BOD-7", "PO-1") == 200
    assert await deliver(erp.url, DOC, XML, "BOD-8", "PO-1") == 200

    assert [(m.message_id, m.duplicate) for m in erp.messages] == [
        ("BOD-7", False),
        ("BOD-7", True),
        ("BOD-8", False),
    ]


async def test_large_and_binary_bodies_are_kept_byte_for_byte(tmp_path: Path) -> None:
    big = b"<Lot>" + b"x" * (3 * 1024 * 1024) + b"</Lot>"
    binary = bytes(range(256))
    store = tmp_path / "erp.jsonl"
    async with ErpReceiver(store=store) as erp:
        await deliver(erp.url, big, XML, "big", "PO-1")
        await deliver(erp.url, binary, "application/octet-stream", "bin", "PO-1")
    async with ErpReceiver(port=erp.port, store=store) as again:
        assert [m.body for m in again.messages] == [big, binary]


async def test_refused_callback_is_not_retryable_and_not_recorded(erp: ErpReceiver) -> None:
    with pytest.raises(DeliveryError) as caught:
        await deliver(erp.url, b"", XML, "BOD-1", "PO-1")

    assert caught.value.retryable is False
    assert caught.value.status == 400
    assert "no body" in caught.value.body_excerpt
    assert caught.value.retry_after_s is None
    async with httpx.AsyncClient() as client:
        no_id = await client.post(erp.url, content=DOC, headers={"Content-Type": XML})
    assert no_id.status_code == 400
    assert erp.messages == []


async def test_body_over_the_limit_is_refused_for_good(erp: ErpReceiver) -> None:
    with pytest.raises(DeliveryError) as caught:
        await deliver(erp.url, b"x" * (MAX_BODY_BYTES + 1), XML, "huge", "PO-1")

    assert (caught.value.status, caught.value.retryable) == (413, False)
    assert erp.messages == []


# --- outage: stop the real server, start it again on the same port ----------------------------


async def test_stopped_receiver_gives_retryable_error_and_restart_keeps_history(
    tmp_path: Path,
) -> None:
    store = tmp_path / "erp.jsonl"
    async with ErpReceiver(store=store) as first:
        url = first.url
        await deliver(url, b"<A1/>", XML, "a1", "PO-A")
        await deliver(url, b"<B1/>", XML, "b1", "PO-B")

    with pytest.raises(DeliveryError) as caught:
        await deliver(url, b"<A2/>", XML, "a2", "PO-A", timeout_s=2)
    assert caught.value.retryable is True
    assert caught.value.status is None

    # A new process in real life: a new receiver on the same port and the same store.
    async with ErpReceiver(port=first.port, store=store) as second:
        assert second.url == url
        assert [m.message_id for m in second.messages] == ["a1", "b1"]
        await deliver(url, b"<A2/>", XML, "a2", "PO-A")
        await deliver(url, b"<A1/>", XML, "a1", "PO-A")  # re-sent after the outage
        await deliver(url, b"<B2/>", XML, "b2", "PO-B")
        received = second.messages

    assert [(m.seq, m.message_id, m.duplicate) for m in received] == [
        (1, "a1", False),
        (2, "b1", False),
        (3, "a2", False),
        (4, "a1", True),
        (5, "b2", False),
    ]
    kept = [m.message_id for m in received if m.order_number == "PO-A" and not m.duplicate]
    assert kept == ["a1", "a2"]
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]


async def test_same_receiver_restarts_on_its_port_without_doubling_history(
    tmp_path: Path,
) -> None:
    erp = ErpReceiver(store=tmp_path / "erp.jsonl")
    async with erp:
        url = erp.url
        await deliver(url, DOC, XML, "m1", "PO-1")
    assert not erp.running
    async with erp:
        assert erp.url == url
        await deliver(url, DOC, XML, "m2", "PO-1")
    assert [(m.seq, m.message_id) for m in erp.messages] == [(1, "m1"), (2, "m2")]


async def test_store_with_a_cut_short_last_line_still_loads(tmp_path: Path) -> None:
    store = tmp_path / "erp.jsonl"
    async with ErpReceiver(store=store) as erp:
        await deliver(erp.url, DOC, XML, "m1", "PO-1")
    with store.open("a") as f:
        f.write('{"seq": 2, "received_at": "20')  # the receiver was killed mid-write

    async with ErpReceiver(port=erp.port, store=store) as again:
        assert [m.message_id for m in again.messages] == ["m1"]
        await deliver(again.url, DOC, XML, "m2", "PO-1")
    async with ErpReceiver(port=erp.port, store=store) as third:
        assert [(m.seq, m.message_id) for m in third.messages] == [(1, "m1"), (2, "m2")]


# --- canned answers from a tiny HTTP server ---------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/callbacks"
    finally:
        server.close()
        await server.wait_closed()


def answering(status: str, headers: dict[str, str] | None = None, body: str = "") -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body.encode())}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
        await writer.drain()
        writer.close()

    return handle


async def test_503_with_retry_after_is_retryable_and_exposes_the_delay() -> None:
    handler = answering("503 Service Unavailable", {"Retry-After": "7"}, "maintenance")
    async with serving(handler) as url:
        with pytest.raises(DeliveryError) as caught:
            await deliver(url, DOC, XML, "m1", "PO-1")

    e = caught.value
    assert (e.retryable, e.status, e.retry_after_s, e.body_excerpt) == (
        True,
        503,
        7.0,
        "maintenance",
    )


async def test_429_with_an_http_date_retry_after() -> None:
    when = format_datetime(datetime.now(UTC).replace(microsecond=0), usegmt=True)
    async with serving(answering("429 Too Many Requests", {"Retry-After": when})) as url:
        with pytest.raises(DeliveryError) as caught:
            await deliver(url, DOC, XML, "m1", "PO-1")

    assert caught.value.retryable is True
    assert caught.value.retry_after_s is not None
    assert 0 <= caught.value.retry_after_s <= 1


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        ("500 Internal Server Error", True),
        ("502 Bad Gateway", True),
        ("408 Request Timeout", True),
        ("425 Too Early", True),
        ("400 Bad Request", False),
        ("401 Unauthorized", False),
        ("404 Not Found", False),
        ("422 Unprocessable Content", False),
        ("301 Moved Permanently", False),
    ],
)
async def test_status_classification(status: str, retryable: bool) -> None:
    body = "<ConfirmBOD>" + "bad field " * 100 + "</ConfirmBOD>"
    async with serving(answering(status, body=body)) as url:
        with pytest.raises(DeliveryError) as caught:
            await deliver(url, DOC, XML, "m1", "PO-1")

    assert caught.value.retryable is retryable
    assert caught.value.status == int(status.split()[0])
    assert caught.value.retry_after_s is None
    assert caught.value.body_excerpt.startswith("<ConfirmBOD>bad field")
    assert len(caught.value.body_excerpt) <= 200
    assert str(caught.value.status) in str(caught.value)


async def test_any_2xx_is_success() -> None:
    async with serving(answering("202 Accepted")) as url:
        assert await deliver(url, DOC, XML, "m1", "PO-1") == 202


async def test_one_client_per_erp_keeps_its_connection_and_the_pinned_address() -> None:
    connections: list[int] = []
    hosts: list[bytes] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                hosts.extend(h for h in head.split(b"\r\n") if h.lower().startswith(b"host:"))
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        writer.close()

    erps = ErpClients()
    try:
        async with serving(keep_alive) as url:
            by_name = url.replace("127.0.0.1", "localhost")
            client = erps.for_url(url)
            assert client is not None
            assert erps.for_url(url + "?again") is client
            assert erps.for_url(by_name) not in (None, client)  # another host: another ERP
            for i in range(3):
                assert await deliver(url, DOC, XML, f"m{i}", "PO-1", client=client) == 204
            # By name: resolved, checked and sent to the address, with the name as Host.
            named = erps.for_url(by_name)
            assert await deliver(by_name, DOC, XML, "m3", "PO-1", client=named) == 204
    finally:
        await erps.aclose()
    assert len(connections) == 2  # one per ERP, kept between its deliveries
    assert hosts[-1].split(b":")[1].strip() == b"localhost"
    assert erps.for_url("not a url\x00") is None


async def test_headers_sent_on_the_wire() -> None:
    seen: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serving(capture) as url:
        assert await deliver(url, DOC, XML, "BOD-1", "PO-1") == 204

    head = seen[0].decode().lower()
    for line in ("content-type: application/xml", "x-message-id: bod-1", "x-order-number: po-1"):
        assert line in head


async def test_erp_that_never_answers_times_out_retryably() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # no answer; returns once the client gives up and hangs up
        writer.close()

    async with serving(hang) as url:
        with pytest.raises(DeliveryError) as caught:
            await deliver(url, DOC, XML, "m1", "PO-1", timeout_s=0.2)

    assert caught.value.retryable is True
    assert "Timeout" in str(caught.value)


async def test_erp_that_hangs_up_without_answering_is_retryable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with serving(hang_up) as url:
        with pytest.raises(DeliveryError) as caught:
            await deliver(url, DOC, XML, "m1", "PO-1")

    assert caught.value.retryable is True


async def test_unusable_url_is_not_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        await deliver("ftp://erp.example/callbacks", DOC, XML, "m1", "PO-1")
    assert caught.value.retryable is False


# --- Retry-After parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        ("Wed, 01 Jan 2025 00:01:30 GMT", 90.0),
        ("Tue, 31 Dec 2024 23:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
