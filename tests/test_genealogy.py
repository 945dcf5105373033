"""Genealogy an auditor can take to a recall: a hand-built plant history with splits, merges,
a diamond and a three-level product structure, recorded through the real execution service
and read through the real API; the traces, the impact list, the quantities on the edges and
the exports are checked row for row. Bad data (a cycle) ends; the node limit says it cut.

The history (quantities as the machine reported them)::

    RESIN-1 (100 kg) ──30 kg──▶ PELLET P1-01 ──31 kg──▶ PART P1-02 (100 ea) ──50 ea──▶ KIT K1-01
    PIGMENT-1 ──1 kg──────────▶ ┘                                          └──50 ea──▶ KIT K2-01
    RESIN-1 ──20 kg──▶ PELLET P2-01 ──30.5 kg──▶ PART P2-02 (80 ea) ──40 ea──▶ KIT K1-01
    RESIN-2 ──10 kg──▶ ┘
    PIGMENT-1 ──0.5 kg──▶ ┘

Split: RESIN-1 into two orders, PART P1-02 into two kits. Merge: P2-01 from three lots, K1-01
from two parts. Diamond: RESIN-1 reaches K1-01 along two paths of the same length. Three
product levels: KIT ← PART ← raw material (through the PELLET intermediate).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mes import execution, genealogy
from mes.db import make_engine, make_sessionmaker
from mes.errors import NotFound
from mes.machines import JobResponseData, JobState, MaterialActualData, MeasuredValue
from mes.masterdata import load_plant, parse_plant
from mes.migrate import upgrade
from mes.models import JobOrder, MaterialLot, MaterialLotAssembly
from mes.production_orders import ProductionOrderIn, create_order
from tests.conftest import app_without_temporal, fresh_pg_database, token

UNIT = {"protocol": "opcua", "url": "opc.tcp://127.0.0.1:4840/"}
PLANT: dict[str, Any] = {
    "equipment": [
        {
            "id": "PLASTICS",
            "level": "Site",
            "children": [
                {"id": "WU-EXTRUDER", "level": "WorkUnit", "endpoint": UNIT},
                {"id": "WU-MOLDER", "level": "WorkUnit", "endpoint": UNIT},
                {"id": "WU-ASSEMBLY", "level": "WorkUnit", "endpoint": UNIT},
            ],
        }
    ],
    "materials": [
        {"id": "RESIN", "unit": "kg"},
        {"id": "PIGMENT", "unit": "kg"},
        {"id": "PELLET", "unit": "kg"},
        {"id": "PART", "unit": "ea"},
        {"id": "KIT", "unit": "ea"},
    ],
    "lots": [
        {"id": "RESIN-1", "material": "RESIN", "quantity": 100},
        {"id": "RESIN-2", "material": "RESIN", "quantity": 100},
        {"id": "PIGMENT-1", "material": "PIGMENT", "quantity": 10},
    ],
    "process_segments": [{"id": "COMPOUND"}, {"id": "MOLD"}, {"id": "ASSEMBLE"}],
    "work_masters": [
        {
            "id": "WM-COMPOUND",
            "version": "3",
            "process_segment": "COMPOUND",
            "parameters": [{"name": "BarrelTemp", "default": 210, "unit": "degC"}],
            "work_units": [{"equipment": "WU-EXTRUDER", "ideal_cycle_time_s": 1}],
        },
        {
            "id": "WM-MOLD",
            "process_segment": "MOLD",
            "parameters": [
                {"name": "Pressure", "default": 80.5, "unit": "bar"},
                {"name": "HoldTime", "default": 12, "unit": "s"},
            ],
            "work_units": [{"equipment": "WU-MOLDER", "ideal_cycle_time_s": 1}],
            "test_specifications": [
                {"id": "TS-MOLD-WEIGHT", "property": "Weight", "low": 11, "high": 13, "unit": "g"}
            ],
        },
        {
            "id": "WM-ASSEMBLE",
            "process_segment": "ASSEMBLE",
            "work_units": [{"equipment": "WU-ASSEMBLY", "ideal_cycle_time_s": 1}],
        },
    ],
    "routings": [
        {
            "id": "OD-PART",
            "product": "PART",
            "steps": [
                {
                    "id": "COMPOUND",
                    "work_master": "WM-COMPOUND",
                    "materials": [
                        {"material": "RESIN", "use": "Consumed", "quantity": 0.3},
                        {"material": "PIGMENT", "use": "Consumed", "quantity": 0.01},
                        {"material": "PELLET", "use": "Produced", "quantity": 0.31},
                    ],
                },
                {
                    "id": "MOLD",
                    "work_master": "WM-MOLD",
                    "materials": [
                        {"material": "PELLET", "use": "Consumed", "quantity": 0.31},
                        {"material": "PART", "use": "Produced", "quantity": 1},
                    ],
                },
            ],
        },
        {
            "id": "OD-KIT",
            "product": "KIT",
            "steps": [
                {
                    "id": "ASSEMBLE",
                    "work_master": "WM-ASSEMBLE",
                    "materials": [
                        {"material": "PART", "use": "Consumed", "quantity": 9},
                        {"material": "KIT", "use": "Produced", "quantity": 1},
                    ],
                },
            ],
        },
    ],
}

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)

#: (order, product, quantity, customer order, [per step: (consumed, produced, measured)])
#: consumed: [(material, lot, quantity, unit)]; produced: (material, quantity, unit).
History = list[
    tuple[
        str,
        str,
        int,
        str | None,
        list[
            tuple[
                list[tuple[str, str, float, str]],
                tuple[str, float, str],
                list[tuple[str, float, str]],
            ]
        ],
    ]
]
HISTORY: History = [
    (
        "P1",
        "PART",
        100,
        None,
        [
            (
                [("RESIN", "RESIN-1", 30, "kg"), ("PIGMENT", "PIGMENT-1", 1, "kg")],
                ("PELLET", 31, "kg"),
                [],
            ),
            ([("PELLET", "LOT-P1-01", 31, "kg")], ("PART", 100, "ea"), [("Weight", 12.1, "g")]),
        ],
    ),
    (
        "P2",
        "PART",
        80,
        None,
        [
            (
                [
                    ("RESIN", "RESIN-1", 20, "kg"),
                    ("RESIN", "RESIN-2", 10, "kg"),
                    ("PIGMENT", "PIGMENT-1", 0.5, "kg"),
                ],
                ("PELLET", 30.5, "kg"),
                [],
            ),
            ([("PELLET", "LOT-P2-01", 30.5, "kg")], ("PART", 80, "ea"), [("Weight", 12.9, "g")]),
        ],
    ),
    (
        "K1",
        "KIT",
        10,
        "CO-77",
        [
            (
                [("PART", "LOT-P1-02", 50, "ea"), ("PART", "LOT-P2-02", 40, "ea")],
                ("KIT", 10, "ea"),
                [],
            )
        ],
    ),
    ("K2", "KIT", 5, "CO-78", [([("PART", "LOT-P1-02", 50, "ea")], ("KIT", 5, "ea"), [])]),
]


def _build(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Load the plant and record the history through the execution service; returns the
    production order ids by order number."""
    with sessions() as s:
        load_plant(s, parse_plant(PLANT))
        s.commit()
    orders: dict[str, int] = {}
    clock = T0
    for number, product, quantity, customer, steps in HISTORY:
        body = ProductionOrderIn(
            order_number=number,
            product=product,
            quantity=quantity,
            unit="ea",
            due=datetime.now(UTC) + timedelta(days=1),
            priority=1,
            customer_order=customer,
        )
        with sessions() as s:
            order, _ = create_order(s, body)
            orders[number] = order.id
        with sessions() as s:
            jobs = execution.plan_order(s, orders[number])
        for job, (consumed, (material, made, unit), measured) in zip(jobs, steps, strict=True):
            response = JobResponseData(
                job_order_id=job,
                state=JobState.ENDED,
                start_time=clock,
                end_time=clock + timedelta(minutes=10),
                material_actuals=[
                    *(MaterialActualData(m, "Consumed", q, u, lot) for m, lot, q, u in consumed),
                    MaterialActualData(material, "Produced", made, unit, f"LOT-{job}"),
                ],
                data=[MeasuredValue(n, v, u) for n, v, u in measured],
                processed_count=1,
            )
            clock += timedelta(hours=1)
            with sessions() as s:
                execution.record_job_response(s, response)
        with sessions() as s:
            execution.complete_order(s, orders[number], "Completed")
    return orders


