"""Soak: many jobs through one work unit, and many orders in a row through the dev stack.

Two modes.

``soak`` (default): at least ``--jobs`` jobs (one single-step order each) through ONE work
unit whose simulated PLC takes ``--max-jobs`` job orders (MaxDownloadableJobOrders, default
10) and runs each for ``--cycle`` seconds (default 0.01). The stack is composed like
``embedded_stack`` (Temporal dev server, worker, API and PLC simulator in this process; the
Temporal server is a child process) on PostgreSQL (a database created on ``--pg-url``'s
server and dropped afterwards; default the local server) or, with ``--sqlite``, a new SQLite
file. Orders are posted over HTTP as an ERP would, keeping ``--in-flight`` orders open (a
new one is posted as one ends), so the PLC is kept full for the whole run. Meanwhile an
independent OPC UA client samples the PLC's JobOrderList every 0.1 s. It prints:

- jobs per second: jobs completed / wall time from the first post to the last completion;
- the most jobs the PLC's list held in any sample (must not exceed its limit) and how many
  samples were taken; every order must end Completed;
- peak memory: this process's maximum resident set size (``resource.getrusage``), which
  holds the API, the worker (workflows and activities) and the PLC simulator;
- the floor: unless ``--no-skeleton``, the same number of orders of the same shape run on a
  bare Temporal skeleton in the same Temporal server (order workflow -> plan activity ->
  child job workflow -> prepare, room, dispatch, wait (sleeps the cycle), record, clear
  activities -> complete and report activities; every activity a no-op, no HTTP, database
  or OPC UA), with the same number open at a time; printed with the MES's ratio to it.

``dev``: ``--orders`` orders posted one after another (each POST answered before the next)
through the HTTP API of the embedded stack as ``mes dev`` runs it (the sample plant, its
cycle times unless ``--cycle``), then waits until every order has ended; checks that all
are Completed and none is left Released (``GET /api/v1/production-orders?state=Released``).

    uv run python bench/soak.py --jobs 1000
    uv run python bench/soak.py --jobs 1000 --sqlite
    uv run python bench/soak.py dev --orders 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from asyncua.client.client import Client as OpcUaClient
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.erp.receiver import ErpReceiver
from adapters.opcua.model import JOBCONTROL_NS_URI
from adapters.opcua.simulator import SIM_NAMESPACE_URI, PlcSimulator, SimUnit
from mes.callbacks import LOOPBACK, CallbackPolicy
from mes.launch import (
    TemporalDevServer,
    api_server,
    embedded_stack,
    free_port,
    issue_role_tokens,
    load_plant,
    open_database,
    point_erp_client,
    role_token_name,
    running_worker,
    wait_for_stop_signal,
)
from mes.models import Role
from mes.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FINAL = ("Completed", "Aborted", "Cancelled")
UNIT = "WU-SOAK"
PRODUCT = "SOAK-ITEM"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def database(pg_url: str, sqlite: bool) -> Iterator[str]:
    """A new empty database: SQLite in a temporary folder, or one created on the
    PostgreSQL server of ``pg_url`` and dropped afterwards."""
    if sqlite:
        tmp = Path(tempfile.mkdtemp(prefix="mes-soak-"))
        try:
            yield f"sqlite:///{tmp / 'soak.db'}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    name = f"mes_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield pg_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def soak_plant(path: Path) -> None:
    """One product of one step on one work unit."""
    plant = {
        "equipment": [
            {
                "id": "SOAK-SITE",
                "level": "Site",
                "children": [
                    {
                        "id": UNIT,
                        "level": "WorkUnit",
                        "endpoint": {"protocol": "opcua", "url": "opc.tcp://x:1/", "machine": UNIT},
                    }
                ],
            }
        ],
        "material_classes": [{"id": "Goods"}],
        "materials": [{"id": PRODUCT, "material_class": "Goods", "unit": "ea"}],
        "process_segments": [{"id": "MAKE"}],
        "work_masters": [
            {
                "id": "WM-SOAK",
                "process_segment": "MAKE",
                "work_units": [{"equipment": UNIT, "ideal_cycle_time_s": 0.01}],
            }
        ],
        "routings": [
            {
                "id": "OD-SOAK",
                "product": PRODUCT,
                "steps": [
                    {
                        "id": "MAKE",
                        "work_master": "WM-SOAK",
                        "materials": [{"material": PRODUCT, "use": "Produced", "quantity": 1}],
                    }
                ],
            }
        ],
    }
    path.write_text(json.dumps(plant))


def order_body(product: str, i: int) -> dict[str, Any]:
    return {
        "order_number": f"SOAK-{uuid.uuid4().hex[:10]}",
        "product": product,
        "quantity": 1,
        "unit": "ea",
        "due": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "priority": i % 7,
    }


async def call(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    """One HTTP call, tried again on a transport error (a POST of the same order is
    idempotent: the same order number answers 200 with the stored order)."""
    for attempt in range(5):
        try:
            return await http.request(method, url, **kw)
        except httpx.TransportError:
            if attempt == 4:
                raise
            await asyncio.sleep(1 + attempt)
    raise AssertionError("unreachable")


async def wait_final(http: httpx.AsyncClient, order_id: int) -> str:
    while True:
        r = await call(http, "GET", f"/api/v1/production-orders/{order_id}")
        r.raise_for_status()
        state: str = r.json()["state"]
        if state in FINAL:
            return state
        await asyncio.sleep(0.25)


async def sample_plc(url: str, sizes: list[int]) -> None:
    """Sample the unit's JobOrderList length through an independent OPC UA client."""
    async with OpcUaClient(url) as opcua:
        await opcua.load_data_type_definitions()
        jc = await opcua.get_namespace_index(JOBCONTROL_NS_URI)
        own = await opcua.get_namespace_index(SIM_NAMESPACE_URI)
        node = await opcua.nodes.objects.get_child(
            [
                f"{own}:{UNIT}",
                f"{own}:JobManagement",
                f"{own}:JobOrderControl",
                f"{jc}:JobOrderList",
            ]
        )
        while True:
            sizes.append(len(await node.read_value() or []))
            await asyncio.sleep(0.1)


