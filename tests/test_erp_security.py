"""Issue 11 regressions for the ERP side, over real HTTP: signed callbacks (every callback
the MES sends carries a valid HMAC signature; a tampered one fails), the callback URL
policy (at registration: 422 naming ``callback_url``; at delivery, after DNS: the host is
not called and the message says why), B2MML answers kept per ERP client and per request,
``/health`` without driver text during an outage, and ``mes db upgrade`` without the
password."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import ActivityEnvironment

from adapters.erp.client import deliver
from adapters.erp.receiver import ErpReceiver
from mes.auth import create_token
from mes.callbacks import (
    LOOPBACK,
    PUBLIC_ONLY,
    CallbackPolicy,
    CallbackRefused,
    verify_signature,
)
from mes.cli import main
from mes.launch import Stack, api_server, free_port
from mes.models import ErpClient, ErpMessage, Role
from mes.settings import Settings
from tests.conftest import client, fresh_pg_database, order_final, order_for_erp_client
from tests.test_erp_integration import fresh, order_ids, post_xml
from workflows.activities import MesActivities

SECRET = "0123456789abcdef" * 4
ALLOW_LOOPBACK = CallbackPolicy.allowing(LOOPBACK)
XML = "application/xml"


def readme_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The README's recipe, as an ERP would write it (no MES code)."""
    ts, sig = headers["x-mes-timestamp"], headers["x-mes-signature"]
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(sig, "sha256=" + mac) and abs(time.time() - int(ts)) < 300