@pytest.fixture(
    scope="module", params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]
)
def history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sessionmaker[Session], dict[str, int]]]:
    """The hand-built history, once per backend, in a database of its own."""
    if request.param == "postgresql":
        urls = fresh_pg_database("mes_genealogy")
        url = next(urls)
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('genealogy') / 'g.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    orders = _build(sessions)
    yield sessions, orders
    engine.dispose()
    if request.param == "postgresql":
        next(urls, None)  # drops the database


@pytest.fixture
async def api(
    history: tuple[sessionmaker[Session], dict[str, int]],
) -> Any:
    sessions, _ = history
    async with AsyncTestClient(app=app_without_temporal(sessions)) as http:
        http.headers.update(token(sessions, "auditor"))
        yield http


def _hash(*params: tuple[str, float, str]) -> str:
    return genealogy.parameters_hash({"name": n, "value": v, "unit": u} for n, v, u in params)


COMPOUND_HASH = _hash(("BarrelTemp", 210, "degC"))
# Parameters are sent in name order (the work master's).
MOLD_HASH = _hash(("HoldTime", 12, "s"), ("Pressure", 80.5, "bar"))


def _lots(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(lot["lot"], lot["material"], lot["depth"]) for lot in body["lots"]]


def _edges(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (e["lot"], e["component"], e["quantity"], e["unit"], e["job_order"]) for e in body["edges"]
    ]


