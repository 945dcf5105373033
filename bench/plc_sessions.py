"""PLC sessions: how many OPC UA sessions N jobs in flight hold on one PLC endpoint.

Each job does what the order workflow's PLC activities do, each step through the machine
port as the activity would get it: room (capacity), dispatch (StoreAndStart), await until
final (wait_for_change, one activity per state change), record (job response), clear.
``--jobs`` jobs run at once on one simulated PLC (in this process, ``--units`` work units
behind one endpoint, each job ``--cycle`` seconds, MaxDownloadableJobOrders = ``--jobs``), in
three ways:

- ``per-activity``: a new session for every step (``adapters.machines.connect``), as the
  worker did before the session pool: each waiting job holds a session and a subscription;
- ``pooled``: the worker's ``SessionPool``: one session per endpoint, kept open, one
  subscription per machine shared by the waiting jobs;
- ``floor``: one session opened by hand and used by every step (the machines attached to
  it as the pool does, so waits share a subscription), with no pool around it.

It prints, per way: the most sessions and subscriptions the PLC's server held at once
(sampled every 10 ms on the server), sessions opened, wall time and this process's CPU
time (the simulator's included), with the ratio of time and CPU to the floor, and how many
steps failed unreachable (each is retried after a second, as Temporal would).

    uv run python bench/plc_sessions.py --jobs 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TypeVar

from asyncua.client.client import Client

from adapters.machines import connect
from adapters.opcua.client import JobControlClient
from adapters.opcua.pool import SessionPool
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes.machines import (
    Endpoint,
    EquipmentAdapter,
    JobOrderData,
    JobState,
    MachineUnreachableError,
    MaterialRequirement,
)

T = TypeVar("T")

Opener = Callable[[Endpoint], AbstractAsyncContextManager[EquipmentAdapter]]


def order(job_order_id: str) -> JobOrderData:
    return JobOrderData(
        job_order_id=job_order_id,
        work_master_id="WM-FILL",
        material_requirements=[MaterialRequirement("BOTTLE", "Produced", 6, "pcs")],
    )


async def _wait(
    plc: EquipmentAdapter, *, job_id: str, known: JobState, publish_ms: int
) -> JobState:
    return await plc.wait_for_change(job_id, known, tick_s=5.0, publish_ms=publish_ms)


async def job(
    open_plc: Opener, ep: Endpoint, job_id: str, publish_ms: int, failed: list[str]
) -> None:
    async def step(call: Callable[[EquipmentAdapter], Awaitable[T]]) -> T:
        # An activity that finds the PLC unreachable is retried (Temporal's retry policy).
        while True:
            try:
                async with open_plc(ep) as plc:
                    return await call(plc)
            except MachineUnreachableError as e:
                failed.append(str(e))
                await asyncio.sleep(1.0)

    await step(lambda plc: plc.capacity())
    await step(lambda plc: plc.store_and_start(order(job_id)))
    state = JobState.ALLOWED_TO_START
    while not state.is_final:
        state = await step(partial(_wait, job_id=job_id, known=state, publish_ms=publish_ms))
    await step(lambda plc: plc.job_response(job_id))
    await step(lambda plc: plc.clear(job_id))


class Figures:
    def __init__(self) -> None:
        self.sessions = 0
        self.subscriptions = 0
        self.opened = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.failed: list[str] = []


async def run(way: str, args: argparse.Namespace) -> Figures:
    units = [SimUnit(f"Filler{i}", cycle_time_s=args.cycle) for i in range(args.units)]
    figures = Figures()
    async with PlcSimulator(units, max_job_orders=args.jobs) as sim:
        server = sim._server
        assert server is not None
        opener: Opener
        pool: SessionPool | None = None
        floor: dict[str, JobControlClient] = {}
        if way == "per-activity":
            opener = connect
        elif way == "pooled":
            pool = SessionPool()
            opener = pool.session
        else:
            held_session: list[Client] = []
            reopening = asyncio.Lock()

            async def reopen() -> None:
                held_session[:] = [await JobControlClient(sim.url, "").open_session(10)]
                for name in sim.unit_names:
                    floor[name] = JobControlClient(sim.url, name)
                    await floor[name].attach(held_session[0])

            await reopen()

            @contextlib.asynccontextmanager
            async def held(ep: Endpoint) -> AsyncIterator[EquipmentAdapter]:
                # Reopened only when lost (a starved client can miss its own keep-alives).
                async with reopening:
                    if held_session[0].uaclient.state.value != "connected":
                        await reopen()
                yield floor[ep.machine]

            opener = held
        before = server.iserver.isession.__class__._counter

        async def sample() -> None:
            while True:
                figures.sessions = max(figures.sessions, sim.sessions)
                figures.subscriptions = max(
                    figures.subscriptions, len(server.iserver.subscription_service.subscriptions)
                )
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(
            *(
                job(
                    opener,
                    Endpoint("opcua", sim.url, sim.unit_names[i % args.units]),
                    f"JO-{way}-{i}",
                    args.publish_ms,
                    figures.failed,
                )
                for i in range(args.jobs)
            )
        )
        figures.wall_s, figures.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        sampler.cancel()
        figures.opened = server.iserver.isession.__class__._counter - before
        if pool is not None:
            await pool.close()
        if way == "floor":
            await held_session[0].disconnect()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs in flight at once")
    parser.add_argument("--units", type=int, default=2, help="work units behind the endpoint")
    parser.add_argument("--cycle", type=float, default=0.02, help="seconds per job")
    parser.add_argument("--publish-ms", type=int, default=100, help="PLC poll interval (ms)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{args.jobs} jobs at once on one endpoint ({args.units} units, cycle {args.cycle} s)")
    print(
        f"{'way':<13} {'sessions':>8} {'subscr.':>8} {'opened':>7} "
        f"{'wall s':>7} {'x floor':>7} {'CPU s':>7} {'x floor':>7} {'failed':>6}"
    )
    floor = await run("floor", args)
    for way in ("floor", "pooled", "per-activity"):
        f = floor if way == "floor" else await run(way, args)
        print(
            f"{way:<13} {f.sessions:>8} {f.subscriptions:>8} {f.opened:>7} "
            f"{f.wall_s:>7.2f} {f.wall_s / floor.wall_s:>7.2f} "
            f"{f.cpu_s:>7.2f} {f.cpu_s / floor.cpu_s:>7.2f} {len(f.failed):>6}",
            flush=True,
        )
    print("rerun: uv run python bench/plc_sessions.py --jobs", args.jobs)


if __name__ == "__main__":
    asyncio.run(main())
