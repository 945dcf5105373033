"""Supervisors steer work orders through the API; the actions reach the PLC (OPC UA job
control), the database and the audit trail. The walk of issue 4's acceptance, on real parts.

The plant is the sample plant with roll dough mixed on one mixer only, so the roll orders
queue on WU-MIXER-1 and their order there is decided by holds, cancels and priorities.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asyncua.client.client import Client
from temporalio.testing import WorkflowEnvironment

from adapters.opcua.model import JOBCONTROL_NS_URI
from adapters.opcua.simulator import SIM_NAMESPACE_URI
from mes.launch import Stack
from mes.samples import plant_text
from tests.conftest import client, fresh_stack, order_final, post_order

pytestmark = pytest.mark.postgres
MIXER = "WU-MIXER-1"


@pytest.fixture(scope="module")
async def line(
    temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    plant = yaml.safe_load(plant_text())
    for wm in plant["work_masters"]:
        if wm["id"] == "WM-MIX-ROLL":
            wm["work_units"] = [u for u in wm["work_units"] if u["equipment"] == MIXER]
    plant_file = tmp_path_factory.mktemp("plant") / "plant.yaml"
    plant_file.write_text(yaml.safe_dump(plant))
    async with fresh_stack(
        temporal_env, "steer", plant_file=Path(plant_file), cycle_time_s=2.5
    ) as stack:
        yield stack


async def post_rolls(erp: httpx.AsyncClient) -> dict[str, Any]:
    return await post_order(erp, "ROLL-6PK", 6, prefix="S")


async def work_order(sup: httpx.AsyncClient, job: str) -> dict[str, Any]:
    r = await sup.get(f"/api/v1/work-orders/{job}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def until(
    sup: httpx.AsyncClient, job: str, state: str, timeout: float = 30
) -> dict[str, Any]:
    """Wait for a work order to reach ``state`` (it may not be planned yet at first)."""
    async with asyncio.timeout(timeout):
        while True:
            r = await sup.get(f"/api/v1/work-orders/{job}")
            if r.status_code == 200 and r.json()["state"] == state:
                out: dict[str, Any] = r.json()
                return out
            assert r.status_code in (200, 404), r.text
            await asyncio.sleep(0.1)


async def plc_becomes(stack: Stack, unit: str, job: str, state: int | None) -> None:
    """Wait until the PLC shows ``job`` in ``state`` (None: gone from its list): decisions
    are answered at once and carried out on the machine just after. One session reads the
    list until then (a session per look spent the time on loading types under load)."""
    seen: dict[str, int] = {}
    try:
        async with asyncio.timeout(30), plc_job_list(stack, unit) as read:
            while (seen := await read()).get(job) != state:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{job} not in state {state} on {unit} after 30 s: {seen}") from None


@contextlib.asynccontextmanager
async def plc_job_list(
    stack: Stack, unit: str
) -> AsyncIterator[Callable[[], Awaitable[dict[str, int]]]]:
    """An independent OPC UA session on the unit's JobOrderList; yields its reader."""
    async with Client(stack.plc_url) as opcua:
        await opcua.load_data_type_definitions()
        jc = await opcua.get_namespace_index(JOBCONTROL_NS_URI)
        sim = await opcua.get_namespace_index(SIM_NAMESPACE_URI)
        node = await opcua.nodes.objects.get_child(
            [
                f"{sim}:{unit}",
                f"{sim}:JobManagement",
                f"{sim}:JobOrderControl",
                f"{jc}:JobOrderList",
            ]
        )

        async def read() -> dict[str, int]:
            return {e.JobOrder.JobOrderID: e.State[0].StateNumber for e in await node.read_value()}

        yield read