async def test_backward_trace_of_a_kit(api: Any) -> None:
    r = await api.get("/api/v1/genealogy/lots/LOT-K1-01/backward")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["truncated"], body["truncated_by"]) == (False, None)
    assert _lots(body) == [
        ("LOT-K1-01", "KIT", 0),
        ("LOT-P1-02", "PART", 1),
        ("LOT-P2-02", "PART", 1),
        ("LOT-P1-01", "PELLET", 2),
        ("LOT-P2-01", "PELLET", 2),
        ("PIGMENT-1", "PIGMENT", 3),  # the diamond's top: reached twice, listed once
        ("RESIN-1", "RESIN", 3),
        ("RESIN-2", "RESIN", 3),
    ]
    assert _edges(body) == [
        ("LOT-K1-01", "LOT-P1-02", 50.0, "ea", "K1-01"),
        ("LOT-K1-01", "LOT-P2-02", 40.0, "ea", "K1-01"),
        ("LOT-P1-01", "PIGMENT-1", 1.0, "kg", "P1-01"),
        ("LOT-P1-01", "RESIN-1", 30.0, "kg", "P1-01"),
        ("LOT-P1-02", "LOT-P1-01", 31.0, "kg", "P1-02"),
        ("LOT-P2-01", "PIGMENT-1", 0.5, "kg", "P2-01"),
        ("LOT-P2-01", "RESIN-1", 20.0, "kg", "P2-01"),
        ("LOT-P2-01", "RESIN-2", 10.0, "kg", "P2-01"),
        ("LOT-P2-02", "LOT-P2-01", 30.5, "kg", "P2-02"),
    ]
    by_lot = {lot["lot"]: lot for lot in body["lots"]}
    part = by_lot["LOT-P2-02"]
    assert {k: v for k, v in part.items() if k not in ("created_at", "production_order")} == {
        "lot": "LOT-P2-02",
        "material": "PART",
        "depth": 1,
        "quantity": 40.0,
        "unit": "ea",
        "status": "Available",
        "disposition": "Released",
        "job_order": "P2-02",
        "work_unit": "WU-MOLDER",
        "work_master": "WM-MOLD",
        "work_master_version": "1",
        "parameters_hash": MOLD_HASH,
        "started_at": "2026-03-02T09:00:00Z",
        "ended_at": "2026-03-02T09:10:00Z",
        "order_number": "P2",
        "customer_order": None,
        "test_results": [
            {
                "property": "Weight",
                "value": 12.9,
                "unit": "g",
                "passed": True,
                "tested_at": part["test_results"][0]["tested_at"],
            }
        ],
    }
    pellet = by_lot["LOT-P1-01"]
    assert (pellet["work_master"], pellet["work_master_version"]) == ("WM-COMPOUND", "3")
    assert pellet["parameters_hash"] == COMPOUND_HASH
    assert pellet["test_results"] == []
    resin = by_lot["RESIN-1"]  # stock: not made here
    assert (resin["quantity"], resin["status"], resin["job_order"]) == (50.0, "Available", None)
    assert by_lot["LOT-P1-02"]["test_results"][0]["passed"] is True


