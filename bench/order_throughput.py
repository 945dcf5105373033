"""Order throughput of the whole product on real parts.

How it measures: starts the embedded stack (Temporal dev server, OPC UA simulator with a
0.2 s machine cycle, worker and API in this process, database from --database-url or a new
SQLite file), then, as an ERP would, posts N orders over HTTP with 8 concurrent connections
and times (1) how fast the API accepts them (orders/s, p50/p95 latency of the POST) and
(2) how long until every order is Completed, polling the API. Peak memory is this process's
maximum resident set size (getrusage), which holds the API, the worker and the simulator;
the Temporal server is a separate process and not counted.

    uv run python bench/order_throughput.py --orders 60
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mes.launch import embedded_stack
from mes.settings import Settings


async def main(orders: int, database_url: str | None) -> None:
    url = database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    settings = Settings(database_url=url, plc_poll_seconds=0.1, task_queue="bench")
    async with embedded_stack(settings, cycle_time_s=0.2, temporal_ui=False) as stack:
        headers = {"Authorization": f"Bearer {stack.tokens['erp']}"}
        async with httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=60) as http:
            products = ["BREAD-WHITE", "ROLL-6PK"]
            due = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            bodies = [
                {
                    "order_number": f"B-{uuid.uuid4().hex[:10]}",
                    "product": products[i % 2],
                    "quantity": 10,
                    "unit": "ea",
                    "due": due,
                    "priority": i % 7,
                }
                for i in range(orders)
            ]
            latencies: list[float] = []
            ids: list[int] = []
            gate = asyncio.Semaphore(8)

            async def post(body: dict[str, object]) -> None:
                async with gate:
                    t = time.perf_counter()
                    r = await http.post("/api/v1/production-orders", json=body)
                    latencies.append(time.perf_counter() - t)
                    r.raise_for_status()
                    ids.append(r.json()["id"])

            start = time.perf_counter()
            await asyncio.gather(*(post(b) for b in bodies))
            accepted_s = time.perf_counter() - start
            pending = set(ids)
            while pending:
                for oid in list(pending):
                    o = (await http.get(f"/api/v1/production-orders/{oid}")).json()
                    if o["state"] in ("Completed", "Aborted", "Cancelled"):
                        if o["state"] != "Completed":
                            raise SystemExit(f"order {oid} ended {o['state']}")
                        pending.discard(oid)
                await asyncio.sleep(0.5)
            done_s = time.perf_counter() - start
    lat = sorted(latencies)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"database: {url.split('@')[-1]}")
    print(f"orders: {orders} (BREAD-WHITE 2 steps / ROLL-6PK 3 steps, PLC cycle 0.2 s)")
    print(
        f"accepted: {orders / accepted_s:.1f} orders/s; POST latency p50 "
        f"{statistics.median(lat) * 1000:.0f} ms, p95 {lat[int(len(lat) * 0.95) - 1] * 1000:.0f} ms"
    )
    print(f"all completed after {done_s:.1f} s ({orders / done_s * 60:.0f} orders/min end to end)")
    print(f"peak RSS of the MES process: {peak_mb:.0f} MiB")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=40)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    asyncio.run(main(args.orders, args.database_url))