@dataclasses.dataclass
class SoakStack:
    api_url: str
    #: One API token per role.
    tokens: dict[str, str]
    plc_url: str
    temporal: Client
    sim: PlcSimulator
    #: The ``mes worker`` child process (``worker_process``), else None: in this process.
    worker: asyncio.subprocess.Process | None
    erp: ErpReceiver | None


@contextlib.asynccontextmanager
async def soak_stack(
    database_url: str,
    max_jobs: int,
    cycle: float,
    *,
    erp_format: str | None = None,
    worker_process: bool = False,
) -> AsyncIterator[SoakStack]:
    """A stack on one work unit: Temporal dev server (a child process), PLC simulator and API
    in this process; the worker here too, or with ``worker_process`` as ``mes worker`` in a
    child process (so its CPU and memory are its own); with ``erp_format`` an ERP receiver
    that the erp token's client reports to in that format."""
    settings = Settings(
        database_url=database_url,
        task_queue="soak",
        plc_poll_seconds=0.1,
        callback_allow=LOOPBACK if erp_format else (),
    )
    async with contextlib.AsyncExitStack() as stack:
        sessions = stack.enter_context(open_database(database_url, migrate=True))
        plc_port = free_port()
        plc_url = f"opc.tcp://127.0.0.1:{plc_port}/"
        plant = Path(tempfile.mkdtemp(prefix="mes-soak-plant-")) / "plant.json"
        stack.callback(shutil.rmtree, plant.parent, True)
        soak_plant(plant)
        await asyncio.to_thread(load_plant, sessions, plant, plc_url)
        suffix = secrets.token_hex(3)
        tokens = issue_role_tokens(sessions, "soak", suffix)
        erp = None
        if erp_format is not None:
            erp = await stack.enter_async_context(ErpReceiver())
            policy = CallbackPolicy.allowing(settings.callback_allow)
            name = role_token_name("soak", Role.ERP, suffix)
            erp.signing_secret = point_erp_client(
                sessions, name, erp.url, erp_format, policy
            ).signing_secret
        unit = SimUnit(UNIT, cycle_time_s=cycle, max_job_orders=max_jobs)
        sim = await stack.enter_async_context(PlcSimulator([unit], port=plc_port))
        tmp = Path(tempfile.mkdtemp(prefix="mes-soak-temporal-"))
        stack.callback(shutil.rmtree, tmp, True)
        server = TemporalDevServer(tmp / "temporal.db", ui=False)
        stack.push_async_callback(server.stop)
        client = await server.start()
        worker = None
        if worker_process:
            env = {
                **os.environ,
                "MES_DATABASE_URL": database_url,
                "MES_TEMPORAL_ADDRESS": server.address,
                "MES_TASK_QUEUE": settings.task_queue,
                "MES_PLC_POLL_SECONDS": str(settings.plc_poll_seconds),
                "MES_CALLBACK_ALLOW": ",".join(settings.callback_allow),
            }
            worker = await child(stack, [sys.executable, "-m", "mes.cli", "worker"], env)
        else:
            await stack.enter_async_context(running_worker(client, settings, sessions))
        api_url = await stack.enter_async_context(api_server(settings, sessions, client))
        yield SoakStack(api_url, tokens, plc_url, client, sim, worker, erp)


