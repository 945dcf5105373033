"""Lot genealogy: where a lot came from (backward), where it went (forward), and which
finished lots a suspect lot reached (impact: the recall list).

The edges are ``material_lot_assembly`` rows (a component lot went into a lot within one job
response, with the quantity the job consumed of it). A trace is **one SQL statement, one
round trip** (``TRACE_SQL``): a recursive walk over the edges, then every reached lot with
how it was made (job order, work unit, work master and version, the hash of the parameters
sent to the machine, times, production order), the edges between them and the lots' test
results, as rows of three kinds. The service only turns those rows into the answer.

The walk is bounded and cannot run away:

- ``UNION`` (not ``UNION ALL``) over (lot, distance): a lot reached along several paths of
  one length (a diamond) is visited once, not once per path. A lot reached at several
  distances (paths of different lengths, or a cycle in bad data) is visited once per
  distance, so at most ``depth`` times: the walk always ends, and never explodes.
- ``depth`` bounds the distance; ``limit`` bounds the visits: the walk stops (on PostgreSQL
  and SQLite alike) once ``limit + 1`` visits are made, and the answer keeps the ``limit``
  nearest lots.
- The answer says when a bound cut it: ``truncated`` with ``truncated_by`` ``"limit"`` (the
  node limit stopped the walk) or ``"depth"`` (a lot at the last distance has further edges).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from sqlalchemy import Boolean, Float, Integer, String, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TextualSelect

from mes.errors import NotFound
from mes.models import MaterialLot, UTCDateTime
from mes.quantities import Quantity, json_number

Direction = Literal["backward", "forward"]
Bound = Literal["depth", "limit"]

#: Largest ``depth`` and ``limit`` a caller may ask for, and the default node limit.
MAX_DEPTH = 100
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000


def parameters_hash(parameters: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of recipe parameters as sent to the machine: the JSON list of
    ``{"name", "value" (a number), "unit"}`` in the order sent, keys sorted, no spaces.

    ``job_order.parameters`` holds them as sent (fixed at the first dispatch), so anyone can
    recompute the hash a produced lot shows.
    """
    sent = [{"name": p["name"], "value": float(p["value"]), "unit": p["unit"]} for p in parameters]
    return hashlib.sha256(
        json.dumps(sent, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


# --- the answer -----------------------------------------------------------------------------


class TestResultOut(msgspec.Struct, kw_only=True):
    """A test result of a produced lot."""

    __test__ = False  # not a pytest class, despite the name

    property: str
    value: float
    unit: str
    passed: bool
    tested_at: datetime


class TraceLot(msgspec.Struct, kw_only=True):
    """A lot of a trace; the fields from ``job_order`` on are null for a lot not made here
    (stock from a supplier)."""

    lot: str
    material: str
    depth: int = msgspec.field(default=0)
    quantity: float
    unit: str
    status: str
    disposition: str
    created_at: datetime
    job_order: str | None = None
    work_unit: str | None = None
    work_master: str | None = None
    work_master_version: str | None = None
    parameters_hash: str | None = None
    made_quantity: float | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    production_order: int | None = None
    order_number: str | None = None
    customer_order: str | None = None
    test_results: list[TestResultOut] = msgspec.field(default_factory=list)


class TraceEdge(msgspec.Struct, kw_only=True):
    """``component`` went into ``lot``: ``quantity`` ``unit`` of it, consumed by ``job_order``."""

    lot: str
    component: str
    quantity: float | None
    unit: str | None
    job_order: str


class Trace(msgspec.Struct, kw_only=True):
    """A genealogy trace: the lots reached and the edges between them."""

    lot: str
    direction: Direction
    depth: int
    limit: int
    truncated: bool
    truncated_by: Bound | None
    lots: list[TraceLot]
    edges: list[TraceEdge]


class GraphEdge(msgspec.Struct, kw_only=True):
    """Material flow: ``source`` (a component lot) went into ``target`` (the lot made)."""

    source: str
    target: str
    quantity: float | None
    unit: str | None
    job_order: str


class Graph(msgspec.Struct, kw_only=True):
    """A trace as a directed graph: nodes (lots) and edges in the direction material flows."""

    lot: str
    direction: Direction
    depth: int
    limit: int
    truncated: bool
    truncated_by: Bound | None
    nodes: list[TraceLot]
    edges: list[GraphEdge]


class ImpactLot(msgspec.Struct, kw_only=True):
    """A finished lot downstream of the suspect lot: one line of the recall list."""

    lot: str
    material: str
    depth: int
    production_order: int
    order_number: str
    customer_order: str | None
    disposition: str
    status: str
    quantity: float
    unit: str
    ended_at: datetime | None


class Impact(msgspec.Struct, kw_only=True):
    """The recall list of a suspect lot: every finished lot it went into, at any depth.

    A finished lot is one made by a production order whose product is the lot's material
    (what the order delivers), whether or not it was used further since.
    """

    lot: str
    depth: int
    limit: int
    truncated: bool
    truncated_by: Bound | None
    finished: list[ImpactLot]


# --- the query ------------------------------------------------------------------------------

#: The whole trace in one statement: ``{near}``/``{far}`` are the assembly's columns
#: (backward: from a lot to its components; forward: the other way). Rows of kind ``lot``,
#: ``edge`` and ``test``; ``visits`` (on lot rows) counts the walk's visits, at most ``:cap``.
TRACE_SQL = """
WITH RECURSIVE walk(lot_id, depth) AS (
    SELECT CAST(:root AS INTEGER), 0
    UNION
    SELECT a.{far}, w.depth + 1
    FROM walk w JOIN material_lot_assembly a ON a.{near} = w.lot_id
    WHERE w.depth < :depth
),
visit AS (SELECT lot_id, depth FROM walk LIMIT :cap),
reached AS (SELECT lot_id, MIN(depth) AS depth FROM visit GROUP BY lot_id)
SELECT 'lot' AS kind, r.lot_id AS lot_pk, NULL AS other_pk, r.depth,
    (SELECT COUNT(*) FROM visit) AS visits,
    CASE WHEN r.depth = :depth THEN EXISTS (
        SELECT 1 FROM material_lot_assembly x WHERE x.{near} = r.lot_id
    ) ELSE FALSE END AS more,
    l.external_id AS lot, m.external_id AS material, l.quantity, l.unit, l.status,
    l.disposition, l.created_at,
    jo.external_id AS job_order, eq.external_id AS work_unit, wm.external_id AS work_master,
    jo.work_master_version, jo.parameters_hash, ma.quantity AS made_quantity,
    jr.start_time, jr.end_time,
    o.id AS order_pk, o.external_id AS order_number, o.customer_order,
    o.material_definition_id = l.material_definition_id AS finished,
    CAST(NULL AS VARCHAR(100)) AS test, CAST(NULL AS FLOAT) AS test_value,
    CAST(NULL AS BOOLEAN) AS test_passed, CAST(NULL AS TIMESTAMP WITH TIME ZONE) AS tested_at
FROM reached r
JOIN material_lot l ON l.id = r.lot_id
JOIN material_definition m ON m.id = l.material_definition_id
LEFT JOIN material_actual ma ON ma.id = (
    SELECT MIN(p.id) FROM material_actual p
    WHERE p.material_lot_id = r.lot_id AND p.use = 'Produced'
)
LEFT JOIN job_response jr ON jr.id = ma.job_response_id
LEFT JOIN job_order jo ON jo.id = jr.job_order_id
LEFT JOIN equipment eq ON eq.id = jo.equipment_id
LEFT JOIN work_master wm ON wm.id = jo.work_master_id
LEFT JOIN segment_requirement sr ON sr.id = jo.segment_requirement_id
LEFT JOIN operations_request o ON o.id = sr.operations_request_id
UNION ALL
SELECT 'edge', a.material_lot_id, a.component_lot_id, NULL, NULL, NULL,
    NULL, NULL, a.quantity, a.unit, NULL, NULL, NULL,
    jo.external_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL
FROM material_lot_assembly a
JOIN reached n ON n.lot_id = a.{near} AND n.depth < :depth
JOIN reached f ON f.lot_id = a.{far}
JOIN job_response jr ON jr.id = a.job_response_id
JOIN job_order jo ON jo.id = jr.job_order_id
UNION ALL
SELECT 'test', t.material_lot_id, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, t.unit, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    s.property_name, t.value, t.passed, t.tested_at
FROM reached r
JOIN test_result t ON t.material_lot_id = r.lot_id
JOIN test_specification s ON s.id = t.test_specification_id
"""

_COLUMNS = {"backward": ("material_lot_id", "component_lot_id")}
_COLUMNS["forward"] = ("component_lot_id", "material_lot_id")


def trace_sql(direction: Direction) -> str:
    """The trace statement for one direction (parameters ``:root``, ``:depth``, ``:cap``)."""
    near, far = _COLUMNS[direction]
    return TRACE_SQL.format(near=near, far=far)


def _typed(direction: Direction) -> TextualSelect:
    # Types for what the drivers do not hand back as Python values (SQLite: times, decimals,
    # booleans).
    return text(trace_sql(direction)).columns(
        kind=String(),
        lot_pk=Integer(),
        other_pk=Integer(),
        depth=Integer(),
        visits=Integer(),
        more=Boolean(),
        lot=String(),
        material=String(),
        quantity=Quantity,
        unit=String(),
        status=String(),
        disposition=String(),
        created_at=UTCDateTime(),
        job_order=String(),
        work_unit=String(),
        work_master=String(),
        work_master_version=String(),
        parameters_hash=String(),
        made_quantity=Quantity,
        start_time=UTCDateTime(),
        end_time=UTCDateTime(),
        order_pk=Integer(),
        order_number=String(),
        customer_order=String(),
        finished=Boolean(),
        test=String(),
        test_value=Float(),
        test_passed=Boolean(),
        tested_at=UTCDateTime(),
    )


_STATEMENTS: dict[Direction, TextualSelect] = {d: _typed(d) for d in ("backward", "forward")}


def _number(value: Decimal | None) -> float | None:
    return None if value is None else json_number(value)


class _Walk(msgspec.Struct):
    lots: list[TraceLot]
    edges: list[TraceEdge]
    finished: list[ImpactLot]
    truncated_by: Bound | None


def _walk(session: Session, lot_id: str, direction: Direction, depth: int, limit: int) -> _Walk:
    root = session.scalar(select(MaterialLot.id).where(MaterialLot.external_id == lot_id))
    if root is None:
        raise NotFound("lot", lot_id)
    rows = session.execute(
        _STATEMENTS[direction], {"root": root, "depth": depth, "cap": limit + 1}
    ).all()
    lots: dict[int, TraceLot] = {}
    finished: dict[int, ImpactLot] = {}
    edge_rows = []
    test_rows = []
    visits = 0
    more = False
    for r in rows:
        if r.kind == "lot":
            visits = r.visits
            more = more or bool(r.more)
            lots[r.lot_pk] = TraceLot(
                lot=r.lot,
                material=r.material,
                depth=r.depth,
                quantity=json_number(r.quantity),
                unit=r.unit,
                status=r.status,
                disposition=r.disposition,
                created_at=r.created_at,
                job_order=r.job_order,
                work_unit=r.work_unit,
                work_master=r.work_master,
                work_master_version=r.work_master_version,
                parameters_hash=r.parameters_hash,
                made_quantity=_number(r.made_quantity),
                started_at=r.start_time,
                ended_at=r.end_time,
                production_order=r.order_pk,
                order_number=r.order_number,
                customer_order=r.customer_order,
            )
            if r.finished:
                finished[r.lot_pk] = ImpactLot(
                    lot=r.lot,
                    material=r.material,
                    depth=r.depth,
                    production_order=r.order_pk,
                    order_number=r.order_number,
                    customer_order=r.customer_order,
                    disposition=r.disposition,
                    status=r.status,
                    quantity=json_number(r.quantity),
                    unit=r.unit,
                    ended_at=r.end_time,
                )
        elif r.kind == "edge":
            edge_rows.append(r)
        else:
            test_rows.append(r)
    truncated_by: Bound | None = None
    if visits > limit:
        # The walk stopped at limit + 1 visits: keep the nearest ``limit`` lots.
        truncated_by = "limit"
        keep = sorted(lots, key=lambda pk: (lots[pk].depth, lots[pk].lot))[:limit]
        lots = {pk: lots[pk] for pk in keep}
    elif more:
        truncated_by = "depth"
    for r in test_rows:
        if r.lot_pk in lots:
            lots[r.lot_pk].test_results.append(
                TestResultOut(
                    property=r.test,
                    value=r.test_value,
                    unit=r.unit,
                    passed=bool(r.test_passed),
                    tested_at=r.tested_at,
                )
            )
    edges = [
        TraceEdge(
            lot=lots[r.lot_pk].lot,
            component=lots[r.other_pk].lot,
            quantity=_number(r.quantity),
            unit=r.unit,
            job_order=r.job_order,
        )
        for r in edge_rows
        if r.lot_pk in lots and r.other_pk in lots
    ]
    for lot in lots.values():
        lot.test_results.sort(key=lambda t: (t.property, t.tested_at))
    return _Walk(
        lots=sorted(lots.values(), key=lambda lot: (lot.depth, lot.lot)),
        edges=sorted(edges, key=lambda e: (e.lot, e.component)),
        finished=sorted(
            (f for pk, f in finished.items() if pk in lots), key=lambda f: (f.depth, f.lot)
        ),
        truncated_by=truncated_by,
    )


def trace(
    session: Session,
    lot_id: str,
    direction: Direction,
    depth: int = 10,
    limit: int = DEFAULT_LIMIT,
) -> Trace:
    """Follow the genealogy of ``lot_id`` up to ``depth`` steps and ``limit`` lots."""
    w = _walk(session, lot_id, direction, depth, limit)
    return Trace(
        lot=lot_id,
        direction=direction,
        depth=depth,
        limit=limit,
        truncated=w.truncated_by is not None,
        truncated_by=w.truncated_by,
        lots=w.lots,
        edges=w.edges,
    )


def as_graph(t: Trace) -> Graph:
    """A trace as nodes and edges, edges pointing the way material flowed."""
    return Graph(
        lot=t.lot,
        direction=t.direction,
        depth=t.depth,
        limit=t.limit,
        truncated=t.truncated,
        truncated_by=t.truncated_by,
        nodes=t.lots,
        edges=[
            GraphEdge(
                source=e.component,
                target=e.lot,
                quantity=e.quantity,
                unit=e.unit,
                job_order=e.job_order,
            )
            for e in t.edges
        ],
    )


def impact(
    session: Session, lot_id: str, depth: int = MAX_DEPTH, limit: int = DEFAULT_LIMIT
) -> Impact:
    """The recall list of ``lot_id``: the finished lots of its forward trace (itself
    included when it is one), nearest first."""
    w = _walk(session, lot_id, "forward", depth, limit)
    return Impact(
        lot=lot_id,
        depth=depth,
        limit=limit,
        truncated=w.truncated_by is not None,
        truncated_by=w.truncated_by,
        finished=w.finished,
    )


# --- exports --------------------------------------------------------------------------------

#: Columns of a trace as CSV: one row per lot (``record`` lot), then one per edge (``edge``).
CSV_COLUMNS = (
    "record",
    "lot",
    "component",
    "material",
    "depth",
    "quantity",
    "unit",
    "status",
    "disposition",
    "job_order",
    "work_unit",
    "work_master",
    "work_master_version",
    "parameters_hash",
    "made_quantity",
    "started_at",
    "ended_at",
    "production_order",
    "order_number",
    "customer_order",
    "tests_passed",
)

IMPACT_CSV_COLUMNS = (
    "lot",
    "material",
    "depth",
    "production_order",
    "order_number",
    "customer_order",
    "disposition",
    "status",
    "quantity",
    "unit",
    "ended_at",
)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return format(Decimal(repr(value)).normalize(), "f")
    return str(value)


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return out.getvalue()


def trace_csv(t: Trace) -> str:
    """A trace as CSV (RFC 4180): lots first, then edges, in the answer's order.

    ``tests_passed`` is empty for a lot without test results, else whether all passed.
    """
    lot_rows: list[Sequence[object]] = [
        (
            "lot",
            lot.lot,
            None,
            lot.material,
            lot.depth,
            lot.quantity,
            lot.unit,
            lot.status,
            lot.disposition,
            lot.job_order,
            lot.work_unit,
            lot.work_master,
            lot.work_master_version,
            lot.parameters_hash,
            lot.made_quantity,
            lot.started_at,
            lot.ended_at,
            lot.production_order,
            lot.order_number,
            lot.customer_order,
            all(r.passed for r in lot.test_results) if lot.test_results else None,
        )
        for lot in t.lots
    ]
    blank = (None,) * (len(CSV_COLUMNS) - 10)
    edge_rows: list[Sequence[object]] = [
        (
            "edge",
            e.lot,
            e.component,
            None,
            None,
            e.quantity,
            e.unit,
            None,
            None,
            e.job_order,
            *blank,
        )
        for e in t.edges
    ]
    return _csv(CSV_COLUMNS, lot_rows + edge_rows)


def impact_csv(i: Impact) -> str:
    """The recall list as CSV (RFC 4180), one row per finished lot."""
    return _csv(
        IMPACT_CSV_COLUMNS,
        ([getattr(f, c) for c in IMPACT_CSV_COLUMNS] for f in i.finished),
    )


def _dot_id(*lines: str) -> str:
    """A DOT quoted string of ``lines`` (joined by Graphviz's ``\\n`` line break): a
    backslash and a double quote are escaped, so no value can end the string early."""
    escaped = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def _quantity(value: float | None, unit: str | None) -> str:
    return "" if value is None else f"{_cell(value)} {unit or ''}".strip()


def trace_dot(t: Trace) -> str:
    """A trace as a Graphviz DOT digraph: a box per lot, an arrow per edge the way material
    flowed, labelled with the quantity and job order; the traced lot is bold."""
    lines = [
        f"digraph {_dot_id('genealogy ' + t.direction + ' ' + t.lot)} {{",
        "  rankdir=LR;",
        '  node [shape=box, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for lot in t.lots:
        label = _dot_id(
            *(
                part
                for part in (
                    lot.lot,
                    f"{lot.material} {_quantity(lot.quantity, lot.unit)}",
                    lot.disposition,
                    lot.job_order and f"{lot.job_order} @ {lot.work_unit}",
                )
                if part
            )
        )
        style = ", style=bold" if lot.lot == t.lot else ""
        lines.append(f"  {_dot_id(lot.lot)} [label={label}{style}];")
    for e in t.edges:
        label = _dot_id(*(p for p in (_quantity(e.quantity, e.unit), e.job_order) if p))
        lines.append(f"  {_dot_id(e.component)} -> {_dot_id(e.lot)} [label={label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