async def test_forward_trace_and_the_graph(api: Any) -> None:
    r = await api.get("/api/v1/genealogy/lots/RESIN-1/forward")
    body = r.json()
    assert _lots(body) == [
        ("RESIN-1", "RESIN", 0),
        ("LOT-P1-01", "PELLET", 1),
        ("LOT-P2-01", "PELLET", 1),
        ("LOT-P1-02", "PART", 2),
        ("LOT-P2-02", "PART", 2),
        ("LOT-K1-01", "KIT", 3),
        ("LOT-K2-01", "KIT", 3),
    ]
    assert _edges(body) == [
        ("LOT-K1-01", "LOT-P1-02", 50.0, "ea", "K1-01"),
        ("LOT-K1-01", "LOT-P2-02", 40.0, "ea", "K1-01"),
        ("LOT-K2-01", "LOT-P1-02", 50.0, "ea", "K2-01"),
        ("LOT-P1-01", "RESIN-1", 30.0, "kg", "P1-01"),
        ("LOT-P1-02", "LOT-P1-01", 31.0, "kg", "P1-02"),
        ("LOT-P2-01", "RESIN-1", 20.0, "kg", "P2-01"),
        ("LOT-P2-02", "LOT-P2-01", 30.5, "kg", "P2-02"),
    ]
    g = (await api.get("/api/v1/genealogy/lots/RESIN-1/forward?format=graph")).json()
    assert [n["lot"] for n in g["nodes"]] == [lot for lot, _, _ in _lots(body)]
    assert [
        (e["source"], e["target"], e["quantity"], e["unit"], e["job_order"]) for e in g["edges"]
    ] == [(component, lot, q, u, job) for lot, component, q, u, job in _edges(body)]
    assert (g["direction"], g["truncated"]) == ("forward", False)


async def test_impact_is_the_recall_list(
    api: Any, history: tuple[sessionmaker[Session], dict[str, int]]
) -> None:
    _, orders = history
    r = await api.get("/api/v1/genealogy/lots/RESIN-2/impact")
    assert r.status_code == 200, r.text
    body = r.json()
    rows = [
        (
            f["lot"],
            f["material"],
            f["depth"],
            f["production_order"],
            f["order_number"],
            f["customer_order"],
            f["disposition"],
            f["status"],
            f["quantity"],
            f["unit"],
            f["ended_at"],
        )
        for f in body["finished"]
    ]
    # RESIN-2 went only into P2's pellet, so into P2's parts and the kit K1-01; the pellet
    # is no order's product, so it is not on the list.
    assert rows == [
        ("LOT-P2-02", "PART", 2, orders["P2"], "P2", None, "Released", "Available", 40.0, "ea",
         "2026-03-02T09:10:00Z"),
        ("LOT-K1-01", "KIT", 3, orders["K1"], "K1", "CO-77", "Released", "Available", 10.0, "ea",
         "2026-03-02T10:10:00Z"),
    ]  # fmt: skip
    r1 = (await api.get("/api/v1/genealogy/lots/RESIN-1/impact")).json()
    assert [(f["lot"], f["quantity"], f["status"]) for f in r1["finished"]] == [
        ("LOT-P1-02", 0.0, "Consumed"),
        ("LOT-P2-02", 40.0, "Available"),
        ("LOT-K1-01", 10.0, "Available"),
        ("LOT-K2-01", 5.0, "Available"),
    ]
    text = (await api.get("/api/v1/genealogy/lots/RESIN-2/impact?format=csv")).text
    assert list(csv.reader(io.StringIO(text))) == [
        list(genealogy.IMPACT_CSV_COLUMNS),
        ["LOT-P2-02", "PART", "2", str(orders["P2"]), "P2", "", "Released", "Available", "40",
         "ea", "2026-03-02T09:10:00+00:00"],
        ["LOT-K1-01", "KIT", "3", str(orders["K1"]), "K1", "CO-77", "Released", "Available",
         "10", "ea", "2026-03-02T10:10:00+00:00"],
    ]  # fmt: skip
    # A finished lot is on its own list.
    own = (await api.get("/api/v1/genealogy/lots/LOT-K2-01/impact")).json()
    assert [f["lot"] for f in own["finished"]] == ["LOT-K2-01"]


