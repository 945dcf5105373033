"""``mes demo``: the whole product once, on embedded defaults.

The services are started by :func:`mes.launch.embedded_stack` (on a fresh SQLite database in a
temporary directory, with the packaged sample plant). The demo then acts as the ERP: it posts
orders over HTTP, follows them through the API until they end, then prints each order's
outcome, what the ERP received and the genealogy trace of one produced lot. The simulated
packer weighs a bag out of specification: its lot is Restricted, its work order held and a
nonconformance opened; the demo's supervisor releases it over the API (after a re-weigh).
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

from adapters.opcua.simulator import MeasuredFault, Stoppages
from mes.launch import embedded_stack, print_tokens
from mes.settings import Settings
from mes.states import RequestState, is_final

#: The simulated plant's quality faults: the packer weighs a bag out of specification half
#: the time (with this seed, its first bag), and the ovens' core temperature drifts a
#: little with every loaf (within specification over the demo).
DEMO_FAULTS = {
    "PackWeight": MeasuredFault(defect_rate=0.5),
    "CoreTemperature": MeasuredFault(drift=0.1),
}
DEMO_SEED = 7
#: Now and then a unit stops (a fault with its reason, or a micro-stop), for OEE to show.
DEMO_STOPPAGES = Stoppages(micro_stop_rate=0.3, micro_stop_s=0.3, fault_rate=0.15, fault_s=1.0)


def demo_orders(now: datetime) -> list[dict[str, Any]]:
    """What the pretend ERP sends: three products (one labelled on the legacy Modbus
    labeller), one order already past its due date."""
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
        {
            "order_number": f"PO-{stamp}-4",
            "product": "BREAD-WHITE-LBL",
            "quantity": 48,
            "unit": "ea",
            "due": (now + timedelta(hours=6)).isoformat(),
            "priority": 600,
            "customer_order": "SO-1003",
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
        settings,
        cycle_time_s=1.0,
        temporal_ui=False,
        token_prefix="demo",
        measured_faults=DEMO_FAULTS,
        sim_seed=DEMO_SEED,
        sim_stoppages=DEMO_STOPPAGES,
    ) as stack:
        print(f"  API            {stack.api_url}  (docs: {stack.api_url}/schema)")
        print(f"  Temporal       {stack.temporal_address}")
        print(f"  PLC simulator  {stack.plc_url}  units: {', '.join(stack.units)}")
        print(f"  database       {settings.database_url}")
        print_tokens(stack.tokens)
        erp = {"Authorization": f"Bearer {stack.tokens['erp']}"}
        auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
        supervisor = {"Authorization": f"Bearer {stack.tokens['supervisor']}"}
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30, headers=erp) as http:
            products = (await http.get("/api/v1/products")).json()
            print(f"Products: {', '.join(p['id'] for p in products)}")
            ids: dict[str, int] = {}
            since = datetime.now(UTC)
            for body in demo_orders(since):
                r = await http.post("/api/v1/production-orders", json=body)
                r.raise_for_status()
                order = r.json()
                ids[body["order_number"]] = order["id"]
                print(
                    f"ERP posted {body['order_number']}: {body['quantity']} {body['unit']} "
                    f"{body['product']} -> {r.status_code} {order['state']}"
                    f"{' (late)' if order['late'] else ''}"
                )
            results = await _follow(http, ids, started + timeout_s, supervisor)
            print()
            print(f"{'order':<18}{'product':<17}{'state':<11}{'on time':<9}lots produced")
            for o in results.values():
                lots = ", ".join(lot["lot"] for lot in o["produced_lots"]) or "-"
                print(
                    f"{o['order_number']:<18}{o['product']:<17}{o['state']:<11}"
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
            await _print_quality(http, supervisor)
            await _print_kpis(http, supervisor, stack.units, since)
            done = [o for o in results.values() if o["produced_lots"]]
            if done:
                lot = done[-1]["produced_lots"][0]["lot"]
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
    http: httpx.AsyncClient, ids: dict[str, int], deadline: float, supervisor: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Poll the orders, printing each change of order or work-order state, until all end;
    the supervisor disposes of each nonconformance that opens meanwhile."""
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
        await _dispose_open(http, supervisor)
        await asyncio.sleep(0.5)
    return latest