@pytest.fixture
async def capture() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A bare HTTP server that keeps each request's headers and body and answers 200."""
    got: list[tuple[dict[str, str], bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        got.append((headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/callbacks", got


# --- signatures --------------------------------------------------------------------------------


async def test_a_callback_verifies_with_the_readme_recipe_and_a_tampered_one_does_not(
    capture: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, got = capture
    body = b'<?xml version="1.0"?><SyncOperationsPerformance/>'
    await deliver(url, body, XML, "BOD-1", "PO-1", signing_secret=SECRET, policy=ALLOW_LOOPBACK)
    [(headers, received)] = got
    assert received == body
    assert headers["x-mes-signature"].startswith("sha256=")
    assert readme_verify(SECRET, headers, received)
    assert not readme_verify(SECRET, headers, received.replace(b"Sync", b"Snyc"))
    assert not readme_verify("another secret", headers, received)
    assert not readme_verify(SECRET, {**headers, "x-mes-timestamp": "1"}, received)


async def test_the_receiver_refuses_a_tampered_unsigned_or_stale_callback(tmp_path: Path) -> None:
    async with ErpReceiver(store=tmp_path / "erp.jsonl", signing_secret=SECRET) as erp:
        body = b'{"state": "Completed"}'
        ts = str(int(time.time()))
        mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        signed = {"X-Message-Id": "m-1", "X-MES-Timestamp": ts, "X-MES-Signature": f"sha256={mac}"}
        stale_ts = str(int(time.time()) - 3600)
        stale_mac = hmac.new(SECRET.encode(), f"{stale_ts}.".encode() + body, hashlib.sha256)
        async with httpx.AsyncClient() as http:
            tampered = await http.post(erp.url, content=b'{"state": "Aborted"}', headers=signed)
            unsigned = await http.post(erp.url, content=body, headers={"X-Message-Id": "m-1"})
            stale = await http.post(
                erp.url,
                content=body,
                headers={
                    **signed,
                    "X-MES-Timestamp": stale_ts,
                    "X-MES-Signature": "sha256=" + stale_mac.hexdigest(),
                },
            )
            genuine = await http.post(erp.url, content=body, headers=signed)
    assert [r.status_code for r in (tampered, unsigned, stale, genuine)] == [401, 401, 401, 200]
    assert "does not match" in tampered.json()["detail"]
    assert [m.signature_valid for m in erp.messages] == [False, False, False, True]
    assert not erp.messages[-1].duplicate  # forged copies do not count as the message


@pytest.mark.postgres
async def test_every_callback_of_an_order_is_validly_signed(stack: Stack) -> None:
    assert stack.erp is not None
    assert stack.erp.signing_secret
    n = f"SIG-{uuid.uuid4().hex[:6]}"
    async with client(stack, "erp") as erp:
        r = await post_xml(
            erp, fresh("process-operations-schedule.xml", PO_2030_0001=n, PO_2030_0002=n + "-b")
        )
        assert r.status_code == 200, r.text
        ids = order_ids(stack, [n])
        await order_final(erp, ids[n], 90)
    async with asyncio.timeout(60):
        while not any("Completed" in m.text for m in stack.erp.messages if m.order_number == n):
            await asyncio.sleep(0.2)
    mine = [m for m in stack.erp.messages if m.order_number == n]
    assert len(mine) >= 3
    assert all(m.signature_valid for m in mine)
    # And every callback the receiver got during the whole session so far.
    assert all(m.signature_valid for m in stack.erp.messages)


# --- the callback URL policy -------------------------------------------------------------------

REFUSED = {
    "http://169.254.169.254/latest/meta-data": "metadata",
    "http://127.0.0.1:5432/": "loopback",
    "https://127.0.0.1:5432/": "loopback",
    "https://localhost/cb": "loopback",
    "https://[::1]/cb": "loopback",
    "https://[::ffff:127.0.0.1]/cb": "loopback",
    "https://169.254.10.1/cb": "link-local",
    "https://[fe80::1]/cb": "link-local",
    "https://[fd00:ec2::254]/": "metadata",
    "https://metadata.google.internal/computeMetadata/v1/": "metadata",
    "https://0.0.0.0/cb": "unspecified",
    "https://10.1.2.3/cb": "private",
    "https://172.16.0.1/cb": "private",
    "https://192.168.1.5/cb": "private",
    "https://[fc00::1]/cb": "private",
    "http://erp.example.com/cb": "https is required",
}


@pytest.fixture
async def default_api(stack: Stack) -> AsyncIterator[str]:
    """A second API on the stack's database with the default settings (no MES_CALLBACK_ALLOW):
    the stack's own allows loopback for its receiver."""
    settings = Settings(database_url=stack.settings.database_url, task_queue="mes-test")
    assert settings.callback_allow == ()
    async with api_server(settings, stack.sessions, stack.temporal) as url:
        yield url


def admin(url: str, stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {stack.tokens['admin']}"}, timeout=30
    )


@pytest.mark.postgres
async def test_registration_refuses_callback_urls_the_policy_forbids(
    stack: Stack, default_api: str
) -> None:
    name = f"erp-{uuid.uuid4().hex[:6]}"
    async with admin(default_api, stack) as http:
        for url, why in REFUSED.items():
            r = await http.put(
                f"/api/v1/erp-clients/{name}", json={"callback_url": url, "format": "json"}
            )
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            [error] = r.json()["errors"]
            assert error["field"] == "callback_url"
            assert why in error["reason"], (url, error)
        assert (await http.get(f"/api/v1/erp-clients/{name}")).status_code == 404

        ok = await http.put(
            f"/api/v1/erp-clients/{name}",
            json={"callback_url": "https://erp.example.com/mes", "format": "b2mml"},
        )
        assert ok.status_code == 200, ok.text
        secret = ok.json()["signing_secret"]
        assert len(secret) == 64
        shown = (await http.get(f"/api/v1/erp-clients/{name}")).json()
        assert shown["signing_secret"] is None  # shown once
        changed = await http.put(
            f"/api/v1/erp-clients/{name}",
            json={"callback_url": "https://erp.example.com/mes2", "format": "json"},
        )
        assert changed.json()["signing_secret"] is None
        rotated = await http.post(f"/api/v1/erp-clients/{name}/signing-secret")
        assert rotated.status_code == 200
        assert rotated.json()["signing_secret"] not in (None, secret)
        assert (await http.post("/api/v1/erp-clients/nobody/signing-secret")).status_code == 404
    async with httpx.AsyncClient(
        base_url=default_api,
        headers={"Authorization": f"Bearer {stack.tokens['erp']}"},
    ) as erp:
        assert (await erp.post(f"/api/v1/erp-clients/{name}/signing-secret")).status_code == 403


def test_the_allow_list_opens_private_nets_but_never_link_local_or_metadata() -> None:
    policy = CallbackPolicy.allowing(["10.0.0.0/8", "169.254.0.0/16", "fc00::/7", *LOOPBACK])
    policy.check_url("https://10.1.2.3/cb")
    policy.check_url("http://127.0.0.1:8001/cb")
    for url in (
        "https://169.254.169.254/",
        "https://169.254.1.1/",
        "https://[fd00:ec2::254]/",
        "http://10.1.2.3/cb",  # allowed address, but http beyond loopback
        "https://192.168.1.1/",  # not listed
    ):
        with pytest.raises(CallbackRefused):
            policy.check_url(url)
    with pytest.raises(ValueError, match="MES_CALLBACK_ALLOW"):
        CallbackPolicy.allowing(["10.0.0.0/33"])
    assert Settings.from_env({"MES_CALLBACK_ALLOW": " 10.0.0.0/8, ::1/128 "}).callback_allow == (
        "10.0.0.0/8",
        "::1/128",
    )


@pytest.mark.parametrize(
    ("host", "why"),
    [("127.0.0.1", "loopback address"), (socket.gethostname(), "resolves to")],
)
async def test_delivery_does_not_call_a_host_that_resolves_to_a_refused_address(
    plant_sqlite: sessionmaker[Session], tmp_path: Path, host: str, why: str
) -> None:
    """Registered while allowed (or by a name), refused at delivery: nothing reaches the
    receiver and the message records why, refused for good."""
    resolved = {i[4][0] for i in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    if all(PUBLIC_ONLY.refusal(ipaddress.ip_address(a)) is None for a in resolved):
        pytest.skip(f"{host} resolves to public addresses here: {resolved}")
    async with ErpReceiver(store=tmp_path / "erp.jsonl") as erp:
        scheme = "http" if host == "127.0.0.1" else "https"
        url = f"{scheme}://{host}:{erp.port}/callbacks"
        order_id = order_for_erp_client(plant_sqlite, "erp-x", url, ALLOW_LOOPBACK, "POL")
        activities = MesActivities(plant_sqlite, callback_policy=PUBLIC_ONLY)
        sent = await ActivityEnvironment().run(activities.deliver_reports, order_id)
        assert sent == 0
        assert erp.messages == []
    with plant_sqlite() as s:
        [msg] = s.scalars(select(ErpMessage).where(ErpMessage.operations_request_id == order_id))
        assert msg.rejected_at is not None
        assert msg.delivered_at is None
        assert msg.last_error is not None
        assert why in msg.last_error, msg.last_error
        assert "not sent" in msg.last_error


async def test_an_allowed_delivery_is_signed_with_the_clients_secret(
    plant_sqlite: sessionmaker[Session], tmp_path: Path
) -> None:
    async with ErpReceiver(store=tmp_path / "erp.jsonl") as erp:
        order_id = order_for_erp_client(plant_sqlite, "erp-x", erp.url, ALLOW_LOOPBACK, "POL")
        with plant_sqlite() as s:
            erp.signing_secret = s.scalars(
                select(ErpClient.signing_secret).where(ErpClient.name == "erp-x")
            ).one()
        activities = MesActivities(plant_sqlite, callback_policy=ALLOW_LOOPBACK)
        assert await ActivityEnvironment().run(activities.deliver_reports, order_id) == 1
    [m] = erp.messages
    assert m.signature_valid is True


# --- B2MML answers per client and per request -------------------------------------------------


@pytest.mark.postgres
async def test_another_clients_bodid_gets_its_own_answer_not_the_first_clients(
    stack: Stack,
) -> None:
    """Two ERPs happen to use the same BODID: the second gets an answer to its own message."""
    other = create_token(stack.sessions(), f"erp-other-{uuid.uuid4().hex[:6]}", Role.ERP)
    bod = str(uuid.uuid4())

    def message(product: str) -> bytes:
        n = f"BOD-{uuid.uuid4().hex[:6]}"
        body = fresh("process-operations-schedule.xml", PO_2030_0001=n, PO_2030_0002=n + "-b")
        body = body.replace(
            b"<MaterialDefinitionID>BREAD-WHITE<", f"<MaterialDefinitionID>{product}<".encode()
        )
        start = body.index(b"<BODID>") + len(b"<BODID>")
        return body[:start] + bod.encode() + body[body.index(b"</BODID>") :]

    async with client(stack, "erp") as first:
        a = await post_xml(first, message("SECRET-PRODUCT-OF-A"))
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {other}"}, timeout=30
    ) as second:
        b = await post_xml(second, message("PRODUCT-OF-B"))
    assert a.status_code == b.status_code == 422
    assert b"SECRET-PRODUCT-OF-A" in a.content
    assert b"SECRET-PRODUCT-OF-A" not in b.content
    assert b"PRODUCT-OF-B" in b.content


@pytest.mark.postgres
async def test_bad_b2mml_answers_over_http_carry_only_their_own_errors(stack: Stack) -> None:
    def bad(tag: str) -> bytes:
        return fresh("process-operations-schedule.xml").replace(
            b"<StartTime>2030-03-01T06:00:00+01:00</StartTime>",
            f"<StartTime>bad-{tag}</StartTime>".encode(),
        )

    async with client(stack, "erp") as erp:
        for n in range(25):
            assert (await post_xml(erp, bad(f"seq{n}x"))).status_code == 400
        last = await post_xml(erp, bad("seq26x"))
        together = await asyncio.gather(*(post_xml(erp, bad(f"par{n}x")) for n in range(8)))
    assert b"bad-seq26x" in last.content
    assert b"bad-seq0x" not in last.content
    assert last.content.count(b"bad-") == 1
    for n, r in enumerate(together):
        assert r.status_code == 400
        assert r.content.count(b"bad-") == 1
        assert f"bad-par{n}x".encode() in r.content


# --- smaller leaks -----------------------------------------------------------------------------


async def test_health_during_an_outage_names_no_host_port_or_driver_error() -> None:
    port = free_port()
    settings = Settings(database_url=f"postgresql://mes:pw-123@127.0.0.1:{port}/mes")
    async with api_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/health")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["title"] == "Database unavailable"
    for leak in (str(port), "127.0.0.1", "pw-123", "connection", "psycopg"):
        assert leak not in r.text.lower()


@pytest.mark.postgres
def test_db_upgrade_prints_the_url_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for url in fresh_pg_database("mes_cli"):
        # PostgreSQL here trusts local connections, so any password gets in.
        with_password = url.replace("postgres@", "postgres:Sup3r-Secret@")
        monkeypatch.setenv("MES_DATABASE_URL", with_password)
        assert main(["db", "upgrade"]) == 0
        out = capsys.readouterr().out
        assert "Sup3r-Secret" not in out
        assert "postgres:***@" in out


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [("9" * 5000, "sha256=00"), ("\uff11\uff12", "sha256=00"), ("-5", "sha256=00"), (None, "x")],
)
def test_odd_signature_headers_are_refused_not_crashed_on(
    timestamp: str | None, signature: str
) -> None:
    assert verify_signature(SECRET, timestamp, signature, b"{}") is not None
    now = str(int(time.time()))
    assert verify_signature(SECRET, now, "sha256=é", b"{}") == (
        "the signature does not match the body"
    )