async def child(
    stack: contextlib.AsyncExitStack, args: list[str], env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """A child process, stopped (SIGTERM, then SIGKILL) when ``stack`` closes."""
    proc = await asyncio.create_subprocess_exec(*args, env=env, cwd=ROOT)

    async def stop() -> None:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    stack.push_async_callback(stop)
    return proc


async def run_window(
    total: int, in_flight: int, one: Any, progress: str
) -> tuple[float, list[str]]:
    """Run ``one(i)`` for i < total, ``in_flight`` at a time; (seconds, outcomes)."""
    gate = asyncio.Semaphore(in_flight)
    outcomes: list[str] = []
    start = time.perf_counter()

    async def guarded(i: int) -> None:
        async with gate:
            outcomes.append(await one(i))

    async def report() -> None:
        while True:
            await asyncio.sleep(15)
            done = len(outcomes)
            el = time.perf_counter() - start
            print(f"  {progress}: {done}/{total} after {el:.0f} s", flush=True)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(guarded(i) for i in range(total)))
    finally:
        reporter.cancel()
    return time.perf_counter() - start, outcomes


async def soak(args: argparse.Namespace) -> int:
    with database(args.pg_url, args.sqlite) as url:
        async with soak_stack(url, args.max_jobs, args.cycle) as st:
            sizes: list[int] = []
            sampler = asyncio.create_task(sample_plc(st.plc_url, sizes))
            headers = {"Authorization": f"Bearer {st.tokens['erp']}"}
            async with httpx.AsyncClient(base_url=st.api_url, headers=headers, timeout=120) as http:

                async def one(i: int) -> str:
                    body = order_body(PRODUCT, i)
                    r = await call(http, "POST", "/api/v1/production-orders", json=body)
                    r.raise_for_status()
                    return await wait_final(http, r.json()["id"])

                mes_s, outcomes = await run_window(args.jobs, args.in_flight, one, "MES")
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sampler
            mes_peak = peak_mib()
            floor_s = None
            if not args.no_skeleton:
                floor_s = await skeleton(st.temporal, args.jobs, args.in_flight, args.cycle)
    completed = outcomes.count("Completed")
    most = max(sizes, default=-1)
    where = "SQLite" if args.sqlite else f"PostgreSQL ({args.pg_url.split('@')[-1]})"
    print(f"database: {where}, a new database for this run")
    print(
        f"jobs: {args.jobs} single-step orders through one work unit; PLC limit "
        f"{args.max_jobs} jobs, cycle {args.cycle} s; {args.in_flight} orders open at a time"
    )
    print(
        f"completed: {completed}/{args.jobs}; other ends: {sorted(set(outcomes) - {'Completed'})}"
    )
    print(f"MES: {args.jobs / mes_s:.2f} jobs/s ({mes_s:.1f} s from first post to last completion)")
    print(f"PLC list: at most {most} jobs in {len(sizes)} samples (limit {args.max_jobs})")
    print(f"peak RSS of this process (API + worker + PLC simulator): {mes_peak:.0f} MiB")
    if floor_s is not None:
        floor = args.jobs / floor_s
        print(
            f"floor, bare Temporal skeleton of the same shape: {floor:.2f} jobs/s "
            f"({floor_s:.1f} s); MES / floor = {(args.jobs / mes_s) / floor:.2f}"
        )
    else:
        print("floor: not measured (--no-skeleton)")
    ok = completed == args.jobs and 0 <= most <= args.max_jobs
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


