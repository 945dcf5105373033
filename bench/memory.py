"""Memory: the worker's resident set with a thousand orders in flight.

How it measures: the stack of ``bench/soak.py`` on a new PostgreSQL database (created on
``--pg-url``'s server, dropped afterwards) with the worker as ``mes worker`` in a child
process of its own, one work unit whose PLC simulator runs each job for ``--cycle`` seconds
(default an hour, so nothing ends) and takes ``--max-jobs`` job orders, and an ERP receiver
(B2MML callbacks). ``--orders`` single-step orders are posted over HTTP at once (16
connections); all stay in flight: ``--max-jobs`` on the PLC, the rest waiting for room on it.
While they are posted and for ``--hold`` seconds after, it samples every second the worker's
resident set size (VmRSS, /proc) and the client sessions the PLC's OPC UA server holds, and
prints them every ``--every`` seconds, then the largest of each (target: RSS < 300 MB; a few
sessions at most), with the machine's load average.

    uv run python bench/memory.py --orders 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import PRODUCT, call, database, order_body, sample_plc, soak_stack
from bench.throughput import load, rss_mib


async def main(args: argparse.Namespace) -> int:
    print(f"load average before: {load()}", flush=True)
    samples: list[tuple[float, float, int, int]] = []  # (t, RSS MiB, sessions, posted)
    with database(args.pg_url, sqlite=False) as url:
        async with soak_stack(
            url, args.max_jobs, args.cycle, erp_format="b2mml", worker_process=True
        ) as st:
            assert st.worker is not None
            pid = st.worker.pid
            posted: list[int] = []
            start = time.perf_counter()

            async def sample() -> None:
                while True:
                    t = time.perf_counter() - start
                    samples.append((t, rss_mib(pid), st.sim.sessions, len(posted)))
                    if len(samples) % args.every == 1:
                        _, rss, sessions, n = samples[-1]
                        jobs = on_plc[-1] if on_plc else 0
                        print(
                            f"  {t:5.0f} s  worker RSS {rss:6.1f} MiB  OPC UA sessions "
                            f"{sessions} (1 the bench's)  orders posted {n}  jobs on the PLC "
                            f"{jobs}",
                            flush=True,
                        )
                    await asyncio.sleep(1)

            sampler = asyncio.create_task(sample())
            # Its own OPC UA client reads the PLC's job list: one session more on the server.
            on_plc: list[int] = []
            plc_reader = asyncio.create_task(sample_plc(st.plc_url, on_plc))
            headers = {"Authorization": f"Bearer {st.tokens['erp']}"}
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(
                base_url=st.api_url, headers=headers, timeout=300, limits=limits
            ) as http:

                async def post(i: int) -> None:
                    r = await call(
                        http, "POST", "/api/v1/production-orders", json=order_body(PRODUCT, i)
                    )
                    r.raise_for_status()
                    posted.append(r.json()["id"])

                await asyncio.gather(*(post(i) for i in range(args.orders)))
                posted_s = time.perf_counter() - start
                # In flight means on the PLC or waiting for room on it: wait until it is full
                # (the worker starts slowly on a loaded machine), then hold.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.fill_timeout):
                        while not on_plc or on_plc[-1] < args.max_jobs:  # noqa: ASYNC110
                            await asyncio.sleep(1)
                full_s = time.perf_counter() - start
                await asyncio.sleep(args.hold)
                ended = (
                    await call(
                        http, "GET", "/api/v1/production-orders", params={"state": "Completed"}
                    )
                ).json()
            sampler.cancel()
            plc_reader.cancel()
    most_rss = max(s[1] for s in samples)
    most_sessions = max(s[2] for s in samples)
    print(f"load average after: {load()}")
    print(
        f"orders: {args.orders} single-step orders posted at once in {posted_s:.1f} s; the PLC "
        f"full after {full_s:.0f} s, then held {args.hold} s; one work unit, PLC limit "
        f"{args.max_jobs} jobs, cycle {args.cycle} s"
    )
    completed = ended if isinstance(ended, list) else ended.get("items", [])
    print(f"orders completed meanwhile (should be none): {len(completed)}")
    print(
        f"worker RSS: at most {most_rss:.0f} MiB in {len(samples)} samples "
        f"(target < 300 MB = {300e6 / 2**20:.0f} MiB); at the end {samples[-1][1]:.0f} MiB"
    )
    print(
        f"OPC UA sessions on the simulator's endpoint: at most {most_sessions} (one of them "
        f"the bench's own job list reader); jobs on the PLC at most {max(on_plc, default=0)}"
    )
    print(f"rerun: uv run python bench/memory.py --orders {args.orders} --hold {args.hold}")
    return 0 if most_rss < 300e6 / 2**20 else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--max-jobs", type=int, default=10)
    parser.add_argument("--cycle", type=float, default=3600.0)
    parser.add_argument("--hold", type=int, default=60)
    parser.add_argument("--fill-timeout", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
