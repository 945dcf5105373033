"""The lists at the floor: 100,000 work orders through the API against plain SQL.

How it measures:

1. Creates its own PostgreSQL database (dropped at the end unless ``--keep``), applies the
   migrations and fills it in SQL (``generate_series``): ``--lines`` lines of 5 work units,
   ``--orders`` single-step production orders with one work order each (dues on the hour
   over a year, so many tie; priority 0-9; one in ``--open-every`` is still open (Waiting,
   Ready, Running or Held), the rest Completed), a nonconformance for one lot in 20 and an
   audit event per order.
2. EXPLAINs every statement the list services run (captured from their engine, with their
   parameters) for each filter and sort the routes offer, and prints the indexes each uses;
   a sequential scan of a table with more than a few rows is flagged.
3. Starts the API as ``mes serve`` (uvicorn, its own process) on a free port and times, for
   ``--samples`` requests each: the dispatch list of a random line; work orders sorted by
   due, the first page and a deep page (a random position in the middle half) by ``offset``
   and by ``after`` (the cursor the previous page would have given); through the HTTP API
   (the answer read whole) and as the plain SQL of the same rows from psycopg (the floor:
   for the deep page, the keyset statement, the fastest way to those rows). Prints p50 and
   p95 and the ratio of the p50s.

    uv run python bench/lists.py                      # 100,000 work orders (about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import event, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mes import production_orders, quality, work_orders
from mes.api.audit_trail import _audit_page
from mes.api.params import Paging, Period
from mes.auth import create_token
from mes.db import make_engine, make_sessionmaker
from mes.launch import free_port
from mes.migrate import upgrade
from mes.paging import encode_cursor

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
OPEN = ["Waiting", "Ready", "Running", "Held"]


def fill(url: str, orders: int, lines: int, open_every: int) -> None:
    """The synthetic floor, in SQL: one INSERT … SELECT over generate_series per table."""
    units = lines * 5
    n = orders
    state = (
        f"CASE WHEN i % {open_every} = 0 THEN "
        f"(ARRAY['Waiting','Ready','Running','Held'])[1 + (i / {open_every}) % 4] "
        "ELSE 'Completed' END"
    )
    statements = [
        "INSERT INTO equipment (id, external_id, description, equipment_level) "
        f"SELECT l, 'LINE-' || l, '', 'ProductionLine' FROM generate_series(1, {lines}) l",
        "INSERT INTO equipment (id, external_id, description, equipment_level, parent_id) "
        f"SELECT {lines} + u, 'WU-' || u, '', 'WorkUnit', 1 + (u - 1) / 5 "
        f"FROM generate_series(1, {units}) u",
        "INSERT INTO material_definition (id, external_id, description, unit, unit_conversions) "
        "VALUES (1, 'MAT-1', '', 'ea', '{}')",
        "INSERT INTO work_master (id, external_id, version, description) "
        "VALUES (1, 'WM-1', '1', '')",
        "INSERT INTO operations_definition (id, external_id, description, "
        "material_definition_id) VALUES (1, 'OD-1', '', 1)",
        "INSERT INTO operations_segment (id, operations_definition_id, external_id, sequence, "
        "description, work_master_id) VALUES (1, 1, 'STEP-1', 1, '', 1)",
        "INSERT INTO operations_request (id, external_id, operations_definition_id, "
        "material_definition_id, quantity, unit, priority, due, customer_order, state, late, "
        "request_hash, workflow_id, created_at, source) "
        "SELECT i, 'ORD-' || lpad(i::text, 7, '0'), 1, 1, 100, 'ea', i % 10, "
        "timestamptz '2026-01-01' + make_interval(hours => (i * 7919) % 8760), "
        f"'CO-' || (i % 1000), {state}, false, 'x', 'order-ORD-' || i, "
        "timestamptz '2025-12-01' + make_interval(secs => i), "
        "CASE WHEN i % 2 = 0 THEN 'erp-a' ELSE 'erp-b' END "
        f"FROM generate_series(1, {n}) i",
        "INSERT INTO segment_requirement (id, operations_request_id, operations_segment_id, "
        f"sequence, quantity, unit, state) SELECT i, i, 1, 1, 100, 'ea', {state} "
        f"FROM generate_series(1, {n}) i",
        "INSERT INTO job_order (id, external_id, segment_requirement_id, work_master_id, "
        "equipment_id, priority, state, parameters, created_at, dispatched_at) "
        f"SELECT i, 'ORD-' || lpad(i::text, 7, '0') || '-01', i, 1, "
        f"{lines} + 1 + (i + i / {open_every}) % {units}, "
        f"i % 10, {state}, '[]', timestamptz '2025-12-01', "
        "CASE WHEN i % 3 = 0 THEN timestamptz '2026-01-01' + make_interval(secs => i) END "
        f"FROM generate_series(1, {n}) i",
        "INSERT INTO material_lot (id, external_id, material_definition_id, quantity, unit, "
        "status, disposition, created_at, job_order_id) "
        "SELECT i, 'L-' || lpad(i::text, 7, '0'), 1, 100, 'ea', 'Available', 'Restricted', "
        f"timestamptz '2026-01-01', i FROM generate_series(20, {n}, 20) i",
        "INSERT INTO nonconformance (id, external_id, state, material_lot_id, job_order_id, "
        "reason, opened_by, opened_at) "
        "SELECT i / 20, 'NC-' || i, CASE WHEN i % 40 = 0 THEN 'Closed' ELSE 'Open' END, i, i, "
        "'Weight out of specification', 'system', "
        "timestamptz '2026-01-01' + make_interval(mins => i / 20 / 3) "
        f"FROM generate_series(20, {n}, 20) i",
        # After the events already there (the bench token's); the chain is not kept.
        "INSERT INTO audit_event (id, seq, occurred_at, actor, action, object_type, object_id, "
        "prev_hash, hash) "
        "SELECT 1000 + i, 1000 + i, timestamptz '2026-01-01' + make_interval(secs => i), "
        "CASE WHEN i % 3 = 0 THEN 'supervisor-' || (i % 7) ELSE 'system' END, 'job.state', "
        "'job_order', 'ORD-' || lpad(i::text, 7, '0') || '-01', md5(i::text), md5(i::text) "
        f"FROM generate_series(1, {n}) i",
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql.encode())
        for table in (
            "equipment",
            "operations_request",
            "segment_requirement",
            "job_order",
            "material_lot",
            "nonconformance",
            "audit_event",
        ):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))".encode()
            )
        conn.execute(b"VACUUM ANALYZE")


@contextmanager
def captured(session: Session) -> Iterator[list[tuple[str, Any]]]:
    """The statements a session runs, with their parameters."""
    seen: list[tuple[str, Any]] = []
    engine = session.get_bind()

    def keep(_c: object, _cur: object, statement: str, params: Any, *_a: object) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", keep)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", keep)


def explain(url: str, cursor: str) -> list[tuple[str, str, str]]:
    """Each list's statements, EXPLAINed: (list, the indexes used, sequential scans)."""
    engine = make_engine(url)
    page = Paging(limit=100)
    deep = Paging(limit=100, after=cursor)
    since = Period(since=datetime(2026, 1, 1, 1, tzinfo=UTC))
    wo = work_orders.list_work_orders
    cases: list[tuple[str, Callable[[Session], object]]] = [
        ("work orders by priority", lambda s: wo(s, paging=page)),
        ("work orders by due", lambda s: wo(s, sort="due", paging=page)),
        ("work orders by due, after a cursor", lambda s: wo(s, sort="due", paging=deep)),
        ("work orders in a state", lambda s: wo(s, state="Held", paging=page)),
        ("work orders of a line", lambda s: wo(s, work_center="LINE-3", paging=page)),
        ("work orders of an order", lambda s: wo(s, production_order="ORD-0000042")),
        (
            "work orders due in a window",
            lambda s: wo(
                s,
                sort="due",
                due_after=datetime(2026, 3, 1, tzinfo=UTC),
                due_before=datetime(2026, 3, 2, tzinfo=UTC),
            ),
        ),
        ("dispatch list", lambda s: work_orders.dispatch_list(s, "LINE-3")),
        ("production orders", lambda s: production_orders.list_orders(s, paging=page)),
        (
            "production orders in a state, of a client",
            lambda s: production_orders.list_orders(s, "Held", paging=page, source="erp-a"),
        ),
        ("nonconformances", lambda s: quality.list_nonconformances(s, paging=page)),
        ("open nonconformances", lambda s: quality.list_nonconformances(s, state="Open")),
        ("audit events", lambda s: _audit_page(s, None, None, None, Period(), page)),
        (
            "audit events of an object",
            lambda s: _audit_page(s, "job_order", "ORD-0000042-01", None, Period(), page),
        ),
        (
            "audit events of an actor prefix",
            lambda s: _audit_page(s, None, None, "supervisor-3", Period(), page),
        ),
        ("audit events since", lambda s: _audit_page(s, None, None, None, since, page)),
    ]
    rows: list[tuple[str, str, str]] = []
    with make_sessionmaker(engine)() as s:
        sizes = {
            str(t): float(n)
            for t, n in s.execute(
                text("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r'")
            )
        }
        for name, call in cases:
            with captured(s) as seen:
                call(s)
            indexes: set[str] = set()
            scans: set[str] = set()
            for statement, params in seen:
                if not statement.lstrip().upper().startswith("SELECT"):
                    continue
                plan = s.connection().exec_driver_sql("EXPLAIN " + statement, params).all()
                for (line,) in plan:
                    if " using " in line.lower():
                        indexes.add(line.lower().split(" using ")[-1].split(" ")[0].strip())
                    elif "Index Scan on " in line:
                        indexes.add(line.split("Index Scan on ")[-1].split(" ")[0].strip())
                    elif "Seq Scan on " in line:
                        table = line.split("Seq Scan on ")[1].split(" ")[0]
                        if sizes.get(table, 0) > 1000:  # a small table is read whole
                            scans.add(f"{table} ({sizes[table]:,.0f} rows)")
            s.rollback()
            rows.append((name, ", ".join(sorted(indexes)), ", ".join(sorted(scans)) or "-"))
    engine.dispose()
    return rows


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def timed(calls: list[Callable[[], Awaitable[object]]]) -> list[float]:
    """Run ``calls`` one after another; the latency of each, in ms."""
    latencies: list[float] = []
    for call in calls:
        t = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - t) * 1000)
    return latencies


