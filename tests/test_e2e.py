"""End to end on real parts: orders posted over HTTP to the API, run by Temporal workflows on
the OPC UA PLC simulator, recorded in PostgreSQL; then states, rows and genealogy checked."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from mes import samples
from mes.launch import Stack
from mes.models import (
    AuditEvent,
    JobOrder,
    JobResponse,
    MaterialActual,
    MaterialLotAssembly,
    OperationsRequest,
    SegmentData,
    TestResult,
)
from tests.conftest import client

pytestmark = pytest.mark.postgres
PROBLEM = "application/problem+json"


def new_order(
    product: str = "BREAD-WHITE", quantity: float | str = 10, **extra: Any
) -> dict[str, Any]:
    """An order body; a ``str`` quantity (like any ``extra``) builds a malformed one."""
    return {
        "order_number": f"T-{uuid.uuid4().hex[:8]}",
        "product": product,
        "quantity": quantity,
        "unit": "ea",
        "due": (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
        "priority": 100,
    } | extra


async def wait_final(http: httpx.AsyncClient, order_id: int, timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        o: dict[str, Any] = (await http.get(f"/api/v1/production-orders/{order_id}")).json()
        if o["state"] in ("Completed", "Aborted"):
            return o
        assert asyncio.get_running_loop().time() < deadline, f"order still {o['state']}: {o}"
        await asyncio.sleep(0.2)


def api(stack: Stack, role: str = "erp") -> httpx.AsyncClient:
    """An HTTP client of the stack's API with the token of ``role``."""
    return client(stack, role)


def order_count(stack: Stack) -> int:
    with stack.sessions() as s:
        return s.scalar(select(func.count()).select_from(OperationsRequest)) or 0


async def test_order_runs_to_completion_with_genealogy(stack: Stack) -> None:
    async with api(stack) as http, api(stack, "auditor") as audit:
        body = new_order("ROLL-6PK", 12, customer_order="SO-9")
        r = await http.post("/api/v1/production-orders", json=body)
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["state"] == "Released"
        assert accepted["late"] is False
        assert accepted["links"]["self"] == f"/api/v1/production-orders/{accepted['id']}"
        assert r.headers["location"] == accepted["links"]["self"]

        done = await wait_final(http, accepted["id"])
        assert done["state"] == "Completed"
        assert done["late"] is False
        assert [j["state"] for j in done["job_orders"]] == ["Completed"] * 3
        assert [j["segment"] for j in done["job_orders"]] == ["MIX", "BAKE", "PACK"]
        assert len(done["produced_lots"]) == 1
        produced = done["produced_lots"][0]
        assert produced["material"] == "ROLL-6PK"
        assert produced["quantity"] == 12

        with stack.sessions() as s:
            jobs = s.scalars(
                select(JobOrder).where(JobOrder.external_id.like(f"{body['order_number']}-%"))
            ).all()
            assert len(jobs) == 3
            job_ids = [j.id for j in jobs]
            responses = s.scalars(
                select(JobResponse).where(JobResponse.job_order_id.in_(job_ids))
            ).all()
            assert len(responses) == 3
            resp_ids = [r.id for r in responses]
            actuals = s.scalars(
                select(MaterialActual).where(MaterialActual.job_response_id.in_(resp_ids))
            ).all()
            consumed_raw = {
                a.material_lot.external_id
                for a in actuals
                if a.use == "Consumed"
                and a.material_lot.external_id.startswith("LOT-")
                and not a.material_lot.external_id.startswith(f"LOT-{body['order_number']}")
            }
            assert consumed_raw, "raw material lots were consumed"
            assert s.scalar(
                select(func.count())
                .select_from(SegmentData)
                .where(SegmentData.job_response_id.in_(resp_ids))
            )
            results = s.scalars(
                select(TestResult).where(TestResult.job_response_id.in_(resp_ids))
            ).all()
            assert results
            assert all(t.passed for t in results)
            edges = s.scalar(
                select(func.count())
                .select_from(MaterialLotAssembly)
                .where(MaterialLotAssembly.job_response_id.in_(resp_ids))
            )
            assert edges
            assert edges >= len(consumed_raw)
            audit_actions = set(
                s.scalars(
                    select(AuditEvent.action).where(AuditEvent.object_id == body["order_number"])
                )
            )
            assert {"order.created", "operations_request.state"} <= audit_actions

        back = (await audit.get(f"/api/v1/genealogy/lots/{produced['lot']}/backward")).json()
        assert back["lots"][0] == back["lots"][0] | {"lot": produced["lot"], "depth": 0}
        reached = {node["lot"] for node in back["lots"]}
        assert consumed_raw <= reached
        shallow = (
            await audit.get(f"/api/v1/genealogy/lots/{produced['lot']}/backward?depth=1")
        ).json()
        assert max(n["depth"] for n in shallow["lots"]) == 1
        assert len(shallow["lots"]) < len(back["lots"])

        raw = sorted(consumed_raw)[0]
        fwd = (await audit.get(f"/api/v1/genealogy/lots/{raw}/forward")).json()
        assert produced["lot"] in {node["lot"] for node in fwd["lots"]}


