"""Order intake: POST latency and rate of the real API beside a floor, in the same run.

How it measures: creates a PostgreSQL database of its own (dropped at the end), migrates it,
loads the sample plant and issues an ERP token; then serves, each in a process of its own
with uvicorn on a free port, (1) the MES API (``mes.api.app.create_app``: authentication,
validation, idempotency, the audit trail, the ERP outbox, the order and its segment
requirements in one transaction) and (2) the floor: a minimal Litestar handler that inserts
the same order row and segment requirement rows in one transaction and answers 202. No
worker and no Temporal run: accepting an order does not wait for them (the relay starts its
workflow later). At 1, 8 and 50 concurrent clients, each posting new orders one after
another, it times every POST for ``--seconds`` per level (after a short warm-up), the
product and the floor alternately, and prints p50/p95 latency, orders/s and the ratio of
the rates; then offers 50 orders/s to each (an open loop: sent on schedule, not after the
previous answer) and prints p50/p95 from each order's planned send time; and the load
average, since the machine may be shared.

    uv run python bench/intake.py                 # PostgreSQL at 127.0.0.1:5432, user postgres
    uv run python bench/intake.py --seconds 10 --pg-url postgresql://postgres@host:5432/postgres

Targets: rate at 50 clients at least 0.8x the floor; p95 under 20 ms at 1 client and at
50 orders/s offered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mes.launch import free_port

LEVELS = (1, 8, 50)
RATE = 50.0  # orders/s offered in the open-loop run
ORDERS = "/api/v1/production-orders"
PRODUCTS = ("BREAD-WHITE", "ROLL-6PK")
HERE = Path(__file__).resolve()


# --- the two servers (each run in a process of its own) ----------------------------------------


def serve_product(url: str, port: int) -> None:
    """The MES API as ``mes serve`` runs it."""
    import uvicorn

    from mes.api.app import create_app
    from mes.settings import Settings

    app = create_app(Settings(database_url=url))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_floor(url: str, port: int) -> None:
    """A minimal Litestar handler: the order row and its segment requirement rows inserted
    in one transaction, nothing else (no authentication, no idempotency check, no audit)."""
    import uvicorn
    from litestar import Litestar, post
    from sqlalchemy import insert, select

    from mes.db import make_engine
    from mes.models import (
        MaterialDefinition,
        OperationsDefinition,
        OperationsRequest,
        OperationsSegment,
        SegmentRequirement,
    )

    engine = make_engine(url)
    routings: dict[str, tuple[int, int, str, list[tuple[int, int]]]] = {}
    with engine.connect() as conn:
        for product_id, external_id, unit, routing_id in conn.execute(
            select(
                MaterialDefinition.id,
                MaterialDefinition.external_id,
                MaterialDefinition.unit,
                OperationsDefinition.id,
            ).join(
                OperationsDefinition,
                OperationsDefinition.material_definition_id == MaterialDefinition.id,
            )
        ):
            steps = conn.execute(
                select(OperationsSegment.id, OperationsSegment.sequence).where(
                    OperationsSegment.operations_definition_id == routing_id
                )
            ).all()
            routings[external_id] = (product_id, routing_id, unit, [(a, b) for a, b in steps])

    @post("/orders", status_code=202, sync_to_thread=True)
    def accept(data: dict[str, Any]) -> dict[str, Any]:
        product_id, routing_id, unit, steps = routings[data["product"]]
        quantity = Decimal(str(data["quantity"]))
        number = data["order_number"]
        with engine.begin() as conn:
            order_id = conn.execute(
                insert(OperationsRequest)
                .values(
                    external_id=number,
                    operations_definition_id=routing_id,
                    material_definition_id=product_id,
                    quantity=quantity,
                    unit=unit,
                    priority=data["priority"],
                    due=datetime.fromisoformat(data["due"]),
                    state="Released",
                    late=False,
                    request_hash="0" * 64,
                    workflow_id=f"order-{number}",
                    created_at=datetime.now(UTC),
                )
                .returning(OperationsRequest.id)
            ).scalar_one()
            conn.execute(
                insert(SegmentRequirement),
                [
                    {
                        "operations_request_id": order_id,
                        "operations_segment_id": segment_id,
                        "sequence": sequence,
                        "quantity": quantity,
                        "unit": unit,
                        "state": "Waiting",
                    }
                    for segment_id, sequence in steps
                ],
            )
        return {"id": order_id, "order_number": number}

    app = Litestar(route_handlers=[accept])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- set-up -----------------------------------------------------------------------------------


@contextlib.contextmanager
def own_database(admin_url: str) -> Iterator[str]:
    """A new database on the server of ``admin_url``; dropped on exit."""
    name = f"mes_bench_intake_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepare(url: str) -> str:
    """Migrate, load the sample plant, issue an ERP token; returns the token."""
    from mes.auth import create_token
    from mes.launch import load_plant, open_database
    from mes.migrate import upgrade

    upgrade(url)
    with open_database(url) as sessions:
        load_plant(sessions)
        with sessions() as s:
            return create_token(s, "erp-bench", "erp")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    base: str
    pid: int


async def measured(server: Server, run: Any) -> Result:
    """``run`` (a coroutine giving a ``Result``) with the server's CPU time over it: on a
    shared machine the steadier figure of the two (wall time waits for other processes)."""
    before = cpu_seconds(server.pid)
    result: Result = await run
    result.cpu_s = cpu_seconds(server.pid) - before
    return result


@contextlib.asynccontextmanager
async def server(role: str, url: str) -> AsyncIterator[Server]:
    """``serve_<role>`` in a child process; yields it once it answers."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE), "--serve", role, "--url", url, "--port", str(port)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                if proc.returncode is not None:
                    raise RuntimeError(f"the {role} server exited with {proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    await http.get(f"{base}/health", timeout=1)
                    break
                await asyncio.sleep(0.1)
        yield Server(base, proc.pid)
    finally:
        proc.terminate()
        await proc.wait()


# --- load -------------------------------------------------------------------------------------


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    errors: int
    posts: int = 0  # every POST of the run, the warm-up's too
    cpu_s: float = 0.0  # the server process's CPU time (user + system) over the run

    @property
    def cpu_ms_per_order(self) -> float:
        return 1000 * self.cpu_s / max(self.posts, 1)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def order_body(n: int) -> dict[str, Any]:
    return {
        "order_number": f"IN-{uuid.uuid4().hex[:12]}",
        "product": PRODUCTS[n % 2],
        "quantity": 10,
        "unit": "ea",
        "due": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "priority": n % 7,
    }


async def load(base: str, path: str, token: str, clients: int, seconds: float) -> Result:
    """``clients`` loops posting new orders for ``seconds``; every answer must be 202."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    errors = posts = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as http:

        async def one_client(k: int, until: float, record: bool) -> None:
            nonlocal errors, posts
            n = k
            while time.perf_counter() < until:
                t = time.perf_counter()
                accepted = await post_order(http, path, n)
                posts += 1
                if not accepted:
                    errors += 1
                elif record:
                    latencies.append(time.perf_counter() - t)
                n += clients

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(one_client(k, warm, False) for k in range(clients)))
        start = time.perf_counter()
        await asyncio.gather(*(one_client(k, start + seconds, True) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return Result(latencies, elapsed, errors, posts)


async def post_order(http: httpx.AsyncClient, path: str, n: int) -> bool:
    """POST order ``n``; True when it is accepted (202), else the answer is printed."""
    r = await http.post(path, json=order_body(n))
    if r.status_code != 202:
        print(f"  {path}: {r.status_code} {r.text[:200]}", file=sys.stderr)
    return r.status_code == 202


async def offered(base: str, path: str, token: str, per_s: float, seconds: float) -> Result:
    """An open loop: a new order every ``1 / per_s`` seconds whatever the answers (as many
    ERPs would send them), each timed from its planned send time, so a server that falls
    behind shows it in the latencies rather than slowing the senders."""
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    errors = posts = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:

        async def one(n: int, planned: float, record: bool) -> None:
            nonlocal errors, posts
            accepted = await post_order(http, path, n)
            posts += 1
            if not accepted:
                errors += 1
            elif record:
                latencies.append(time.perf_counter() - planned)

        async def run(duration: float, record: bool) -> float:
            tasks = []
            start = time.perf_counter()
            n = 0
            while (planned := start + n / per_s) < start + duration:
                await asyncio.sleep(max(0.0, planned - time.perf_counter()))
                tasks.append(asyncio.create_task(one(n, planned, record)))
                n += 1
            await asyncio.gather(*tasks)
            return duration

        await run(1.0, False)
        elapsed = await run(seconds, True)
    return Result(latencies, elapsed, errors, posts)


def load_average() -> str:
    """The machine's load averages (1, 5, 15 min), as ``uptime`` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main(pg_url: str, seconds: float) -> int:
    with own_database(pg_url) as url:
        token = prepare(url)
        rows: list[tuple[int, Result, Result]] = []
        async with server("product", url) as product, server("floor", url) as floor:
            for clients in LEVELS:
                mine = await measured(product, load(product.base, ORDERS, token, clients, seconds))
                base = await measured(floor, load(floor.base, "/orders", token, clients, seconds))
                rows.append((clients, mine, base))
                print(f"  {clients} clients done", file=sys.stderr, flush=True)
            open_mine = await measured(product, offered(product.base, ORDERS, token, RATE, seconds))
            open_base = await measured(floor, offered(floor.base, "/orders", token, RATE, seconds))
    print()
    print(f"load average at the end (1, 5, 15 min): {load_average()}; {os.cpu_count()} cores")
    print(
        "| clients | API p50 ms | API p95 ms | API orders/s | API CPU ms/order "
        "| floor p50 ms | floor p95 ms | floor orders/s | floor CPU ms/order | rate ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients, mine, base in rows:
        print(
            f"| {clients} | {mine.p(0.5):.1f} | {mine.p(0.95):.1f} | {mine.rate:.0f} "
            f"| {mine.cpu_ms_per_order:.1f} "
            f"| {base.p(0.5):.1f} | {base.p(0.95):.1f} | {base.rate:.0f} "
            f"| {base.cpu_ms_per_order:.1f} | {mine.rate / base.rate:.2f}x |"
        )
    print()
    print(
        f"offered load {RATE:g} orders/s (open loop): API p50 {open_mine.p(0.5):.1f} ms, "
        f"p95 {open_mine.p(0.95):.1f} ms, CPU {open_mine.cpu_ms_per_order:.1f} ms/order; "
        f"floor p50 {open_base.p(0.5):.1f} ms, p95 {open_base.p(0.95):.1f} ms, "
        f"CPU {open_base.cpu_ms_per_order:.1f} ms/order"
    )
    one = rows[0][1]
    fifty = next(r for r in rows if r[0] == 50)
    ratio = fifty[1].rate / fifty[2].rate
    print()
    print(
        f"target: rate at 50 clients >= 0.8x the floor: {ratio:.2f}x "
        f"{'met' if ratio >= 0.8 else 'NOT met'}"
    )
    print(
        f"target: p95 at 1 client < 20 ms: {one.p(0.95):.1f} ms "
        f"{'met' if one.p(0.95) < 20 else 'NOT met'}"
    )
    print(
        f"target: p95 at {RATE:g} orders/s offered < 20 ms: {open_mine.p(0.95):.1f} ms "
        f"{'met' if open_mine.p(0.95) < 20 else 'NOT met'}"
    )
    print(f"rerun: uv run python bench/intake.py --seconds {seconds:g}")
    errors = sum(r[1].errors + r[2].errors for r in rows)
    errors += open_mine.errors + open_base.errors
    if errors:
        print(f"{errors} POSTs were not answered 202", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per level and server")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("MES_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="an admin connection to the PostgreSQL server (it creates and drops a database)",
    )
    parser.add_argument("--serve", choices=("product", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "product":
        serve_product(args.url, args.port)
    elif args.serve == "floor":
        serve_floor(args.url, args.port)
    else:
        sys.exit(asyncio.run(main(args.pg_url, args.seconds)))