async def test_hold_cancel_reprioritise_on_a_busy_mixer(line: Stack) -> None:
    async with (
        client(line, "erp") as erp,
        client(line, "supervisor") as sup,
        client(line, "auditor") as aud,
    ):
        a = await post_rolls(erp)
        a_mix = f"{a['order_number']}-01"
        await until(sup, a_mix, "Running")

        held = await sup.post(f"/api/v1/work-orders/{a_mix}/hold", json={"reason": "jam at infeed"})
        assert held.status_code == 200, held.text
        assert held.json()["state"] == "Held"
        assert held.json()["allowed_actions"] == ["resume", "cancel", "priority"]
        await plc_becomes(line, MIXER, a_mix, 4)  # Interrupted

        # While the mixer is held, three more roll orders queue behind it.
        c, d, e = [await post_rolls(erp) for _ in range(3)]
        c_mix, d_mix, e_mix = (f"{o['order_number']}-01" for o in (c, d, e))
        for job in (c_mix, d_mix, e_mix):
            await until(sup, job, "Ready")

        not_now = await sup.post(f"/api/v1/work-orders/{c_mix}/resume", json={})
        assert not_now.status_code == 409
        assert not_now.headers["content-type"].startswith("application/problem+json")
        assert "allowed now: hold, cancel, priority" in not_now.json()["detail"]

        cancelled = await sup.post(
            f"/api/v1/work-orders/{c_mix}/cancel", json={"reason": "customer withdrew"}
        )
        assert cancelled.status_code == 200, cancelled.text
        # Answered at once; removing it from the PLC is what is left to do.
        answer = cancelled.json()
        assert answer["state"] == "Cancelled" or answer["pending_on_machine"] == ["cancel"]
        await until(sup, c_mix, "Cancelled")
        await plc_becomes(line, MIXER, c_mix, None)

        moved = await sup.patch(
            f"/api/v1/work-orders/{e_mix}", json={"priority": 900, "reason": "rush for SO-7"}
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["priority"] == 900
        queue = [
            w["id"] for w in (await sup.get("/api/v1/work-centers/LINE-1/dispatch-list")).json()
        ]
        assert queue.index(e_mix) < queue.index(d_mix)

        wrong_unit = await sup.patch(
            f"/api/v1/work-orders/{e_mix}", json={"equipment": "WU-OVEN-1"}
        )
        assert wrong_unit.status_code == 409  # dispatched: its equipment is fixed

        resumed = await sup.post(f"/api/v1/work-orders/{a_mix}/resume", json={"reason": "cleared"})
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["state"] == "Running"
        await plc_becomes(line, MIXER, a_mix, 3)  # Running again

        finals = {o["order_number"]: await order_final(erp, o["id"]) for o in (a, c, d, e)}
        assert finals[a["order_number"]]["state"] == "Completed"
        assert finals[c["order_number"]]["state"] == "Cancelled"
        assert finals[d["order_number"]]["state"] == "Completed"
        assert finals[e["order_number"]]["state"] == "Completed"
        e_started = (await work_order(sup, e_mix))["started_at"]
        d_started = (await work_order(sup, d_mix))["started_at"]
        assert e_started < d_started  # the reprioritised order ran first

        # The audit trail shows each action with its actor and reason.
        history = {job: (await work_order(sup, job))["history"] for job in (a_mix, c_mix, e_mix)}
        supervisor = next(h["actor"] for h in history[a_mix] if h["after"] == {"state": "Held"})
        assert supervisor.endswith("(supervisor)")
        assert {"jam at infeed", "cleared"} <= {h["reason"] for h in history[a_mix]}
        assert any(h["reason"] == "customer withdrew" for h in history[c_mix])
        assert any(
            h["after"] == {"priority": 900} and h["reason"] == "rush for SO-7"
            for h in history[e_mix]
        )
        events = (
            await aud.get("/api/v1/audit-events", params={"actor": supervisor.split(" ")[0]})
        ).json()["items"]
        assert len(events) >= 4
        verify = (await aud.get("/api/v1/audit-events/verify")).json()
        assert verify["intact"] is True


async def test_order_level_actions(line: Stack) -> None:
    async with client(line, "erp") as erp, client(line, "supervisor") as sup:
        blocker = await post_rolls(erp)
        blocker_mix = f"{blocker['order_number']}-01"
        await until(sup, blocker_mix, "Running")
        held = await sup.post(
            f"/api/v1/production-orders/{blocker['id']}/hold", json={"reason": "QA"}
        )
        assert held.status_code == 200, held.text
        assert held.json()["state"] == "Held"

        queued = await post_rolls(erp)
        await until(sup, f"{queued['order_number']}-01", "Ready")
        cancel = await sup.post(
            f"/api/v1/production-orders/{queued['id']}/cancel", json={"reason": "duplicate"}
        )
        assert cancel.status_code == 200, cancel.text
        assert (await order_final(erp, queued["id"]))["state"] == "Cancelled"

        reprio = await sup.patch(f"/api/v1/production-orders/{blocker['id']}", json={"priority": 5})
        assert reprio.status_code == 200, reprio.text
        assert reprio.json()["priority"] == 5
        resumed = await sup.post(f"/api/v1/production-orders/{blocker['id']}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["state"] == "Running"
        assert (await order_final(erp, blocker["id"]))["state"] == "Completed"

        again = await sup.post(f"/api/v1/production-orders/{blocker['id']}/hold")
        assert again.status_code == 409


async def test_erp_cancels_a_held_order_by_b2mml(line: Stack) -> None:
    from tests.test_erp_integration import fresh, post_xml, valid

    async with client(line, "erp") as erp, client(line, "supervisor") as sup:
        order = await post_rolls(erp)
        n = order["order_number"]
        await until(sup, f"{n}-01", "Running")
        held = await sup.post(f"/api/v1/production-orders/{order['id']}/hold")
        assert held.status_code == 200, held.text
        r = await post_xml(erp, fresh("cancel-operations-schedule.xml", PO_2030_0002=n))
        assert r.status_code == 200, r.text
        assert valid(r.content).tag.endswith("ConfirmBOD")
        done = await order_final(erp, order["id"])
        # The started job was aborted on its PLC; the steps after it never ran; the order
        # ends as the ERP asked.
        assert done["state"] == "Cancelled"
        assert [j["state"] for j in done["job_orders"]] == ["Aborted", "Cancelled", "Cancelled"]


async def test_move_a_waiting_work_order_to_another_capable_unit(line: Stack) -> None:
    async with client(line, "erp") as erp, client(line, "supervisor") as sup:
        body = {
            "order_number": f"M-{uuid.uuid4().hex[:6]}",
            "product": "BREAD-WHITE",
            "quantity": 6,
            "unit": "ea",
            "due": (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
            "priority": 10,
        }
        order = (await erp.post("/api/v1/production-orders", json=body)).json()
        n = order["order_number"]
        await until(sup, f"{n}-01", "Running")
        bake = await work_order(sup, f"{n}-02")
        assert bake["state"] == "Waiting"
        other = "WU-OVEN-1" if bake["equipment"] == "WU-OVEN-2" else "WU-OVEN-2"

        cannot = await sup.patch(f"/api/v1/work-orders/{n}-02", json={"equipment": MIXER})
        assert cannot.status_code == 422, cannot.text
        assert "cannot run" in cannot.json()["detail"]
        empty = await sup.patch(f"/api/v1/work-orders/{n}-02", json={})
        assert empty.status_code == 422  # well-formed, but changes nothing

        moved = await sup.patch(
            f"/api/v1/work-orders/{n}-02", json={"equipment": other, "reason": "oven down"}
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["equipment"] == other
        done = await order_final(erp, order["id"])
        assert done["state"] == "Completed"
        assert [j["equipment"] for j in done["job_orders"]][1] == other
