"""``mes demo``: the whole product once, on embedded defaults.

The services are started by :func:`mes.launch.embedded_stack` (on a fresh SQLite database in a
temporary directory, with the packaged sample plant). The demo then acts as the ERP: it posts
orders over HTTP, follows them through the API until they end, then prints each order's
outcome, what the ERP received and the genealogy trace of one produced lot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from mes.launch import embedded_stack, print_tokens
from mes.settings import Settings
from mes.states import RequestState, is_final


def demo_orders(now: datetime) -> list[dict[str, Any]]:
    """What the pretend ERP sends: two products, one order already past its due date."""
    stamp = now.strftime("%H%M%S")
    return [
        {
            "order_number": f"PO-{stamp}-1",
            "product": "BREAD-WHITE",
            "quantity": 120,
            "unit": "ea",
            "due": (now + timedelta(hours=8)).isoformat(),
            "priority": 500,
            "customer_order": "SO-1001",
        },
        {
            "order_number": f"PO-{stamp}-2",
            "product": "ROLL-6PK",
            "quantity": 40,
            "unit": "ea",
            "due": (now + timedelta(hours=4)).isoformat(),
            "priority": 700,
        },
        {
            "order_number": f"PO-{stamp}-3",
            "product": "BREAD-WHITE",
            "quantity": 60,
            "unit": "ea",
            "due": (now - timedelta(hours=1)).isoformat(),
            "priority": 900,
            "customer_order": "SO-1002 (rush, already late)",
        },
    ]


async def run_demo(timeout_s: float = 100) -> int:
    """Run the demo; returns the process exit code (0 when every order completed)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mes-demo-"))
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'mes.db'}",
        plc_poll_seconds=0.2,
        audit_key_file=workdir / "audit-key.pem",
        audit_checkpoint_file=workdir / "audit-checkpoints.jsonl",
    )
    print(
        "Starting the embedded MES: SQLite, Temporal dev server, OPC UA PLC simulator, "
        "worker, API ..."
    )
    async with embedded_stack(
        settings, cycle_time_s=1.0, temporal_ui=False, token_prefix="demo"
    ) as stack:
        print(f"  API            {stack.api_url}  (docs: {stack.api_url}/schema)")
        print(f"  Temporal       {stack.temporal_address}")
        print(f"  PLC simulator  {stack.plc_url}  units: {', '.join(stack.units)}")
        print(f"  database       {settings.database_url}")
        print_tokens(stack.tokens)
        erp = {"Authorization": f"Bearer {stack.tokens['erp']}"}
        auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30, headers=erp) as http:
            products = (await http.get("/api/v1/products")).json()
            print(f"Products: {', '.join(p['id'] for p in products)}")
            ids: dict[str, int] = {}
            for body in demo_orders(datetime.now(UTC)):
                r = await http.post("/api/v1/production-orders", json=body)
                r.raise_for_status()
                order = r.json()
                ids[body["order_number"]] = order["id"]
                print(
                    f"ERP posted {body['order_number']}: {body['quantity']} {body['unit']} "
                    f"{body['product']} -> {r.status_code} {order['state']}"
                    f"{' (late)' if order['late'] else ''}"
                )
            results = await _follow(http, ids, started + timeout_s)
            print()
            print(f"{'order':<18}{'product':<13}{'state':<11}{'on time':<9}lots produced")
            for o in results.values():
                lots = ", ".join(lot["lot"] for lot in o["produced_lots"]) or "-"
                print(
                    f"{o['order_number']:<18}{o['product']:<13}{o['state']:<11}"
                    f"{'late' if o['late'] else 'yes':<9}{lots}"
                )
            if stack.erp is not None:
                # Deliveries run on after completion; give the last ones a moment.
                await _await_erp(stack.erp, len(results), started + timeout_s)
                print()
                print(f"What the ERP received at {stack.erp.url}:")
                for m in stack.erp.messages:
                    state = _performance_state(m.text)
                    signed = "signature ok" if m.signature_valid else "BAD SIGNATURE"
                    print(
                        f"  #{m.seq:<3}{m.order_number or '-':<18}{m.message_id:<28}"
                        f"{m.content_type:<17}{state:<11}{signed}"
                        f"{'  (duplicate)' if m.duplicate else ''}"
                    )
            done = [o for o in results.values() if o["produced_lots"]]
            if done:
                lot = done[0]["produced_lots"][0]["lot"]
                trace = (
                    await http.get(f"/api/v1/genealogy/lots/{lot}/backward", headers=auditor)
                ).json()
                print()
                print(f"Genealogy, backward from {lot}:")
                _print_tree(trace, lot, "  ")
    ok = bool(results) and all(o["state"] == RequestState.COMPLETED for o in results.values())
    print(
        f"\nDemo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s; "
        "all services stopped."
    )
    return 0 if ok else 1


async def _follow(
    http: httpx.AsyncClient, ids: dict[str, int], deadline: float
) -> dict[str, dict[str, Any]]:
    """Poll the orders, printing each change of order or work-order state, until all end."""
    seen: dict[str, str] = {}
    latest: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for number, oid in ids.items():
            o = (await http.get(f"/api/v1/production-orders/{oid}")).json()
            latest[number] = o
            line = (
                o["state"]
                + " | "
                + " ".join(
                    f"{j['step']}:{j['segment']}@{j['equipment']}={j['state']}"
                    for j in o["job_orders"]
                )
            )
            if seen.get(number) != line:
                seen[number] = line
                print(f"  {number:<18}{line}")
        if all(is_final(o["state"]) for o in latest.values()):
            break
        await asyncio.sleep(0.5)
    return latest


async def _await_erp(erp: Any, orders: int, deadline: float) -> None:
    """Wait until every order's final report arrived (or the deadline passed)."""
    while time.monotonic() < deadline:
        ended = {m.order_number for m in erp.messages if is_final(_performance_state(m.text))}
        if len(ended) >= orders:
            return
        await asyncio.sleep(0.2)


def _performance_state(body: str) -> str:
    """The order state an ERP message reports (B2MML or JSON)."""
    # B2MML: <ResponseState>Completed</…> or, for states it has no name for,
    # <ResponseState OtherValue="Released">Other</…>.
    match = re.search(r'ResponseState(?:\s+OtherValue="([^"]+)")?\s*>([^<]+)<', body)
    if match:
        return match.group(1) or match.group(2)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(body)["operations_performance"]["state"])
    return "?"


def _print_tree(trace: dict[str, Any], lot: str, indent: str) -> None:
    lots = {node["lot"]: node for node in trace["lots"]}

    def show(lot_id: str, depth: int) -> None:
        node = lots[lot_id]
        print(f"{indent}{'   ' * depth}{lot_id} ({node['material']})")
        for edge in trace["edges"]:
            if edge["lot"] == lot_id:
                show(edge["component"], depth + 1)

    show(lot, 0)