async def test_csv_export(api: Any) -> None:
    r = await api.get("/api/v1/genealogy/lots/LOT-P2-02/backward?format=csv")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [tuple(row[c] for c in ("record", "lot", "component", "material", "depth",
                                   "quantity", "unit", "job_order", "work_master_version",
                                   "tests_passed")) for row in rows] == [
        ("lot", "LOT-P2-02", "", "PART", "0", "40", "ea", "P2-02", "1", "true"),
        ("lot", "LOT-P2-01", "", "PELLET", "1", "0", "kg", "P2-01", "3", ""),
        ("lot", "PIGMENT-1", "", "PIGMENT", "2", "8.5", "kg", "", "", ""),
        ("lot", "RESIN-1", "", "RESIN", "2", "50", "kg", "", "", ""),
        ("lot", "RESIN-2", "", "RESIN", "2", "90", "kg", "", "", ""),
        ("edge", "LOT-P2-01", "PIGMENT-1", "", "", "0.5", "kg", "P2-01", "", ""),
        ("edge", "LOT-P2-01", "RESIN-1", "", "", "20", "kg", "P2-01", "", ""),
        ("edge", "LOT-P2-01", "RESIN-2", "", "", "10", "kg", "P2-01", "", ""),
        ("edge", "LOT-P2-02", "LOT-P2-01", "", "", "30.5", "kg", "P2-02", "", ""),
    ]  # fmt: skip
    assert rows[0]["parameters_hash"] == MOLD_HASH
    assert rows[0]["started_at"] == "2026-03-02T09:00:00+00:00"
    # Accept chooses when there is no format parameter.
    negotiated = await api.get(
        "/api/v1/genealogy/lots/LOT-P2-02/backward", headers={"Accept": "text/csv"}
    )
    assert negotiated.text == r.text


