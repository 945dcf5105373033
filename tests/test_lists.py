"""The lists at the floor, through the real API on PostgreSQL: walking every page by its
cursor (``after=``) gives each row once, in the list's order, ties included; a cursor that is
not one is a 400 naming ``after``; the dispatch list runs in its documented order; and no list
asks the database once per row."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from mes import audit, production_orders, quality, work_orders
from mes.models import (
    Equipment,
    EquipmentLevel,
    JobOrder,
    MaterialDefinition,
    MaterialLot,
    Nonconformance,
    OperationsDefinition,
    OperationsRequest,
    OperationsSegment,
    SegmentRequirement,
    WorkMaster,
)
from mes.paging import Paging, encode_cursor
from tests.conftest import token

pytestmark = pytest.mark.postgres

BASE = datetime(2026, 3, 1, 6, tzinfo=UTC)
STATES = ["Waiting", "Ready", "Running", "Held", "Completed"]


@dataclass
class Floor:
    """A line of two work units with ``n`` single-step orders on it, dues and priorities
    chosen to tie often; a nonconformance per third job, all opened at three instants."""

    tag: str
    line: str
    product: str
    jobs: list[dict[str, Any]]
    audit_type: str


def build_floor(sessions: sessionmaker[Session], n: int = 37) -> Floor:
    tag = uuid.uuid4().hex[:8]
    with sessions() as s:
        line = Equipment(external_id=f"LINE-{tag}", equipment_level=EquipmentLevel.PRODUCTION_LINE)
        units = [
            Equipment(external_id=f"WU-{tag}-{u}", equipment_level="WorkUnit", parent=line)
            for u in range(2)
        ]
        product = MaterialDefinition(external_id=f"MAT-{tag}", unit="kg")
        wm = WorkMaster(external_id=f"WM-{tag}")
        s.add_all([line, *units, product, wm])
        s.flush()
        od = OperationsDefinition(external_id=f"OD-{tag}", material_definition_id=product.id)
        s.add(od)
        s.flush()
        seg = OperationsSegment(
            operations_definition_id=od.id,
            external_id="S1",
            sequence=1,
            work_master_id=wm.id,
        )
        s.add(seg)
        s.flush()
        jobs: list[dict[str, Any]] = []
        for i in range(n):
            due = BASE + timedelta(hours=i % 5)  # ties on due
            order = OperationsRequest(
                external_id=f"PO-{tag}-{i:03d}",
                operations_definition_id=od.id,
                material_definition_id=product.id,
                quantity=Decimal(10),
                unit="kg",
                priority=i % 3,
                due=due,
                state="Running",
                request_hash="x",
                workflow_id=f"order-PO-{tag}-{i:03d}",
            )
            s.add(order)
            s.flush()
            req = SegmentRequirement(
                operations_request_id=order.id,
                operations_segment_id=seg.id,
                sequence=1,
                quantity=Decimal(10),
                unit="kg",
                state="Running",
            )
            s.add(req)
            s.flush()
            job = JobOrder(
                external_id=f"JO-{tag}-{i:03d}",
                segment_requirement_id=req.id,
                work_master_id=wm.id,
                equipment_id=units[i % 2].id,
                priority=i % 3,  # ties on priority
                state=STATES[i % len(STATES)],
                dispatched_at=BASE + timedelta(minutes=i % 4) if i % 2 else None,
            )
            s.add(job)
            s.flush()
            jobs.append(
                {
                    "id": job.id,
                    "external_id": job.external_id,
                    "priority": job.priority,
                    "due": due,
                    "state": job.state,
                    "dispatched_at": job.dispatched_at,
                }
            )
            if i % 3 == 0:
                lot = MaterialLot(
                    external_id=f"L-{tag}-{i:03d}",
                    material_definition_id=product.id,
                    quantity=Decimal(10),
                    unit="kg",
                    job_order_id=job.id,
                )
                s.add(lot)
                s.flush()
                s.add(
                    Nonconformance(
                        external_id=f"NC-{tag}-{i:03d}",
                        state="Open" if i % 2 else "Closed",
                        material_lot_id=lot.id,
                        job_order_id=job.id,
                        reason="out of specification",
                        opened_by="test",
                        opened_at=BASE + timedelta(minutes=i // 3 % 4),  # ties on it
                    )
                )
        audit_type = f"lists-{tag}"
        for i in range(11):
            audit.record(s, action="test", object_type=audit_type, object_id=str(i))
        s.commit()
    return Floor(tag, f"LINE-{tag}", f"MAT-{tag}", jobs, audit_type)


@pytest.fixture(scope="module")
def floor(pg_sessions: sessionmaker[Session]) -> Floor:
    return build_floor(pg_sessions)


@pytest.fixture
def api(api: AsyncTestClient[Any], pg_sessions: sessionmaker[Session]) -> AsyncTestClient[Any]:
    """The in-process API (conftest's), as an auditor."""
    api.headers.update(token(pg_sessions, "auditor", "lists"))
    return api


async def walk(api: AsyncTestClient[Any], path: str, **query: Any) -> list[dict[str, Any]]:
    """Every item of a paged list, page by page along ``next_after``."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(1000):
        params = {**query, **({"after": after} if after else {})}
        r = await api.get(path, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= query["limit"]
        items.extend(page["items"])
        after = page["next_after"]
        if after is None:
            return items
    raise AssertionError("the walk did not end")


@pytest.mark.parametrize("sort", ["due", "priority"])
async def test_walking_work_orders_by_cursor_gives_each_once_in_order(
    api: AsyncTestClient[Any], floor: Floor, sort: str
) -> None:
    walked = await walk(api, "/api/v1/work-orders", work_center=floor.line, sort=sort, limit=4)
    if sort == "due":
        expected = sorted(floor.jobs, key=lambda j: (j["due"], -j["priority"], j["id"]))
    else:
        expected = sorted(floor.jobs, key=lambda j: (-j["priority"], j["due"], j["id"]))
    assert [w["id"] for w in walked] == [j["external_id"] for j in expected]
    # The same as one page by offset, and the count agrees.
    r = await api.get(
        "/api/v1/work-orders", params={"work_center": floor.line, "sort": sort, "limit": 1000}
    )
    whole = r.json()
    assert [w["id"] for w in whole["items"]] == [w["id"] for w in walked]
    assert whole["total"] == len(floor.jobs)
    assert whole["next_after"] is None


async def test_cursor_with_filters_and_offset_after_it(
    api: AsyncTestClient[Any], floor: Floor
) -> None:
    query = {"work_center": floor.line, "sort": "due", "state": "Waiting"}
    waiting = sorted(
        (j for j in floor.jobs if j["state"] == "Waiting"),
        key=lambda j: (j["due"], -j["priority"], j["id"]),
    )
    first = (await api.get("/api/v1/work-orders", params={**query, "limit": 2})).json()
    assert [w["id"] for w in first["items"]] == [j["external_id"] for j in waiting[:2]]
    assert first["total"] == len(waiting)
    # offset counts from the cursor
    r = await api.get(
        "/api/v1/work-orders",
        params={**query, "limit": 2, "offset": 1, "after": first["next_after"]},
    )
    assert [w["id"] for w in r.json()["items"]] == [j["external_id"] for j in waiting[3:5]]


async def test_walking_nonconformances_and_audit_events(
    api: AsyncTestClient[Any], floor: Floor
) -> None:
    ncs = await walk(api, "/api/v1/quality/nonconformances", product=floor.product, limit=3)
    # Newest first; of those opened at the same instant, the one stored last first.
    stored = sorted(range(0, len(floor.jobs), 3), key=lambda i: (i // 3 % 4, i), reverse=True)
    assert [n["id"] for n in ncs] == [f"NC-{floor.tag}-{i:03d}" for i in stored]
    whole = await api.get(
        "/api/v1/quality/nonconformances", params={"product": floor.product, "limit": 1000}
    )
    assert [n["id"] for n in whole.json()["items"]] == [n["id"] for n in ncs]

    events = await walk(api, "/api/v1/audit-events", object_type=floor.audit_type, limit=2)
    assert [e["object_id"] for e in events] == [str(i) for i in range(11)]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 11


async def test_walking_production_orders_along_the_link_header(
    api: AsyncTestClient[Any], floor: Floor
) -> None:
    seen: list[int] = []
    url: str | None = "/api/v1/production-orders?state=Running&limit=5"
    while url is not None:
        r = await api.get(url)
        assert r.status_code == 200, r.text
        seen.extend(o["id"] for o in r.json())
        link = r.headers.get("link")
        url = link[1 : link.index(">")] if link else None
        if url is not None:
            assert "state=Running" in url
            assert 'rel="next"' in link
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) == len(seen)
    whole = await api.get("/api/v1/production-orders", params={"state": "Running", "limit": 1000})
    assert [o["id"] for o in whole.json()] == seen
    mine = {f"PO-{floor.tag}-{i:03d}" for i in range(len(floor.jobs))}
    assert mine <= {o["order_number"] for o in whole.json()}


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/api/v1/work-orders", "zz"),  # not base64 of anything
        ("/api/v1/work-orders", "bm90IGpzb24"),  # base64 of "not json"
        ("/api/v1/work-orders", encode_cursor("work-orders:priority", [1, BASE, 3])),  # other sort
        ("/api/v1/work-orders", encode_cursor("work-orders:due", ["soon", 1, 3])),  # types
        ("/api/v1/work-orders", encode_cursor("work-orders:due", [BASE, 1])),  # too short
        ("/api/v1/audit-events", encode_cursor("audit-events", [2**70])),  # past bigint
        ("/api/v1/audit-events", encode_cursor("audit-events", [True])),
        ("/api/v1/quality/nonconformances", encode_cursor("audit-events", [1])),  # other list
        ("/api/v1/quality/nonconformances", "W10"),  # []
        ("/api/v1/production-orders", "e30"),  # {}
        ("/api/v1/production-orders", "a" * 401),  # too long
        ("/api/v1/production-orders", "a+b/c="),  # not base64url
        ("/api/v1/production-orders", ""),
    ],
)
async def test_a_bad_cursor_is_a_4xx_naming_after(
    api: AsyncTestClient[Any], path: str, cursor: str
) -> None:
    """Not base64url, or too long: 400; base64url but no cursor of this list: 422."""
    query = {"after": cursor, **({"sort": "due"} if "work" in path else {})}
    r = await api.get(path, params=query)
    malformed = len(cursor) > 400 or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    assert r.status_code == (400 if malformed else 422), r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "after" in [e["field"] for e in r.json()["errors"]], r.json()


async def test_dispatch_list_runs_in_its_order(api: AsyncTestClient[Any], floor: Floor) -> None:
    r = await api.get(f"/api/v1/work-centers/{floor.line}/dispatch-list")
    assert r.status_code == 200, r.text
    rank = {"Running": 0, "Ready": 1, "Waiting": 2, "Held": 3}
    far_past = datetime(1970, 1, 1, tzinfo=UTC)
    expected = sorted(
        (j for j in floor.jobs if j["state"] in rank),
        key=lambda j: (rank[j["state"]], -j["priority"], j["dispatched_at"] or far_past, j["id"]),
    )
    assert [w["id"] for w in r.json()] == [j["external_id"] for j in expected]


class Statements:
    """Counts the statements a session's engine runs."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.engine = sessions.kw["bind"]
        self.count = 0

    def _seen(self, *_args: object) -> None:
        self.count += 1

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


Counter = Callable[[Callable[[Session], object]], int]


@pytest.fixture
def count(pg_sessions: sessionmaker[Session]) -> Counter:
    def run(call: Callable[[Session], object]) -> int:
        with pg_sessions() as s, Statements(pg_sessions) as seen:
            call(s)
        return seen.count

    return run


def test_no_list_asks_once_per_row(
    count: Counter, floor: Floor, pg_sessions: sessionmaker[Session]
) -> None:
    """The same number of statements for a page of 2 rows as for one of 30, and for the
    dispatch list of a line with 3 jobs as for one with 37."""

    def work(n: int) -> Callable[[Session], object]:
        return lambda s: work_orders.list_work_orders(
            s, work_center=floor.line, sort="due", paging=Paging(limit=n)
        )

    def orders(n: int) -> Callable[[Session], object]:
        # with what the route reads of each order
        return lambda s: [
            o.product.external_id
            for o in production_orders.list_orders(s, paging=Paging(limit=n))[0]
        ]

    def nonconformances(n: int) -> Callable[[Session], object]:
        return lambda s: quality.list_nonconformances(
            s, product=floor.product, paging=Paging(limit=n)
        )

    for make in (work, orders, nonconformances):
        assert count(make(2)) == count(make(30)), make.__name__
    little = build_floor(pg_sessions, n=3)
    few = count(lambda s: work_orders.dispatch_list(s, little.line))
    assert few == count(lambda s: work_orders.dispatch_list(s, floor.line))