async def test_same_order_twice_is_one_order_one_workflow(stack: Stack) -> None:
    async with api(stack) as http:
        body = new_order()
        first = await http.post("/api/v1/production-orders", json=body)
        again = await http.post("/api/v1/production-orders", json=body)
        assert first.status_code == 202
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]

        changed = await http.post("/api/v1/production-orders", json=body | {"quantity": 11})
        assert changed.status_code == 409
        assert changed.headers["content-type"].startswith(PROBLEM)

        await wait_final(http, first.json()["id"])
        # After completion the same post still answers the existing order and starts nothing.
        late_retry = await http.post("/api/v1/production-orders", json=body)
        assert late_retry.status_code == 200
        assert late_retry.json()["state"] == "Completed"

    runs = [
        wf
        async for wf in stack.temporal.list_workflows(
            f"WorkflowId = 'order-{body['order_number']}'"
        )
    ]
    assert len(runs) == 1
    with stack.sessions() as s:
        assert (
            s.scalar(
                select(func.count())
                .select_from(OperationsRequest)
                .where(OperationsRequest.external_id == body["order_number"])
            )
            == 1
        )


async def test_past_due_order_is_accepted_and_late_from_the_start(stack: Stack) -> None:
    async with api(stack) as http:
        body = new_order(due=(datetime.now(UTC) - timedelta(days=1)).isoformat())
        r = await http.post("/api/v1/production-orders", json=body)
        assert r.status_code == 202
        assert r.json()["late"] is True
        done = await wait_final(http, r.json()["id"])
        assert done["state"] == "Completed"
        assert done["late"] is True
        listed = (await http.get("/api/v1/production-orders", params={"state": "Completed"})).json()
        assert body["order_number"] in {o["order_number"] for o in listed}
        assert all(o["state"] == "Completed" for o in listed)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"product": "BREAD-WHITE"}, 400, "order_number"),
        (new_order(quantity=0), 400, "quantity"),
        (new_order(quantity=-3), 400, "quantity"),
        (new_order(quantity="ten"), 400, "quantity"),
        (new_order(priority="urgent"), 400, "priority"),
        (new_order(due="someday"), 400, "due"),
        (new_order(product="NO-SUCH-THING"), 422, "product"),
        (new_order(product="FLOUR"), 422, "product"),  # a raw material: no routing
        (new_order(unit="kg"), 422, "unit"),
        ([1, 2, 3], 400, None),
        ("just a string", 400, None),
    ],
)
async def test_malformed_orders_are_refused_and_create_nothing(
    stack: Stack, body: Any, status: int, field: str | None
) -> None:
    before = order_count(stack)
    async with api(stack) as http:
        r = await http.post("/api/v1/production-orders", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    if field is not None:
        assert field in {e["field"] for e in problem["errors"]}, problem
    assert order_count(stack) == before


async def test_bad_json_and_huge_bodies_are_refused(stack: Stack) -> None:
    before = order_count(stack)
    async with api(stack) as http, api(stack, "auditor") as audit:
        r = await http.post(
            "/api/v1/production-orders",
            content=b'{"order_number": "X-1", ',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert r.headers["content-type"].startswith(PROBLEM)
        huge = b'{"order_number": "X-2", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
        r = await http.post(
            "/api/v1/production-orders",
            content=huge,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert r.headers["content-type"].startswith(PROBLEM)
        missing = await http.get("/api/v1/production-orders/999999")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith(PROBLEM)
        bad_state = await http.get("/api/v1/production-orders", params={"state": "Nope"})
        assert bad_state.status_code == 400
        assert bad_state.headers["content-type"].startswith(PROBLEM)
        no_lot = await audit.get("/api/v1/genealogy/lots/NO-SUCH-LOT/backward")
        assert no_lot.status_code == 404
    assert order_count(stack) == before


async def test_master_data_and_health(stack: Stack) -> None:
    async with api(stack) as http:
        health = await http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        products = {p["id"]: p for p in (await http.get("/api/v1/products")).json()}
        assert {"BREAD-WHITE", "ROLL-6PK"} <= set(products)
        tree = (await http.get("/api/v1/equipment")).json()

    units: list[dict[str, Any]] = []

    def walk(nodes: list[dict[str, Any]]) -> None:
        for n in nodes:
            if n["level"] == "WorkUnit":
                units.append(n)
            walk(n.get("children", []))

    walk(tree)
    # Other tests share this database and add units of their own: check the sample plant's.
    plant_units = set(re.findall(r"\bWU-[A-Z0-9-]+", samples.plant_text()))
    urls = {u["id"]: u["endpoint"]["url"] for u in units if u["id"] in plant_units}
    assert len(urls) >= 3
    legacy = {unit: sim.url for unit, sim in stack.modbus.items()}
    assert legacy == {"WU-LABELLER-1": legacy["WU-LABELLER-1"]}
    assert urls == dict.fromkeys(set(urls) - set(legacy), stack.plc_url) | legacy


async def test_workflow_histories_replay_deterministically(stack: Stack) -> None:
    """The recorded histories of a finished order replay against today's workflow code."""
    from temporalio.worker import Replayer

    from workflows.worker import WORKFLOWS

    async with api(stack) as http:
        r = await http.post("/api/v1/production-orders", json=new_order("ROLL-6PK", 3))
        order = await wait_final(http, r.json()["id"])
    ids = [order["workflow_id"]] + [f"job-{j['id']}" for j in order["job_orders"]]
    replayer = Replayer(workflows=WORKFLOWS)
    for wf_id in ids:
        history = await stack.temporal.get_workflow_handle(wf_id).fetch_history()
        result = await replayer.replay_workflow(history)
        assert result.replay_failure is None, (wf_id, result.replay_failure)