# --- the bare Temporal skeleton ----------------------------------------------------------------

_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))
_T = timedelta(seconds=60)


@dataclasses.dataclass
class SkeletonInput:
    """One skeleton order: its number and how many wait activities its job makes (the MES
    makes one per PLC state change it sees)."""

    order: str
    waits: int = 2
    #: Activities before the waits (the MES's prepare, room, dispatch) and after them
    #: (record, clear).
    sends: int = 3
    ends: int = 2


class SkeletonActivities:
    def __init__(self, cycle: float) -> None:
        self.cycle = cycle

    @activity.defn(name="sk_step")
    async def step(self, name: str) -> str:
        return name

    @activity.defn(name="sk_wait")
    async def wait(self, waits: int) -> int:
        await asyncio.sleep(self.cycle / max(1, waits))
        return waits


@workflow.defn(name="SkeletonJob")
class SkeletonJob:
    """The job workflow's shape: wait for the order's release signal; ``sends`` activities
    (prepare, room, dispatch); ``waits`` waits, signalling the order after the first (the
    job started); ``ends`` activities (record, clear)."""

    def __init__(self) -> None:
        self._released = False

    @workflow.signal
    def release(self) -> None:
        self._released = True

    @workflow.run
    async def run(self, job: SkeletonInput) -> str:
        await workflow.wait_condition(lambda: self._released)
        for i in range(job.sends):
            await workflow.execute_activity(
                "sk_step", f"send-{i}", start_to_close_timeout=_T, retry_policy=_RETRY
            )
        for i in range(job.waits):
            await workflow.execute_activity("sk_wait", job.waits, start_to_close_timeout=_T)
            parent = workflow.info().parent
            if i == 0 and job.waits > 1 and parent is not None:
                await workflow.get_external_workflow_handle(parent.workflow_id).signal("report")
        for i in range(job.ends):
            await workflow.execute_activity(
                "sk_step", f"end-{i}", start_to_close_timeout=_T, retry_policy=_RETRY
            )
        return "Completed"


@workflow.defn(name="SkeletonOrder")
class SkeletonOrder:
    """The order workflow's shape: a reporter delivering on each report signal (and at the
    start and the end), plan, one child job released by a signal, complete."""

    def __init__(self) -> None:
        self._report = True
        self._closing = False

    @workflow.signal
    def report(self) -> None:
        self._report = True

    async def _reporter(self) -> None:
        while True:
            await workflow.wait_condition(lambda: self._report or self._closing)
            if not self._report:
                return
            self._report = False
            await workflow.execute_activity("sk_step", "deliver", start_to_close_timeout=_T)

    @workflow.run
    async def run(self, order: SkeletonInput) -> str:
        reporter = asyncio.create_task(self._reporter())
        await workflow.execute_activity("sk_step", "plan", start_to_close_timeout=_T)
        job = await workflow.start_child_workflow(
            SkeletonJob.run, order, id=f"sk-job-{order.order}-01"
        )
        await job.signal(SkeletonJob.release)
        state = await job
        await workflow.execute_activity("sk_step", "complete", start_to_close_timeout=_T)
        self._report = self._closing = True
        await reporter
        return state


def skeleton_worker(client: Client, queue: str, cycle: float) -> Worker:
    acts = SkeletonActivities(cycle)
    return Worker(
        client,
        task_queue=queue,
        workflows=[SkeletonOrder, SkeletonJob],
        activities=[acts.step, acts.wait],
        workflow_runner=UnsandboxedWorkflowRunner(),
    )


async def run_skeleton_worker(address: str, queue: str, cycle: float) -> int:
    """``soak.py skeleton-worker``: the skeleton's worker alone, until SIGTERM or SIGINT."""
    client = await Client.connect(address)
    async with skeleton_worker(client, queue, cycle):
        await wait_for_stop_signal()
    return 0


