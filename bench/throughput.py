"""Throughput: orders per second end to end, against a bare Temporal skeleton of the same shape.

How it measures: a new PostgreSQL database (created on ``--pg-url``'s server, dropped
afterwards), the Temporal dev server (a child process), the OPC UA PLC simulator (one work
unit, a machine cycle of ``--cycle`` seconds, default 0.01, taking ``--max-jobs`` job orders),
the API and an ERP receiver (B2MML callbacks) in this process, and the worker as ``mes
worker`` in a child process of its own (``bench/soak.py``'s stack), so its CPU time is its
own. Single-step orders are posted over HTTP as an ERP would, ``--in-flight`` open at a time,
each awaited through its workflow's result; ``--warmup`` orders first, not timed.

Then the floor, in the same Temporal server and the same run: the skeleton of
``bench/soak.py`` (order workflow with a reporter, plan, one child job released by a signal;
job: prepare, room, dispatch, waits, record, clear; every activity a no-op but the waits,
which sleep the cycle), its worker also a child process, with as many activities before,
during and after the machine's work per job as the MES's histories show. Both shapes are
counted from the workflow histories of the timed orders (activities scheduled, signals,
workflow tasks completed, per order), printed side by side, and the run fails when
activities or signals differ.

It prints orders/s for both and their ratio (target: MES >= 0.8 x floor), the worker's CPU
seconds per order (user + system, from /proc) for both, this process's CPU per order (API,
simulator, ERP receiver; for the MES only), and the machine's load average.

    uv run python bench/throughput.py --orders 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import (
    PRODUCT,
    ROOT,
    SkeletonInput,
    SoakStack,
    call,
    child,
    database,
    order_body,
    run_window,
    skeleton_orders,
    soak_stack,
)
from workflows.production_order import ProductionOrderWorkflow
from workflows.types import job_workflow_id, order_workflow_id

#: What the history of one order (its workflow and its job's) is counted by.
SHAPE = {
    "activities": EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    "signals": EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    "workflow tasks": EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
    "children": EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of a process now, MiB (/proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


async def history_shape(
    client: Client, workflow_ids: list[str]
) -> tuple[Counter[str], Counter[str]]:
    """(counts by SHAPE, activities by type) over the histories of ``workflow_ids``."""
    counts: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    wanted = {v: k for k, v in SHAPE.items()}
    for wid in workflow_ids:
        async for e in client.get_workflow_handle(wid).fetch_history_events():
            if e.event_type in wanted:
                counts[wanted[e.event_type]] += 1
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                by_type[e.activity_task_scheduled_event_attributes.activity_type.name] += 1
    return counts, by_type


async def mes_orders(st: SoakStack, total: int, in_flight: int) -> tuple[float, list[str]]:
    """Post ``total`` orders, ``in_flight`` open at a time, each awaited to its workflow's
    end: (seconds, order numbers)."""
    numbers: list[str] = []
    headers = {"Authorization": f"Bearer {st.tokens['erp']}"}
    async with httpx.AsyncClient(base_url=st.api_url, headers=headers, timeout=120) as http:

        async def one(i: int) -> str:
            body = order_body(PRODUCT, i)
            numbers.append(body["order_number"])
            r = await call(http, "POST", "/api/v1/production-orders", json=body)
            r.raise_for_status()
            handle = st.temporal.get_workflow_handle_for(
                ProductionOrderWorkflow.run, order_workflow_id(body["order_number"])
            )
            while True:
                try:
                    return (await handle.result()).state
                except RPCError as e:  # not started yet (an intake that relays the start)
                    if e.status != RPCStatusCode.NOT_FOUND:
                        raise
                    await asyncio.sleep(0.1)
                except WorkflowFailureError as e:
                    return f"failed: {e.cause}"

        took, outcomes = await run_window(total, in_flight, one, "MES")
    if outcomes.count("Completed") != total:
        raise SystemExit(f"not every order completed: {Counter(outcomes)}")
    return took, numbers


async def main(args: argparse.Namespace) -> int:
    print(f"load average before: {load()} (1, 5, 15 min; {os.cpu_count()} CPUs)", flush=True)
    with database(args.pg_url, sqlite=False) as url:
        async with (
            soak_stack(
                url, args.max_jobs, args.cycle, erp_format="b2mml", worker_process=True
            ) as st,
            contextlib.AsyncExitStack() as stack,
        ):
            assert st.worker is not None
            assert st.erp is not None
            await mes_orders(st, args.warmup, args.in_flight)
            cpu0, own0 = cpu_seconds(st.worker.pid), time.process_time()
            mes_s, numbers = await mes_orders(st, args.orders, args.in_flight)
            mes_cpu = cpu_seconds(st.worker.pid) - cpu0
            own_cpu = time.process_time() - own0
            mes_rss = rss_mib(st.worker.pid)
            sample = numbers[: args.histories]
            mes_counts, mes_types = await history_shape(
                st.temporal,
                [order_workflow_id(n) for n in sample]
                + [job_workflow_id(f"{n}-01") for n in sample],
            )

            def per_job(*names: str) -> int:
                return round(sum(mes_types[n] for n in names) / len(sample))

            shape = SkeletonInput(
                "",
                waits=per_job("await_job"),
                sends=per_job("prepare_job", "plc_room", "dispatch_job"),
                ends=per_job("record_job_response", "plc_command"),
            )
            received = len(st.erp.messages)

            queue = f"skeleton-{uuid.uuid4().hex[:6]}"
            address = st.temporal.service_client.config.target_host
            soak = str(ROOT / "bench" / "soak.py")
            sk_args = ["skeleton-worker", "--address", address, "--queue", queue]
            sk = await child(stack, [sys.executable, soak, *sk_args, "--cycle", str(args.cycle)])
            await skeleton_orders(st.temporal, queue, args.warmup, args.in_flight, shape)
            sk_cpu0 = cpu_seconds(sk.pid)
            sk_s, sk_numbers = await skeleton_orders(
                st.temporal, queue, args.orders, args.in_flight, shape
            )
            sk_cpu = cpu_seconds(sk.pid) - sk_cpu0
            sk_sample = sk_numbers[: args.histories]
            sk_counts, _ = await history_shape(
                st.temporal,
                [f"sk-order-{n}" for n in sk_sample] + [f"sk-job-{n}-01" for n in sk_sample],
            )
    n = args.orders
    mes_rate, sk_rate = n / mes_s, n / sk_s
    print(f"load average after: {load()}")
    print(
        f"orders: {n} single-step orders (after {args.warmup} not timed), {args.in_flight} "
        f"open at a time; one work unit, PLC cycle {args.cycle} s, limit {args.max_jobs} jobs; "
        "PostgreSQL, a new database"
    )
    print(f"ERP callbacks received (B2MML): {received}")
    print(f"per order, from {len(sample)} histories each:   MES  skeleton")
    for name in SHAPE:
        mes_v, sk_v = mes_counts[name] / len(sample), sk_counts[name] / len(sk_sample)
        print(f"  {name:<40} {mes_v:5.1f} {sk_v:9.1f}")
    per = ", ".join(f"{k} {v / len(sample):.1f}" for k, v in sorted(mes_types.items()))
    print(f"  MES activities by type: {per}")
    print(
        f"MES:      {mes_rate:6.2f} orders/s ({mes_s:.1f} s); worker CPU "
        f"{mes_cpu / n * 1000:.1f} ms/order; worker RSS {mes_rss:.0f} MiB; "
        f"API + simulator + ERP receiver CPU {own_cpu / n * 1000:.1f} ms/order"
    )
    print(
        f"skeleton: {sk_rate:6.2f} orders/s ({sk_s:.1f} s); worker CPU "
        f"{sk_cpu / n * 1000:.1f} ms/order"
    )
    print(
        f"MES / floor: {mes_rate / sk_rate:.2f}x orders/s (target >= 0.8); "
        f"worker CPU {mes_cpu / max(sk_cpu, 1e-9):.1f}x the skeleton's"
    )
    print(f"rerun: uv run python bench/throughput.py --orders {n} --in-flight {args.in_flight}")
    same = all(
        abs(mes_counts[k] / len(sample) - sk_counts[k] / len(sk_sample)) < 0.5
        for k in ("activities", "signals")
    )
    if not same:
        print("SHAPE DIFFERS: the skeleton does not do what the MES does per order")
        return 1
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    logging.getLogger("temporalio").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--cycle", type=float, default=0.01)
    parser.add_argument("--max-jobs", type=int, default=20)
    parser.add_argument("--histories", type=int, default=20)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