async def _dispose_open(http: httpx.AsyncClient, supervisor: dict[str, str]) -> None:
    """The supervisor releases each open nonconformance (a re-weigh found it good)."""
    r = await http.get("/api/v1/quality/nonconformances?state=Open", headers=supervisor)
    for nc in r.json()["items"]:
        print(
            f"  QUALITY HOLD {nc['id']}: lot {nc['lot']} Restricted, work order "
            f"{nc['work_order']} Held ({nc['reason']})"
        )
        decision = {"disposition": "release", "reason": "re-weighed on the bench scale: in spec"}
        d = await http.post(
            f"/api/v1/quality/nonconformances/{nc['id']}/disposition",
            json=decision,
            headers=supervisor,
        )
        d.raise_for_status()
        out = d.json()
        print(
            f"  supervisor {out['disposed_by']}: {out['disposition']} {out['id']} "
            f"({out['disposition_reason']}) -> lot {out['lot_disposition']}"
        )


async def _print_quality(http: httpx.AsyncClient, supervisor: dict[str, str]) -> None:
    """The nonconformances and the first-pass yield by product and work unit."""
    ncs = (await http.get("/api/v1/quality/nonconformances", headers=supervisor)).json()
    print()
    print(f"Nonconformances: {ncs['total']}")
    for nc in ncs["items"]:
        print(
            f"  {nc['id']:<26}{nc['state']:<8}{nc['disposition'] or '-':<9}"
            f"by {nc['disposed_by'] or '-'}: {nc['disposition_reason'] or nc['reason']}"
        )
    rows = (await http.get("/api/v1/quality/yield", headers=supervisor)).json()
    print(f"{'product':<16}{'work unit':<14}{'produced':>10}{'FPY':>8}{'scrap':>8}")
    for row in rows:
        fpy = "-" if row["first_pass_yield"] is None else f"{row['first_pass_yield']:.0%}"
        scrap = "-" if row["scrap_ratio"] is None else f"{row['scrap_ratio']:.0%}"
        print(f"{row['product']:<16}{row['work_unit']:<14}{row['produced']:>10g}{fpy:>8}{scrap:>8}")


async def _print_kpis(
    http: httpx.AsyncClient, supervisor: dict[str, str], units: list[str], since: datetime
) -> None:
    """OEE per work unit since the demo began, and OTD / OTIF of its orders."""
    now = datetime.now(UTC)
    print()
    print(f"{'work unit':<14}{'avail.':>8}{'perf.':>8}{'quality':>9}{'OEE':>8}  top downtime")
    for unit in units:
        period = {"equipment": unit, "from": since.isoformat(), "to": now.isoformat()}
        r = await http.get("/api/v1/kpi/oee", params=period, headers=supervisor)
        body = r.json()
        t = body["total"]
        ratios = [t[k] for k in ("availability", "performance", "quality", "oee")]
        shown = "".join(f"{v:>8.0%}" if v is not None else f"{'-':>8}" for v in ratios)
        down = ", ".join(
            f"{d['state']}{'/' + str(d['stop_reason']) if d['stop_reason'] else ''}"
            f" {d['seconds']:.1f}s"
            for d in body["top_downtime"][:2]
        )
        print(f"{unit:<14}{shown}  {down or '-'}")
    print(
        "  (performance is against the plant's ideal cycle times per item; the demo runs every"
        " job in 1 s, far quicker, so it is well above 100 %)"
    )
    # The demo's orders are due between an hour ago and eight hours from now.
    window = {
        "from": (since - timedelta(hours=2)).isoformat(),
        "to": (since + timedelta(hours=9)).isoformat(),
    }
    d = (await http.get("/api/v1/kpi/delivery", params=window, headers=supervisor)).json()
    t = d["total"]
    late = ", ".join(o["order"] for o in t["late_orders"]) or "none"
    otd, otif = (f"{t[k]:.0%}" if t[k] is not None else "-" for k in ("otd", "otif"))
    print(f"Delivery: {t['orders_due']} orders due, OTD {otd}, OTIF {otif}; late: {late}")


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