#: The rows a work order list shows, as one plain statement.
ROWS = """
SELECT j.external_id, o.external_id, o.id, sr.sequence, seg.external_id, wm.external_id,
    e.external_id, p.external_id, j.priority, j.state, o.due, j.dispatched_at, j.started_at,
    j.ended_at
FROM job_order j
JOIN segment_requirement sr ON sr.id = j.segment_requirement_id
JOIN operations_request o ON o.id = sr.operations_request_id
JOIN operations_segment seg ON seg.id = sr.operations_segment_id
JOIN work_master wm ON wm.id = j.work_master_id
JOIN equipment e ON e.id = j.equipment_id
LEFT JOIN equipment p ON p.id = e.parent_id
"""
BY_DUE = " ORDER BY o.due, j.priority DESC, j.id LIMIT 100"
DUE_PAGE = (ROWS + BY_DUE).encode()
DUE_AFTER = (
    ROWS + " WHERE o.due >= %(due)s AND (o.due > %(due)s OR (o.due = %(due)s AND "
    "(j.priority < %(priority)s OR (j.priority = %(priority)s AND j.id > %(id)s))))" + BY_DUE
).encode()
DISPATCH = (
    ROWS + " WHERE e.parent_id = (SELECT id FROM equipment WHERE external_id = %(line)s) "
    "AND j.state IN ('Waiting', 'Ready', 'Running', 'Held') "
    "ORDER BY CASE j.state WHEN 'Running' THEN 0 WHEN 'Ready' THEN 1 WHEN 'Waiting' THEN 2 "
    "ELSE 3 END, j.priority DESC, j.dispatched_at NULLS FIRST, j.id"
).encode()
#: The sort keys of every work order by due, in order: where a deep page starts.
DUE_KEYS = (
    b"SELECT o.due, j.priority, j.id FROM job_order j "
    b"JOIN segment_requirement sr ON sr.id = j.segment_requirement_id "
    b"JOIN operations_request o ON o.id = sr.operations_request_id "
    b"ORDER BY o.due, j.priority DESC, j.id"
)