def _parse_dot(source: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """A strict reader of the DOT the MES writes (Graphviz grammar: a digraph of attribute,
    node and edge statements, IDs as quoted strings with ``\\"`` escapes): returns the nodes
    and the labelled edges; anything else fails the test."""
    quoted = r'"(?:[^"\\]|\\.)*"'
    attrs = rf"\[(?:\w+=(?:{quoted}|[\w.]+)(?:, )?)+\]"
    lines = source.splitlines()
    assert re.fullmatch(rf"digraph {quoted} \{{", lines[0]), lines[0]
    assert lines[-1] == "}"
    nodes: list[str] = []
    edges: list[tuple[str, str, str]] = []
    for line in lines[1:-1]:
        if m := re.fullmatch(rf"  (?:node|edge) {attrs};|  rankdir=LR;", line):
            continue
        if m := re.fullmatch(rf"  ({quoted}) -> ({quoted}) \[label=({quoted})\];", line):
            edges.append((m[1][1:-1], m[2][1:-1], m[3][1:-1]))
        elif m := re.fullmatch(rf"  ({quoted}) {attrs};", line):
            nodes.append(m[1][1:-1])
        else:
            pytest.fail(f"not a DOT statement: {line!r}")
    return nodes, edges


async def test_dot_export_is_valid_graphviz(api: Any, tmp_path: Path) -> None:
    r = await api.get("/api/v1/genealogy/lots/LOT-P2-02/backward?format=dot")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/vnd.graphviz; charset=utf-8"
    nodes, edges = _parse_dot(r.text)
    assert nodes == ["LOT-P2-02", "LOT-P2-01", "PIGMENT-1", "RESIN-1", "RESIN-2"]
    assert edges == [
        ("PIGMENT-1", "LOT-P2-01", "0.5 kg\\nP2-01"),
        ("RESIN-1", "LOT-P2-01", "20 kg\\nP2-01"),
        ("RESIN-2", "LOT-P2-01", "10 kg\\nP2-01"),
        ("LOT-P2-01", "LOT-P2-02", "30.5 kg\\nP2-02"),
    ]
    negotiated = await api.get(
        "/api/v1/genealogy/lots/LOT-P2-02/backward", headers={"Accept": "text/vnd.graphviz"}
    )
    assert negotiated.text == r.text
    _graphviz_draws(r.text)


def _graphviz_draws(source: str) -> None:
    """Graphviz itself, where installed, reads the document and draws it."""
    dot = shutil.which("dot")
    if dot is not None:
        done = subprocess.run([dot, "-Tsvg"], input=source, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "<svg" in done.stdout


def test_dot_quotes_every_name() -> None:
    t = genealogy.Trace(
        lot='A "quoted" \\ lot',
        direction="backward",
        depth=1,
        limit=10,
        truncated=False,
        truncated_by=None,
        lots=[],
        edges=[
            genealogy.TraceEdge(
                lot='A "quoted" \\ lot', component="B", quantity=1.5, unit="kg", job_order="J"
            )
        ],
    )
    _, edges = _parse_dot(genealogy.trace_dot(t))
    assert edges == [("B", 'A \\"quoted\\" \\\\ lot', "1.5 kg\\nJ")]
    _graphviz_draws(genealogy.trace_dot(t))


async def test_depth_and_node_limit_say_they_cut(api: Any) -> None:
    shallow = (await api.get("/api/v1/genealogy/lots/RESIN-1/forward?depth=1")).json()
    assert (shallow["truncated"], shallow["truncated_by"]) == (True, "depth")
    assert _lots(shallow) == [
        ("RESIN-1", "RESIN", 0),
        ("LOT-P1-01", "PELLET", 1),
        ("LOT-P2-01", "PELLET", 1),
    ]
    exact = (await api.get("/api/v1/genealogy/lots/RESIN-1/forward?depth=3")).json()
    assert (exact["truncated"], len(exact["lots"])) == (False, 7)
    cut = (await api.get("/api/v1/genealogy/lots/RESIN-1/forward?limit=4")).json()
    assert (cut["truncated"], cut["truncated_by"], cut["limit"]) == (True, "limit", 4)
    assert _lots(cut) == [
        ("RESIN-1", "RESIN", 0),
        ("LOT-P1-01", "PELLET", 1),
        ("LOT-P2-01", "PELLET", 1),
        ("LOT-P1-02", "PART", 2),
    ]
    assert [(e[0], e[1]) for e in _edges(cut)] == [
        ("LOT-P1-01", "RESIN-1"),
        ("LOT-P1-02", "LOT-P1-01"),
        ("LOT-P2-01", "RESIN-1"),
    ]
    for bad in ("limit=0", "limit=100001", "depth=0", "depth=101", "format=png"):
        r = await api.get(f"/api/v1/genealogy/lots/RESIN-1/forward?{bad}")
        assert r.status_code == 400, (bad, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert bad.split("=")[0] in r.text
    missing = await api.get("/api/v1/genealogy/lots/NO-SUCH-LOT/impact")
    assert missing.status_code == 404


def test_a_cycle_in_bad_data_ends(history: tuple[sessionmaker[Session], dict[str, int]]) -> None:
    """Bad data: the kit K2-01 listed as a component of the pellet P1-01 (a cycle through
    P1-02). The walk ends, visits and lists each lot once, and the edges are the real ones."""
    sessions, _ = history
    with sessions() as s:
        ids = dict(s.execute(select(MaterialLot.external_id, MaterialLot.id)).all())
        any_response = s.scalars(select(JobOrder)).first()
        assert any_response is not None
        assert any_response.job_response is not None
        bad = MaterialLotAssembly(
            material_lot_id=ids["LOT-P1-01"],
            component_lot_id=ids["LOT-K2-01"],
            job_response_id=any_response.job_response.id,
        )
        s.add(bad)
        s.commit()
    try:
        with sessions() as s:
            back = genealogy.trace(s, "LOT-P1-01", "backward", depth=100)
            forward = genealogy.trace(s, "LOT-K2-01", "forward", depth=100, limit=50)
            four = genealogy.trace(s, "LOT-K2-01", "forward", depth=100, limit=4)
            three = genealogy.trace(s, "LOT-K2-01", "forward", depth=100, limit=3)
        assert [(lot.lot, lot.depth) for lot in back.lots] == [
            ("LOT-P1-01", 0),
            ("LOT-K2-01", 1),
            ("PIGMENT-1", 1),
            ("RESIN-1", 1),
            ("LOT-P1-02", 2),
        ]
        assert not back.truncated
        assert [(lot.lot, lot.depth) for lot in forward.lots] == [
            ("LOT-K2-01", 0),
            ("LOT-P1-01", 1),
            ("LOT-P1-02", 2),
            ("LOT-K1-01", 3),
        ]
        # Each lot is visited once: the walk does not go round the cycle, so neither the
        # node limit nor the depth cuts it; the edge back to the start is listed.
        assert (forward.truncated, forward.truncated_by) == (False, None)
        assert ("LOT-K2-01", "LOT-P1-02") in [(e.lot, e.component) for e in forward.edges]
        # Four lots: a limit of four is not cut, three is, keeping the nearest three.
        assert not four.truncated
        assert (three.truncated_by, [lot.lot for lot in three.lots]) == (
            "limit",
            ["LOT-K2-01", "LOT-P1-01", "LOT-P1-02"],
        )
    finally:
        with sessions() as s:
            s.delete(s.get_one(MaterialLotAssembly, bad.id))
            s.commit()


def test_recording_fills_the_edge_and_the_recipe(
    history: tuple[sessionmaker[Session], dict[str, int]],
) -> None:
    sessions, _ = history
    with sessions() as s:
        job = s.scalars(select(JobOrder).where(JobOrder.external_id == "P1-02")).one()
        assert job.parameters == [
            {"name": "HoldTime", "value": 12.0, "unit": "s"},
            {"name": "Pressure", "value": 80.5, "unit": "bar"},
        ]
        assert (job.parameters_hash, job.work_master_version) == (MOLD_HASH, "1")


@pytest.mark.parametrize("limit", [genealogy.DEFAULT_LIMIT, 4, 1])
@pytest.mark.parametrize("depth", [10, 2, 1])
def test_the_json_built_by_the_database_is_the_answer(
    history: tuple[sessionmaker[Session], dict[str, int]], depth: int, limit: int
) -> None:
    """PostgreSQL builds the JSON answers itself (``answer_json``): value for value, they are
    the answers of ``trace``, ``as_graph`` and ``impact`` (SQLite encodes those directly)."""
    sessions, _ = history
    with sessions() as s:
        for lot in ("LOT-K1-01", "LOT-P2-01", "RESIN-1", "PIGMENT-1"):
            for direction in ("backward", "forward"):
                t = genealogy.trace(s, lot, direction, depth, limit)
                expected = {
                    "trace": t,
                    "graph": genealogy.as_graph(t),
                    "impact": genealogy.impact(s, lot, depth, limit),
                }
                for shape, answer in expected.items():
                    got = genealogy.answer_json(s, lot, shape, direction, depth, limit)  # type: ignore[arg-type]
                    assert json.loads(got) == json.loads(msgspec.json.encode(answer)), (
                        lot,
                        direction,
                        shape,
                    )
        with pytest.raises(NotFound):
            genealogy.answer_json(s, "NO-SUCH-LOT", "trace", "backward")


def test_one_column_list_makes_both_answers() -> None:
    """The SQL columns of a lot, an edge and a test result are named and ordered as the
    answer's fields: the rows read in Python and the JSON PostgreSQL builds come from them."""

    def names(struct: type[msgspec.Struct]) -> tuple[str, ...]:
        return tuple(f.name for f in msgspec.structs.fields(struct) if f.name != "test_results")

    assert names(genealogy.TraceLot) == genealogy._LOT_FIELDS
    assert names(genealogy.TraceEdge) == genealogy._EDGE_FIELDS
    assert names(genealogy.TestResultOut) == genealogy._TEST_FIELDS
    assert set(genealogy._IMPACT_FIELDS) <= set(genealogy._LOT_FIELDS)
    graph_edge = names(genealogy.GraphEdge)
    assert (
        tuple(genealogy._GRAPH_EDGE.get(f, f) for f in genealogy._GRAPH_EDGE_FIELDS) == graph_edge
    )