async def skeleton_orders(
    client: Client, queue: str, total: int, in_flight: int, shape: SkeletonInput | None = None
) -> tuple[float, list[str]]:
    """Run ``total`` skeleton orders of ``shape`` on ``queue``, ``in_flight`` at a time:
    (seconds, their order numbers)."""
    numbers: list[str] = []

    async def one(i: int) -> str:
        n = uuid.uuid4().hex[:10]
        numbers.append(n)
        given = dataclasses.replace(shape or SkeletonInput(""), order=n)
        state: str = await client.execute_workflow(
            SkeletonOrder.run, given, id=f"sk-order-{n}", task_queue=queue
        )
        return state

    took, outcomes = await run_window(total, in_flight, one, "skeleton")
    assert outcomes.count("Completed") == total
    return took, numbers


async def skeleton(client: Client, total: int, in_flight: int, cycle: float) -> float:
    """Seconds to run ``total`` skeleton orders, ``in_flight`` at a time (worker in this
    process)."""
    queue = f"skeleton-{uuid.uuid4().hex[:6]}"
    async with skeleton_worker(client, queue, cycle):
        took, _ = await skeleton_orders(client, queue, total, in_flight)
    return took


# --- dev: orders in a row ---------------------------------------------------------------------


async def dev(args: argparse.Namespace) -> int:
    with database(args.pg_url, args.sqlite) as url:
        settings = Settings(database_url=url)
        async with embedded_stack(
            settings, token_prefix="dev", temporal_ui=False, cycle_time_s=args.cycle
        ) as stack:
            headers = {"Authorization": f"Bearer {stack.tokens['erp']}"}
            async with httpx.AsyncClient(
                base_url=stack.api_url, headers=headers, timeout=120
            ) as http:
                products = ["BREAD-WHITE", "ROLL-6PK"]
                start = time.perf_counter()
                ids = []
                for i in range(args.orders):
                    body = order_body(products[i % 2], i)
                    r = await call(http, "POST", "/api/v1/production-orders", json=body)
                    r.raise_for_status()
                    ids.append(r.json()["id"])
                posted_s = time.perf_counter() - start
                print(f"  posted {len(ids)} orders in a row in {posted_s:.1f} s", flush=True)
                states: dict[int, str] = {}
                last_report = time.perf_counter()
                while len(states) < len(ids):
                    for oid in ids:
                        if oid in states:
                            continue
                        r = await call(http, "GET", f"/api/v1/production-orders/{oid}")
                        if r.json()["state"] in FINAL:
                            states[oid] = r.json()["state"]
                    if time.perf_counter() - last_report > 15:
                        last_report = time.perf_counter()
                        el = last_report - start
                        print(f"  {len(states)}/{len(ids)} ended after {el:.0f} s", flush=True)
                    await asyncio.sleep(1)
                done_s = time.perf_counter() - start
                released = (
                    await http.get("/api/v1/production-orders", params={"state": "Released"})
                ).json()
    left = released if isinstance(released, list) else released.get("items", released)
    counts = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
    where = "SQLite" if args.sqlite else f"PostgreSQL ({args.pg_url.split('@')[-1]})"
    cycle = f"{args.cycle} s" if args.cycle else "the sample plant's (as mes dev)"
    print(f"database: {where}; PLC cycle: {cycle}")
    print(f"orders: {len(ids)} posted one after another in {posted_s:.1f} s")
    print(f"all ended after {done_s:.1f} s: {counts}")
    print(f"left Released: {len(left)}")
    print(f"peak RSS of this process: {peak_mib():.0f} MiB")
    ok = counts == {"Completed": len(ids)} and not left
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    logging.getLogger("temporalio").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "mode", nargs="?", choices=["soak", "dev", "skeleton-worker"], default="soak"
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--max-jobs", type=int, default=10)
    parser.add_argument("--cycle", type=float, default=None)
    parser.add_argument("--in-flight", type=int, default=30)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--no-skeleton", action="store_true")
    parser.add_argument("--address", help="skeleton-worker: the Temporal server")
    parser.add_argument("--queue", help="skeleton-worker: its task queue")
    args = parser.parse_args()
    if args.mode == "skeleton-worker":
        return asyncio.run(run_skeleton_worker(args.address, args.queue, args.cycle or 0.01))
    if args.mode == "soak":
        args.cycle = 0.01 if args.cycle is None else args.cycle
        return asyncio.run(soak(args))
    return asyncio.run(dev(args))


if __name__ == "__main__":
    raise SystemExit(main())
