"""Audit chain verify at a million events: full against incremental, and the floor.

How it measures:

1. Creates its own PostgreSQL database (dropped at the end unless ``--keep``), applies the
   migrations and fills ``audit_event`` with ``--events`` events by plain SQL (``COPY``),
   their hashes computed in Python in batches with ``mes.audit.event_hash`` (the one
   definition of the hash; SQL cannot reproduce its canonical JSON exactly), and moves the
   chain head to the last one. A checkpoint is signed every ``--every`` events (as
   ``MES_AUDIT_CHECKPOINT_EVENTS`` would), the last one ``--tail`` events before the end:
   the events a running worker has not signed yet.
2. Times ``mes.audit_checkpoints.verify`` (what ``mes audit verify`` and
   ``GET /api/v1/audit-events/verify`` run) full (``--full``) and incremental (the default),
   ``--repeat`` times each, and prints the best of each, the events each recomputed and
   where the incremental one started.
3. The floor of a full verify, in the same run: the whole chain read by one psycopg server
   cursor, every hash recomputed by ``hashlib`` over the same canonical JSON, nothing else
   (no ORM, no checkpoints). Prints full / floor and full / incremental.

    uv run python bench/audit_verify.py                    # 1,000,000 events (~3 minutes)
    uv run python bench/audit_verify.py --events 100000    # a quick run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mes import audit
from mes import audit_checkpoints as checkpoints
from mes.db import make_engine, make_sessionmaker
from mes.migrate import upgrade
from mes.models import AuditEvent

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
COLUMNS = (
    "id, seq, occurred_at, actor, action, object_type, object_id, before, after, reason, "
    "prev_hash, hash"
)


def fill(
    url: str, events: int, every: int, tail: int, key_file: Path, cp_file: Path, batch: int
) -> None:
    """``events`` chained events by COPY; a checkpoint every ``every`` up to ``events - tail``."""
    key = checkpoints.load_signing_key(key_file)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    prev = audit.GENESIS
    last_signed = events - tail
    with psycopg.connect(url) as conn:
        for start in range(1, events + 1, batch):
            with conn.cursor().copy(f"COPY audit_event ({COLUMNS}) FROM STDIN") as copy:
                for seq in range(start, min(start + batch, events + 1)):
                    ev = AuditEvent(
                        seq=seq,
                        occurred_at=t0 + timedelta(milliseconds=seq),
                        actor="system" if seq % 3 else "supervisor:alice",
                        action="job_order.state",
                        object_type="job_order",
                        object_id=f"ORD-{seq // 4:07d}-01",
                        before={"state": "Running", "n": seq},
                        after={"state": "Completed", "note": "é ✓"},
                        reason=None if seq % 5 else "because",
                    )
                    ev.prev_hash = prev
                    ev.hash = prev = audit.event_hash(ev, prev)
                    copy.write_row(
                        (
                            seq,
                            seq,
                            ev.occurred_at,
                            ev.actor,
                            ev.action,
                            ev.object_type,
                            ev.object_id,
                            json.dumps(ev.before),
                            json.dumps(ev.after),
                            ev.reason,
                            ev.prev_hash,
                            ev.hash,
                        )
                    )
                    if (seq % every == 0 and seq <= last_signed) or seq == last_signed:
                        checkpoints.append(cp_file, checkpoints.sign(key, seq, ev.hash, t0))
            conn.commit()
        conn.execute("SELECT setval(pg_get_serial_sequence('audit_event', 'id'), %s)", (events,))
        conn.execute("UPDATE audit_chain_head SET seq = %s, last_hash = %s", (events, prev))
        conn.commit()
        conn.execute("ANALYZE audit_event")


def floor(url: str) -> tuple[float, int]:
    """The whole chain read by a server cursor and every hash recomputed, nothing else."""
    start = time.perf_counter()
    n, prev = 0, audit.GENESIS
    with psycopg.connect(url) as conn, conn.cursor(name="chain") as cur:
        cur.itersize = 5000
        cur.execute(
            "SELECT seq, occurred_at, actor, action, object_type, object_id, before, after, "
            "reason, prev_hash, hash FROM audit_event ORDER BY seq"
        )
        for seq, at, actor, action, otype, oid, before, after, reason, prev_hash, h in cur:
            body = {
                "seq": seq,
                "occurred_at": at.astimezone(UTC).isoformat(timespec="microseconds"),
                "actor": actor,
                "action": action,
                "object_type": otype,
                "object_id": oid,
                "before": before,
                "after": after,
                "reason": reason,
                "prev_hash": prev,
            }
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if prev_hash != prev or hashlib.sha256(canonical.encode()).hexdigest() != h:
                raise SystemExit(f"floor: event {seq} does not chain")
            prev, n = h, n + 1
    return time.perf_counter() - start, n


def main(args: argparse.Namespace) -> None:
    name = f"mes_bench_audit_{uuid.uuid4().hex[:8]}"
    url = args.database_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            key_file, cp_file = Path(tmp) / "key.pem", Path(tmp) / "checkpoints.jsonl"
            checkpoints.generate_key(key_file)
            upgrade(url)
            t = time.perf_counter()
            fill(url, args.events, args.every, args.tail, key_file, cp_file, 10000)
            lines = len(cp_file.read_text().splitlines())
            print(
                f"filled {args.events:,} events, {lines:,} checkpoints (every {args.every}, "
                f"the last {args.tail} events unsigned) in {time.perf_counter() - t:.1f} s"
            )
            public = checkpoints.load_verify_key(key_file)
            engine = make_engine(url)
            sessions = make_sessionmaker(engine)
            best: dict[bool, float] = {}
            reports: dict[bool, audit.ChainReport] = {}
            for full in (False, True):
                for _ in range(args.repeat):
                    with sessions() as s:
                        t = time.perf_counter()
                        report = checkpoints.verify(s, cp_file, public, full=full)
                        elapsed = time.perf_counter() - t
                    assert report.intact, report.reason
                    best[full] = min(best.get(full, elapsed), elapsed)
                    reports[full] = report
            engine.dispose()
            floor_s, floor_n = min(floor(url) for _ in range(args.repeat))
        inc, whole = reports[False], reports[True]
        print(f"load (uptime): {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
        print(
            f"full verify:        {best[True]:8.3f} s  ({whole.events:,} events recomputed, "
            f"{whole.checkpoints:,} checkpoints)"
        )
        print(
            f"incremental verify: {best[False]:8.3f} s  ({inc.events:,} events recomputed "
            f"after checkpoint event {inc.started_after_seq:,}; {inc.checkpoints:,} "
            f"checkpoints compared)"
        )
        print(f"floor (psycopg read + hashlib, full chain): {floor_s:8.3f} s ({floor_n:,} events)")
        print(
            f"full / floor = {best[True] / floor_s:.2f}; "
            f"full / incremental = {best[True] / best[False]:.0f}"
        )
        print(
            f"rerun: uv run python bench/audit_verify.py --events {args.events} "
            f"--every {args.every} --tail {args.tail} --repeat {args.repeat}"
        )
    finally:
        if not args.keep:
            with psycopg.connect(args.database_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept {url}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=1000, help="a checkpoint every N events")
    parser.add_argument("--tail", type=int, default=500, help="events after the last checkpoint")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    parser.add_argument("--database-url", default=ADMIN_URL, help="an admin URL")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    main(parser.parse_args())