async def main(args: argparse.Namespace) -> None:
    name = f"mes_bench_lists_{uuid.uuid4().hex[:8]}"
    url = f"{args.database_url.rsplit('/', 1)[0]}/{name}"
    print(
        f"floor: {args.orders:,} production orders with a work order each, {args.lines} lines "
        f"of 5 work units, one in {args.open_every} open; database {name}"
    )
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    server: asyncio.subprocess.Process | None = None
    try:
        t = time.perf_counter()
        upgrade(url)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as s:
            token = create_token(s, "bench-supervisor", "supervisor")
        engine.dispose()
        fill(url, args.orders, args.lines, args.open_every)
        print(f"filled in {time.perf_counter() - t:.0f} s; load: {os.getloadavg()}")
        with psycopg.connect(url, autocommit=True) as conn:
            keys = conn.execute(DUE_KEYS).fetchall()
        middle = keys[len(keys) // 4 : 3 * len(keys) // 4]

        print()
        print("| list | indexes used | sequential scans |")
        print("|---|---|---|")
        mid_due, mid_priority, mid_id = middle[len(middle) // 2]
        cursor = encode_cursor("work-orders:due", [mid_due, mid_priority, mid_id])
        for what, indexes, scans in explain(url, cursor):
            print(f"| {what} | {indexes} | {scans} |")

        port = free_port()
        mes = shutil.which("mes") or str(Path(sys.executable).parent / "mes")
        server = await asyncio.create_subprocess_exec(
            mes,
            "serve",
            "--port",
            str(port),
            env={**os.environ, "MES_DATABASE_URL": url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        rng = random.Random(args.seed)
        plain = psycopg.connect(url, autocommit=True)
        headers = {"Authorization": f"Bearer {token}"}
        rows: list[tuple[str, int, float, float, float, float]] = []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120
        ) as http:
            for _ in range(1200):  # a loaded machine starts it slowly
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)

            def fetch(statement: bytes, params: dict[str, Any]) -> list[tuple[Any, ...]]:
                return plain.execute(statement, params).fetchall()

            def deep_position() -> int:
                return rng.randrange(len(keys) // 4, 3 * len(keys) // 4)

            def dispatch() -> tuple[str, dict[str, Any], bytes, dict[str, Any]]:
                line = f"LINE-{rng.randint(1, args.lines)}"
                return f"/api/v1/work-centers/{line}/dispatch-list", {}, DISPATCH, {"line": line}

            cases: list[tuple[str, Callable[[], tuple[str, dict[str, Any], bytes, dict[str, Any]]]]]
            cases = [
                ("dispatch list of a line", dispatch),
                (
                    "work orders by due, first page",
                    lambda: ("/api/v1/work-orders", {"sort": "due"}, DUE_PAGE, {}),
                ),
            ]

            def deep(by_after: bool) -> tuple[str, dict[str, Any], bytes, dict[str, Any]]:
                at = deep_position()
                due, priority, job = keys[at - 1]
                query: dict[str, Any] = {"sort": "due"}
                if by_after:
                    query["after"] = encode_cursor("work-orders:due", [due, priority, job])
                else:
                    query["offset"] = at
                return (
                    "/api/v1/work-orders",
                    query,
                    DUE_AFTER,
                    {
                        "due": due,
                        "priority": priority,
                        "id": job,
                    },
                )

            cases.append(("work orders by due, deep page by offset", lambda: deep(False)))
            cases.append(("work orders by due, deep page by after", lambda: deep(True)))
            for what, make in cases:
                service_ms: list[float] = []
                sql_ms: list[float] = []
                sizes: list[int] = []
                for i in range(args.samples + 10):  # the first 10 warm both paths
                    path, query, statement, params = make()
                    t0 = time.perf_counter()
                    r = await http.get(path, params=query)
                    r.raise_for_status()
                    body = r.json()
                    t1 = time.perf_counter()
                    found = await asyncio.to_thread(fetch, statement, params)
                    t2 = time.perf_counter()
                    if i >= 10:
                        service_ms.append((t1 - t0) * 1000)
                        sql_ms.append((t2 - t1) * 1000)
                        sizes.append(len(body["items"] if isinstance(body, dict) else body))
                        items = body["items"] if isinstance(body, dict) else body
                        assert [w["id"] for w in items] == [f[0] for f in found], what
                rows.append(
                    (
                        what,
                        round(statistics.mean(sizes)),
                        percentile(service_ms, 50),
                        percentile(service_ms, 95),
                        percentile(sql_ms, 50),
                        percentile(sql_ms, 95),
                    )
                )
        plain.close()
        print()
        print(f"load after the run: {os.getloadavg()}")
        print()
        print("| list | rows | API p50 / p95 ms | plain SQL p50 / p95 ms | p50 ratio |")
        print("|---|---|---|---|---|")
        for what, size, sp50, sp95, qp50, qp95 in rows:
            print(
                f"| {what} | {size} | {sp50:.1f} / {sp95:.1f} | {qp50:.1f} / {qp95:.1f} "
                f"| {sp50 / qp50:.1f} |"
            )
        print()
        print(
            f"rerun: uv run python bench/lists.py --orders {args.orders} --lines {args.lines} "
            f"--open-every {args.open_every} --samples {args.samples} --seed {args.seed}"
        )
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
        if not args.keep:
            with psycopg.connect(args.database_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--open-every", type=int, default=100, help="one order in N is open")
    parser.add_argument("--samples", type=int, default=100, help="requests per measurement")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    asyncio.run(main(parser.parse_args()))
