"""Genealogy traces on a plant history of a million lots: the service against plain SQL.

How it measures:

1. Creates its own PostgreSQL database (dropped at the end unless ``--keep``), applies the
   migrations and fills a synthetic plant history in SQL (``generate_series``, a few
   statements): ``--levels`` levels of ``--lots / --levels`` lots each. Level 0 is stock;
   the lot ``i`` of level ``k`` is made by step ``k`` of production order ``i`` from the
   lots ``i + o`` (modulo the level's width) of level ``k - 1``, for each offset ``o`` of
   ``--offsets``: fan-in and fan-out of ``len(offsets)``, and diamonds everywhere (a lot is
   reached along many paths of one length). Every produced lot has its job order, job
   response, material actuals (produced and consumed), edges with quantities and a test
   result; the orders' product is the top level's material, so the top lots are the
   finished ones.
2. Starts the API as ``mes serve`` (uvicorn, its own process) on a free port.
3. For ``--samples`` random lots each, times ``backward`` (from a top lot), ``forward``
   (from a stock lot) at ``--depth``, and ``impact`` (from a level-1 lot, default depth),
   (a) through the HTTP API and (b) as plain SQL of the same rows on psycopg's asyncio
   connections, one per client (traces: ``mes.genealogy.trace_sql``, every lot with how it
   was made, the edges and the test results; impact: the service's walk and the finished
   lots, ``IMPACT_SQL``); sequentially and with ``--clients`` concurrent clients. The two are
   interleaved (``--rounds`` rounds of each on the same lots, which goes first alternating)
   and every answer is checked to list what the plain SQL returned. Prints p50 and p95, the
   ratio service / SQL, and the lots per trace.

``--keep`` keeps the filled database, ``--reuse NAME`` measures again on it without filling,
``--mes PATH`` serves with another checkout's ``mes`` (before and after on one floor).

    uv run python bench/genealogy.py                  # 1,000,000 lots (about 3 minutes)
    uv run python bench/genealogy.py --lots 120000    # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mes import genealogy
from mes.auth import create_token
from mes.db import make_engine, make_sessionmaker
from mes.launch import free_port
from mes.migrate import upgrade

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def fill(url: str, width: int, levels: int, offsets: list[int]) -> None:
    """The synthetic history, in SQL. Ids are computed from (level, index), so every table
    is one INSERT … SELECT over generate_series."""
    w, top = width, levels - 1
    offs = "ARRAY[" + ",".join(str(o) for o in offsets) + "]"
    statements = [
        "INSERT INTO equipment (id, external_id, description, equipment_level) "
        "SELECT u, 'WU-' || u, '', 'WorkUnit' FROM generate_series(1, 10) u",
        "INSERT INTO material_definition (id, external_id, description, unit, unit_conversions) "
        f"SELECT k + 1, 'MAT-' || k, '', CASE WHEN k = {top} THEN 'ea' ELSE 'kg' END, '{{}}' "
        f"FROM generate_series(0, {top}) k",
        "INSERT INTO work_master (id, external_id, version, description) "
        f"SELECT k, 'WM-' || k, '2', '' FROM generate_series(1, {top}) k",
        "INSERT INTO test_specification (id, external_id, work_master_id, property_name, "
        "low, high, unit) "
        f"SELECT k, 'TS-' || k, k, 'Weight', 0, 9, 'g' FROM generate_series(1, {top}) k",
        "INSERT INTO operations_definition (id, external_id, description, "
        f"material_definition_id) VALUES (1, 'OD-TOP', '', {top + 1})",
        "INSERT INTO operations_segment (id, operations_definition_id, external_id, sequence, "
        f"description, work_master_id) SELECT k, 1, 'STEP-' || k, k, '', k "
        f"FROM generate_series(1, {top}) k",
        # One production order per top lot; its step k made lot (k, i).
        "INSERT INTO operations_request (id, external_id, operations_definition_id, "
        "material_definition_id, quantity, unit, priority, due, customer_order, state, late, "
        "request_hash, workflow_id, created_at) "
        f"SELECT i + 1, 'ORD-' || lpad(i::text, 7, '0'), 1, {top + 1}, 100, 'ea', 0, "
        "timestamptz '2026-02-01', 'CO-' || (i % 10000), 'Completed', false, 'x', "
        "'order-ORD-' || i, timestamptz '2026-01-01' "
        f"FROM generate_series(0, {w - 1}) i",
        "INSERT INTO segment_requirement (id, operations_request_id, operations_segment_id, "
        "sequence, quantity, unit, state) "
        f"SELECT (k - 1) * {w} + i + 1, i + 1, k, k, 100, 'kg', 'Completed' "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i",
        "INSERT INTO job_order (id, external_id, segment_requirement_id, work_master_id, "
        "equipment_id, priority, state, parameters, parameters_hash, work_master_version, "
        "created_at, started_at, ended_at) "
        f"SELECT (k - 1) * {w} + i + 1, 'ORD-' || lpad(i::text, 7, '0') || '-' || "
        f"lpad(k::text, 2, '0'), (k - 1) * {w} + i + 1, k, 1 + i % 10, 0, 'Completed', "
        "json_build_array(json_build_object('name', 'Speed', 'value', k, 'unit', 'rpm')), "
        "md5(k::text) || md5(i::text), '2', timestamptz '2026-01-01', "
        "timestamptz '2026-01-01' + make_interval(hours => k, secs => i), "
        "timestamptz '2026-01-01' + make_interval(hours => k, secs => i + 600) "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i",
        # The stock and every made lot: lot (k, i) has id k * w + i + 1, made by job (k, i).
        "INSERT INTO material_lot (id, external_id, material_definition_id, quantity, unit, "
        "status, disposition, created_at, job_order_id) "
        f"SELECT k * {w} + i + 1, 'L' || lpad(k::text, 2, '0') || '-' || lpad(i::text, 7, '0'), "
        f"k + 1, (i % 7) * 10, CASE WHEN k = {top} THEN 'ea' ELSE 'kg' END, "
        "CASE WHEN i % 7 = 0 THEN 'Consumed' ELSE 'Available' END, "
        "CASE WHEN i % 97 = 0 THEN 'Restricted' ELSE 'Released' END, "
        "timestamptz '2026-01-01' + make_interval(hours => k, secs => i), "
        f"CASE WHEN k > 0 THEN (k - 1) * {w} + i + 1 END "
        f"FROM generate_series(0, {top}) k, generate_series(0, {w - 1}) i",
        "INSERT INTO job_response (id, external_id, job_order_id, state, start_time, end_time, "
        "processed_count, defective_count, recorded_at) "
        "SELECT id, external_id || '-R', id, 'Completed', started_at, ended_at, 1, 0, ended_at "
        "FROM job_order",
        "INSERT INTO material_actual (id, job_response_id, material_definition_id, "
        "material_lot_id, use, quantity, unit) "
        f"SELECT (k - 1) * {w} + i + 1, (k - 1) * {w} + i + 1, k + 1, k * {w} + i + 1, "
        f"'Produced', 100, CASE WHEN k = {top} THEN 'ea' ELSE 'kg' END "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i",
        "INSERT INTO material_actual (id, job_response_id, material_definition_id, "
        "material_lot_id, use, quantity, unit) "
        f"SELECT {top * w} + ((k - 1) * {w} + i) * {len(offsets)} + n, (k - 1) * {w} + i + 1, "
        f"k, (k - 1) * {w} + (i + ({offs})[n]) % {w} + 1, 'Consumed', 25, 'kg' "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i, "
        f"generate_series(1, {len(offsets)}) n",
        "INSERT INTO material_lot_assembly (material_lot_id, component_lot_id, "
        "job_response_id, quantity, unit) "
        f"SELECT k * {w} + i + 1, (k - 1) * {w} + (i + ({offs})[n]) % {w} + 1, "
        f"(k - 1) * {w} + i + 1, 25, 'kg' "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i, "
        f"generate_series(1, {len(offsets)}) n",
        "INSERT INTO test_result (id, test_specification_id, job_response_id, material_lot_id, "
        "value, unit, passed, tested_at) "
        f"SELECT (k - 1) * {w} + i + 1, k, (k - 1) * {w} + i + 1, k * {w} + i + 1, i % 11, "
        f"'g', i % 11 <= 9, timestamptz '2026-01-02' "
        f"FROM generate_series(1, {top}) k, generate_series(0, {w - 1}) i",
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql.encode())
        for table in ("material_lot_assembly",):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))".encode()
            )
        conn.execute(b"VACUUM ANALYZE")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def timed(calls: list[Callable[[], Awaitable[object]]], clients: int) -> list[float]:
    """Run ``calls`` with ``clients`` at a time; the latency of each, in ms."""
    latencies: list[float] = []
    queue = list(reversed(calls))

    async def client() -> None:
        while queue:
            call = queue.pop()
            t = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


class PlainSql:
    """The plain SQL from psycopg's asyncio connections, one per client (no thread hop, no
    pool, no HTTP): the floor. The rows are fetched whole and kept for the check."""

    def __init__(self, connections: list[psycopg.AsyncConnection[tuple[object, ...]]]) -> None:
        self.free = connections

    @classmethod
    async def connect(cls, url: str, clients: int) -> PlainSql:
        return cls(
            [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(clients)]
        )

    async def run(self, sql: bytes, params: dict[str, object]) -> list[tuple[object, ...]]:
        conn = self.free.pop()
        try:
            return await (await conn.execute(sql, params)).fetchall()
        finally:
            self.free.append(conn)

    async def close(self) -> None:
        for c in self.free:
            await c.close()


def lots_in(body: bytes) -> int:
    """How many lots a trace (or finished lots an impact) answer lists."""
    answer = json.loads(body)
    return len(answer["lots"] if "lots" in answer else answer["finished"])


def same_rows(body: bytes, rows: list[tuple[object, ...]]) -> bool:
    """The answer lists what the plain SQL returned: a trace its lots and edges (the rows of
    ``trace_sql``, by kind: lot, edge, test), an impact its finished lots."""
    answer = json.loads(body)
    if "finished" in answer:
        names = sorted(str(r[0]) for r in rows)
        return names == sorted(f["lot"] for f in answer["finished"])
    lots = sorted(str(r[3]) for r in rows if r[0] == "lot")
    edges = sum(1 for r in rows if r[0] == "edge")
    tests = sum(1 for r in rows if r[0] == "test")
    listed = sorted(lot["lot"] for lot in answer["lots"])
    listed_tests = sum(len(lot["test_results"]) for lot in answer["lots"])
    return (lots, edges, tests) == (listed, len(answer["edges"]), listed_tests)


#: The plain SQL of the recall list: the service's walk (``genealogy.walk_sql``), then the
#: finished lots with the columns the answer lists (the rows of ``trace_sql`` would be every
#: lot walked, their edges and test results: four times the rows the answer has).
IMPACT_SQL = """
SELECT l.external_id, m.external_id, r.depth, o.id, o.external_id, o.customer_order,
    l.disposition, l.status, l.quantity, l.unit, jo.ended_at
