"""The hand-made attacks of issue 11 (finding 6), each answered 4xx problem+json naming the
parameter, and nothing changed: before the fix each of these was a 500, a wildcard, or a
number read as a time."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from mes.launch import Stack

pytestmark = pytest.mark.postgres

TOO_BIG_ID = "2147483648"  # one past PostgreSQL's integer
TOO_BIG_OFFSET = "9223372036854775808"  # one past bigint

#: (role, method, URL, field the answer must name)
ATTACKS_IN_THE_URL = [
    ("erp", "GET", f"/api/v1/production-orders/{TOO_BIG_ID}", "order_id"),
    ("erp", "GET", f"/api/v1/production-orders/{TOO_BIG_ID}/performance", "order_id"),
    ("supervisor", "POST", f"/api/v1/production-orders/{TOO_BIG_ID}/hold", "order_id"),
    ("supervisor", "PATCH", f"/api/v1/production-orders/{TOO_BIG_ID}", "order_id"),
    ("supervisor", "GET", "/api/v1/production-orders/-1", "order_id"),
    ("erp", "GET", f"/api/v1/production-orders?offset={TOO_BIG_OFFSET}", "offset"),
    ("supervisor", "GET", f"/api/v1/work-orders?offset={TOO_BIG_OFFSET}", "offset"),
    ("auditor", "GET", f"/api/v1/audit-events?offset={TOO_BIG_OFFSET}", "offset"),
    ("auditor", "GET", "/api/v1/audit-events?limit=100000", "limit"),
    ("supervisor", "GET", "/api/v1/work-orders?equipment=a%00b", "equipment"),
    ("supervisor", "GET", "/api/v1/work-orders?work_center=a%00b", "work_center"),
    ("supervisor", "GET", "/api/v1/work-orders?production_order=a%00b", "production_order"),
    ("auditor", "GET", "/api/v1/audit-events?actor=a%00b", "actor"),
    ("auditor", "GET", "/api/v1/audit-events?object_id=a%00b", "object_id"),
    ("supervisor", "GET", "/api/v1/work-orders/a%00b", "job_id"),
    ("supervisor", "POST", "/api/v1/work-orders/a%00b/hold", "job_id"),
    ("supervisor", "GET", "/api/v1/work-centers/a%00b/dispatch-list", "work_center"),
    ("auditor", "GET", "/api/v1/genealogy/lots/a%00b/backward", "lot"),
    ("admin", "DELETE", "/api/v1/tokens/a%00b", "name"),
    ("admin", "GET", "/api/v1/erp-clients/a%00b", "name"),
    ("auditor", "GET", "/api/v1/audit-events?until=0.5", "until"),
    ("auditor", "GET", "/api/v1/audit-events?since=1700000000", "since"),
    ("auditor", "GET", "/api/v1/audit-events?since=2024-05-01T06:00:00", "since"),  # no zone
    ("supervisor", "GET", "/api/v1/work-orders?due_before=0.5", "due_before"),
]

DEEP = b"[" * 200_000 + b"]" * 200_000
#: (role, method, URL, body, field the answer must name)
ATTACKS_IN_THE_BODY = [
    ("admin", "POST", "/api/v1/tokens", b'{"name": "x", "role": "erp\\u0000"}', "body.role"),
    ("admin", "POST", "/api/v1/master-data", b'{"materials": [{"id": "a\\u0000"}]}', "body"),
    ("admin", "POST", "/api/v1/master-data", b'{"a\\u0000": 1}', "body"),
    ("supervisor", "POST", "/api/v1/production-orders/1/hold", b'{"reason": "\\u0000"}', "body"),
    ("erp", "POST", "/api/v1/production-orders", DEEP, "body"),
    ("admin", "POST", "/api/v1/master-data", DEEP, "body"),
    ("admin", "POST", "/api/v1/tokens", b'{"name": "\xff\xfe", "role": "erp"}', "body"),
    ("admin", "POST", "/api/v1/master-data", b'{"materials\xc3": []}', "body"),
]


async def _footprint(http: httpx.AsyncClient, stack: Stack) -> tuple[Any, ...]:
    """What an attack must not change: the audit trail, the orders, the tokens."""
    auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
    admin = {"Authorization": f"Bearer {stack.tokens['admin']}"}
    chain = (await http.get("/api/v1/audit-events/verify", headers=auditor)).json()
    orders = (await http.get("/api/v1/production-orders?limit=1000", headers=auditor)).json()
    tokens = (await http.get("/api/v1/tokens", headers=admin)).json()
    return chain["events"], chain["intact"], orders, tokens


def _assert_refused(r: httpx.Response, field: str) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    problem = r.json()
    assert problem["status"] == r.status_code
    assert any(e["field"].startswith(field) for e in problem.get("errors", [])), problem


@pytest.mark.parametrize(("role", "method", "url", "field"), ATTACKS_IN_THE_URL)
async def test_hostile_parameters_are_refused(
    stack: Stack, role: str, method: str, url: str, field: str
) -> None:
    headers = {"Authorization": f"Bearer {stack.tokens[role]}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        before = await _footprint(http, stack)
        r = await http.request(method, url, headers=headers)
        _assert_refused(r, field)
        assert r.status_code == 400
        assert await _footprint(http, stack) == before


@pytest.mark.parametrize(("role", "method", "url", "body", "field"), ATTACKS_IN_THE_BODY)
async def test_hostile_bodies_are_refused(
    stack: Stack, role: str, method: str, url: str, body: bytes, field: str
) -> None:
    headers = {
        "Authorization": f"Bearer {stack.tokens[role]}",
        "Content-Type": "application/json",
    }
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        before = await _footprint(http, stack)
        r = await http.request(method, url, headers=headers, content=body)
        _assert_refused(r, field)
        assert r.status_code == 400
        assert await _footprint(http, stack) == before


async def test_like_wildcards_in_a_filter_are_literal(stack: Stack) -> None:
    auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        everything = (await http.get("/api/v1/audit-events", headers=auditor)).json()["items"]
        assert everything, "the sample plant's load leaves audit events"
        for wildcard in ("%", "_", "%25%", "\\"):
            r = await http.get("/api/v1/audit-events", params={"actor": wildcard}, headers=auditor)
            assert r.status_code == 200, r.text
            assert r.json()["items"] == [], wildcard  # no actor's name starts with it
        some = everything[0]["actor"]
        r = await http.get("/api/v1/audit-events", params={"actor": some[:3]}, headers=auditor)
        assert r.json()["items"], "a real prefix still matches"


async def test_a_time_with_its_zone_is_taken(stack: Stack) -> None:
    auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        for until in ("2999-01-01T00:00:00Z", "2999-01-01T02:00:00+02:00"):
            r = await http.get("/api/v1/audit-events", params={"until": until}, headers=auditor)
            assert r.status_code == 200, r.text
            assert r.json()["items"]