FROM visit r
JOIN material_lot l ON l.id = r.lot_id
JOIN material_definition m ON m.id = l.material_definition_id
JOIN job_order jo ON jo.id = l.job_order_id
JOIN segment_requirement sr ON sr.id = jo.segment_requirement_id
JOIN operations_request o ON o.id = sr.operations_request_id
WHERE o.material_definition_id = l.material_definition_id
"""


def psycopg_sql(kind: str, direction: genealogy.Direction, depth: int) -> bytes:
    """The floor's statement, with ``depth`` and ``limit`` written in as the service does."""
    limit = genealogy.DEFAULT_LIMIT
    if kind == "impact":
        sql = genealogy.walk_sql("postgresql", "forward", depth, limit) + IMPACT_SQL
    else:
        sql = genealogy.trace_sql("postgresql", direction, depth, limit)
    return genealogy.driver_sql(sql, "pyformat").encode()


async def main(args: argparse.Namespace) -> None:
    width = -(-args.lots // args.levels)
    offsets = [int(o) for o in args.offsets.split(",")]
    name = args.reuse or f"mes_bench_genealogy_{uuid.uuid4().hex[:8]}"
    base = args.database_url.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    print(
        f"plant history: {width * args.levels:,} lots = {args.levels} levels x {width:,}; "
        f"fan-in/fan-out {len(offsets)} (offsets {offsets}); "
        f"{width * (args.levels - 1) * len(offsets):,} edges; {width:,} production orders; "
        f"database {name}"
    )
    if not args.reuse:
        with psycopg.connect(args.database_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"'.encode())
    server: asyncio.subprocess.Process | None = None
    try:
        if args.reuse:
            print("reusing the filled database (the same --lots, --levels and --offsets)")
        else:
            t = time.perf_counter()
            upgrade(url)
            fill(url, width, args.levels, offsets)
            print(f"filled in {time.perf_counter() - t:.0f} s")
        engine = make_engine(url)
        with make_sessionmaker(engine)() as s:
            token = create_token(s, f"bench-auditor-{uuid.uuid4().hex[:8]}", "auditor")
        engine.dispose()

        port = free_port()
        mes = args.mes or shutil.which("mes") or str(Path(sys.executable).parent / "mes")
        server = await asyncio.create_subprocess_exec(
            mes,
            "serve",
            "--port",
            str(port),
            env={**os.environ, "MES_DATABASE_URL": url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        top = args.levels - 1
        rng = random.Random(args.seed)

        def lot(level: int) -> str:
            return f"L{level:02d}-{rng.randrange(width):07d}"

        kinds: list[tuple[str, genealogy.Direction, int, int | None]] = [
            ("backward", "backward", top, args.depth),
            ("forward", "forward", 0, args.depth),
            ("impact", "forward", 1, None),
        ]
        plain = await PlainSql.connect(url, args.clients)
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120, limits=limits
        ) as http:
            for _ in range(1200):  # a loaded machine takes a while to start it
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            rows: list[tuple[str, str, int, float, float, float, float, float]] = []
            for kind, direction, level, depth in kinds:
                roots = [lot(level) for _ in range(args.samples)]
                sql_depth = depth or genealogy.MAX_DEPTH
                statement = psycopg_sql(kind, direction, sql_depth)
                query = f"?depth={depth}" if depth else ""
                bodies: dict[str, bytes] = {}
                answers: dict[str, list[tuple[object, ...]]] = {}

                async def service(
                    root: str,
                    kind: str = kind,
                    query: str = query,
                    bodies: dict[str, bytes] = bodies,
                ) -> None:
                    r = await http.get(f"/api/v1/genealogy/lots/{root}/{kind}{query}")
                    r.raise_for_status()
                    bodies[root] = r.content  # read whole; decoded after the clock stops

                async def sql(
                    root: str,
                    statement: bytes = statement,
                    answers: dict[str, list[tuple[object, ...]]] = answers,
                ) -> None:
                    answers[root] = await plain.run(statement, {"lot": root})

                # Warm both paths (connections, caches) on other lots first.
                for r in [lot(level) for _ in range(10)]:
                    await service(r)
                    await sql(r)
                for clients in (1, args.clients):
                    bodies.clear()
                    answers.clear()
                    # Interleaved: rounds of the service and the plain SQL on the same lots,
                    # which goes first alternating, so that both meet the same load.
                    s_lat: list[float] = []
                    q_lat: list[float] = []
                    step = max(clients, args.samples // args.rounds)
                    for n, at in enumerate(range(0, len(roots), step)):
                        chunk = roots[at : at + step]
                        order: list[tuple[Callable[[str], Awaitable[None]], list[float]]] = [
                            (service, s_lat),
                            (sql, q_lat),
                        ]
                        for call, latencies in order if n % 2 == 0 else reversed(order):
                            latencies += await timed([partial(call, r) for r in chunk], clients)
                    wrong = [r for r in roots if not same_rows(bodies[r], answers[r])]
                    if wrong:
                        raise SystemExit(f"{kind}: the service and the SQL differ on {wrong[:5]}")
                    rows.append(
                        (
                            kind,
                            "sequential" if clients == 1 else f"{clients} clients",
                            round(statistics.mean(lots_in(b) for b in bodies.values())),
                            percentile(s_lat, 50),
                            percentile(s_lat, 95),
                            percentile(q_lat, 50),
                            percentile(q_lat, 95),
                            percentile(s_lat, 95) / percentile(q_lat, 95),
                        )
                    )
        await plain.close()
        print()
        print(
            "| trace | clients | lots (impact: finished) | service p50 / p95 ms "
            "| plain SQL p50 / p95 ms | p95 ratio |"
        )
        print("|---|---|---|---|---|---|")
        for kind, mode, size, sp50, sp95, qp50, qp95, ratio in rows:
            print(
                f"| {kind} | {mode} | {size:,} | {sp50:.1f} / {sp95:.1f} | "
                f"{qp50:.1f} / {qp95:.1f} | {ratio:.2f} |"
            )
        print()
        print(
            f"rerun: uv run python bench/genealogy.py --lots {args.lots} --levels {args.levels} "
            f"--offsets {args.offsets} --depth {args.depth} --samples {args.samples} "
            f"--clients {args.clients} --seed {args.seed}"
        )
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
        if args.keep or args.reuse:
            print(f"kept: rerun on it with --reuse {name}")
        else:
            with psycopg.connect(args.database_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--lots", type=int, default=1_000_000)
    parser.add_argument("--levels", type=int, default=12)
    parser.add_argument("--offsets", default="0,5,17,31", help="fan-in: component offsets")
    parser.add_argument("--depth", type=int, default=10, help="depth of backward/forward")
    parser.add_argument("--samples", type=int, default=200, help="traces per measurement")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--mes",
        metavar="PATH",
        help="the mes executable to serve with (another checkout's, to compare versions)",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds of service and SQL"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument(
        "--reuse",
        metavar="NAME",
        help="measure on a database kept by an earlier run (--keep), without filling; kept",
    )
    asyncio.run(main(parser.parse_args()))
