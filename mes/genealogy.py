"""Lot genealogy: where a lot came from (backward), where it went (forward), and which
finished lots a suspect lot reached (impact: the recall list).

The edges are ``material_lot_assembly`` rows (a component lot went into a lot within one job
response, with the quantity the job consumed of it). A trace is **one SQL statement, one
round trip** (``_TRACE_SQL``): a recursive walk over the edges, then every reached lot with
how it was made (job order, work unit, work master and version, the hash of the parameters
sent to the machine, times, production order), the edges between them and the lots' test
results. Its last SELECT gives either rows of three kinds, which the service turns into
the answer (``trace_sql``: CSV, DOT, SQLite), or, for the JSON answers on PostgreSQL, the
answer itself (``trace_json_sql``, ``answer_json``), whose bytes the API sends as they are.
Both are made from one list of columns per lot, edge and test result (``_LOT_COLUMNS``,
``_EDGE_COLUMNS``, ``_TEST_COLUMNS``), named as the answer's fields.

The walk is bounded and cannot run away:

- Each lot is visited once, at its shortest distance: the walk goes breadth first, one
  distance at a time, and carries the set of lots already reached, so a lot reached along
  several paths (a diamond), at several distances, or round a cycle in bad data is not
  walked again. The walk always ends, and never explodes.
- ``depth`` bounds the distance; ``limit`` the lots: the walk stops (on PostgreSQL and
  SQLite alike) once ``limit + 1`` lots are found, and the answer keeps the ``limit``
  nearest (by distance, then name).
- The answer says when a bound cut it: ``truncated`` with ``truncated_by`` ``"limit"`` (the
  node limit stopped the walk) or ``"depth"`` (a lot at the last distance has further edges).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, overload

import msgspec
from msgspec import Meta
from sqlalchemy.orm import Session

from mes.errors import NotFound

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
    depth: Annotated[int, Meta(description="Steps from the traced lot (0: the lot itself)")]
    quantity: Annotated[float, Meta(description="Quantity on hand now")]
    unit: str
    status: Annotated[str, Meta(description="Available, or Consumed once used up")]
    disposition: Annotated[str, Meta(description="Released, Restricted or Rejected")]
    created_at: datetime
    job_order: Annotated[str | None, Meta(description="The job order that made it")] = None
    work_unit: str | None = None
    work_master: str | None = None
    work_master_version: str | None = None
    parameters_hash: Annotated[
        str | None,
        Meta(
            description="SHA-256 (hex) of the recipe parameters sent to the machine: the JSON "
            'list of {"name", "value", "unit"} as sent, keys sorted, no spaces'
        ),
    ] = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    production_order: Annotated[
        int | None, Meta(description="The production order (id) the job order belongs to")
    ] = None
    order_number: Annotated[str | None, Meta(description="The ERP's order number")] = None
    customer_order: str | None = None
    test_results: list[TestResultOut] = msgspec.field(default_factory=list)


class TraceEdge(msgspec.Struct, kw_only=True):
    """``component`` went into ``lot``: ``quantity`` ``unit`` of it, consumed by
    ``job_order`` (the one that made ``lot``)."""

    lot: str
    component: str
    quantity: float | None
    unit: str | None
    job_order: str | None


class Trace(msgspec.Struct, kw_only=True):
    """A genealogy trace: the lots reached and the edges between them."""

    lot: str
    direction: Direction
    depth: int
    limit: int
    truncated: Annotated[bool, Meta(description="A bound cut the walk short")]
    truncated_by: Annotated[
        Bound | None,
        Meta(description="limit: the node limit stopped the walk; depth: lots lie beyond it"),
    ]
    lots: list[TraceLot]
    edges: list[TraceEdge]


class GraphEdge(msgspec.Struct, kw_only=True):
    """Material flow: ``source`` (a component lot) went into ``target`` (the lot made)."""

    source: str
    target: str
    quantity: float | None
    unit: str | None
    job_order: str | None


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

#: The walk, per dialect: breadth first, one row per distance holding the lots first reached
#: at it (``frontier``) and every lot reached nearer (``seen``), so each lot is visited once,
#: at its shortest distance, however many paths of whatever lengths reach it (a diamond, a
#: lot used at several levels, a cycle in bad data). ``{near}``/``{far}`` are the assembly's
#: columns (backward: from a lot to its components; forward: the other way). The walk goes
#: on while fewer than ``:cap`` lots are found; ``visit`` lists at most ``:cap`` of them,
#: nearest first. PostgreSQL holds the sets as arrays, SQLite as JSON arrays.
_WALK = {
    "postgresql": """
WITH RECURSIVE walk(depth, frontier, seen) AS (
    SELECT 0, ARRAY[id], CAST(ARRAY[] AS INTEGER[]) FROM material_lot WHERE external_id = :lot
    UNION ALL
    SELECT w.depth + 1, n.ids, w.seen || w.frontier
    FROM walk w, LATERAL (
        SELECT array_agg(f) AS ids FROM (
            SELECT a.{far} AS f FROM material_lot_assembly a WHERE a.{near} = ANY(w.frontier)
            EXCEPT SELECT unnest(w.seen || w.frontier)
        ) s
    ) n
    WHERE w.depth < :depth AND cardinality(w.seen) + cardinality(w.frontier) < :cap
),
visit AS (
    SELECT v.lot_id, w.depth FROM walk w, unnest(w.frontier) AS v(lot_id)
    ORDER BY w.depth LIMIT :cap
)""",
    "sqlite": """
WITH RECURSIVE walk(depth, frontier, seen) AS (
    SELECT 0, json_array(id), json_array() FROM material_lot WHERE external_id = :lot
    UNION ALL
    SELECT w.depth + 1, (
        SELECT json_group_array(f) FROM (
            SELECT a.{far} AS f FROM material_lot_assembly a
            WHERE a.{near} IN (SELECT value FROM json_each(w.frontier))
            EXCEPT SELECT value FROM json_each(w.frontier)
            EXCEPT SELECT value FROM json_each(w.seen)
        )
    ), (
        SELECT json_group_array(value) FROM (
            SELECT value FROM json_each(w.seen) UNION ALL SELECT value FROM json_each(w.frontier)
        )
    )
    FROM walk w
    WHERE w.depth < :depth AND json_array_length(w.frontier) > 0
        AND json_array_length(w.seen) + json_array_length(w.frontier) < :cap
),
visit AS (
    SELECT CAST(v.value AS INTEGER) AS lot_id, w.depth FROM walk w, json_each(w.frontier) v
    ORDER BY w.depth LIMIT :cap
)""",
}

#: A lot of the answer: the columns of ``TraceLot`` (its test results aside), in its order,
#: with the SQL that gives each. The one list both answers are made from: the ``lots`` of
#: ``_TRACE_SQL``, the JSON built in PostgreSQL, and the rows read in Python.
_LOT_COLUMNS = (
    ("lot", "k.lot"),
    ("material", "m.external_id"),
    ("depth", "k.depth"),
    ("quantity", "CAST(k.quantity AS FLOAT)"),
    ("unit", "k.unit"),
    ("status", "k.status"),
    ("disposition", "k.disposition"),
    ("created_at", "k.created_at"),
    ("job_order", "jo.external_id"),
    ("work_unit", "eq.external_id"),
    ("work_master", "wm.external_id"),
    ("work_master_version", "jo.work_master_version"),
    ("parameters_hash", "jo.parameters_hash"),
    ("started_at", "jo.started_at"),
    ("ended_at", "jo.ended_at"),
    ("production_order", "o.id"),
    ("order_number", "o.external_id"),
    ("customer_order", "o.customer_order"),
)
#: ``TraceEdge``'s columns, from an assembly row ``e``, its made lot ``n`` (in ``lots``) and
#: its component ``c``.
_EDGE_COLUMNS = (
    ("lot", "n.lot"),
    ("component", "c.lot"),
    ("quantity", "CAST(e.quantity AS FLOAT)"),
    ("unit", "e.unit"),
    ("job_order", "n.job_order"),
)
#: ``TestResultOut``'s columns, from a test result ``t`` and its specification ``s``.
_TEST_COLUMNS = (
    ("property", "s.property_name"),
    ("value", "t.value"),
    ("unit", "t.unit"),
    ("passed", "t.passed"),
    ("tested_at", "t.tested_at"),
)
_TIMES = frozenset({"created_at", "started_at", "ended_at", "tested_at"})

#: The walk's lots, cut to the ``:limit`` nearest (by distance, then name in code point
#: order, as Python sorts), with how each was made; and whether a bound cut the walk.
_TRACE_SQL = """{walk},
kept AS MATERIALIZED (
    SELECT r.lot_id, r.depth, l.external_id AS lot, l.material_definition_id, l.quantity,
        l.unit, l.status, l.disposition, l.created_at, l.job_order_id
    FROM visit r JOIN material_lot l ON l.id = r.lot_id
    ORDER BY r.depth, l.external_id {collate}
    LIMIT :limit
),
cut AS (
    SELECT CASE
        WHEN (SELECT COUNT(*) FROM visit) > :limit THEN 'limit'
        WHEN EXISTS (
            SELECT 1 FROM kept k JOIN material_lot_assembly x ON x.{near} = k.lot_id
            WHERE k.depth = :depth
        ) THEN 'depth'
    END AS truncated_by
),
lots AS {lots_materialized} (
    SELECT k.lot_id, {lot_columns},
        o.material_definition_id = k.material_definition_id AS finished
    FROM kept k
    JOIN material_definition m ON m.id = k.material_definition_id
    LEFT JOIN job_order jo ON jo.id = k.job_order_id
    LEFT JOIN equipment eq ON eq.id = jo.equipment_id
    LEFT JOIN work_master wm ON wm.id = jo.work_master_id
    LEFT JOIN segment_requirement sr ON sr.id = jo.segment_requirement_id
    LEFT JOIN operations_request o ON o.id = sr.operations_request_id
),
edges AS (
    SELECT {edge_columns}
    FROM material_lot_assembly e
    JOIN lots n ON n.lot_id = e.material_lot_id
    JOIN kept c ON c.lot_id = e.component_lot_id
    WHERE {near_side}.depth < :depth
),
tests AS (
    SELECT t.material_lot_id AS lot_id, {test_columns}
    FROM kept k
    JOIN test_result t ON t.material_lot_id = k.lot_id
    JOIN test_specification s ON s.id = t.test_specification_id
)
{answer}"""


def _select(columns: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{sql} AS {name}" for name, sql in columns)


def _typed_null(field: str) -> str:
    types = {"quantity": "FLOAT", "value": "FLOAT", "passed": "BOOLEAN"}
    sql_type = "TIMESTAMP WITH TIME ZONE" if field in _TIMES else types.get(field, "VARCHAR")
    return f"CAST(NULL AS {sql_type})"


_LOT_FIELDS = tuple(name for name, _ in _LOT_COLUMNS)
_EDGE_FIELDS = tuple(name for name, _ in _EDGE_COLUMNS)
_TEST_FIELDS = tuple(name for name, _ in _TEST_COLUMNS)

#: The rows read in Python (CSV, DOT, SQLite): one per lot, edge and test result, each kind
#: in its own columns: ``kind``, the lot's key, then the lot's (with ``finished``), the
#: edge's and the test's columns, NULL where another kind's.
_ROWS_ANSWER = """SELECT 'lot' AS kind, x.lot_id, (SELECT truncated_by FROM cut) AS truncated_by,
    {lots}, x.finished, {typed_no_edge}, {typed_no_test}
FROM lots x
UNION ALL
SELECT 'edge', NULL, NULL, {no_lot}, NULL, {edges}, {no_test} FROM edges y
UNION ALL
SELECT 'test', z.lot_id, NULL, {no_lot}, NULL, {no_edge}, {tests} FROM tests z""".format(
    lots=", ".join(f"x.{f}" for f in _LOT_FIELDS),
    edges=", ".join(f"y.{f}" for f in _EDGE_FIELDS),
    tests=", ".join(f"z.{f}" for f in _TEST_FIELDS),
    no_lot=", ".join("NULL" for _ in _LOT_FIELDS),
    no_edge=", ".join("NULL" for _ in _EDGE_FIELDS),
    no_test=", ".join("NULL" for _ in _TEST_FIELDS),
    # The first SELECT of a UNION sets the columns' types: its NULLs are typed.
    typed_no_edge=", ".join(_typed_null(f) for f in _EDGE_FIELDS),
    typed_no_test=", ".join(_typed_null(f) for f in _TEST_FIELDS),
)
_LOT_AT = 3
_EDGE_AT = _LOT_AT + len(_LOT_FIELDS) + 1
_TEST_AT = _EDGE_AT + len(_EDGE_FIELDS)

#: A time as msgspec writes it: ISO 8601 in UTC, microseconds (six digits) only when there
#: are any, ``Z``.
_UTC = (
    "replace(to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '.000000Z', 'Z')"
)


def _json_value(alias: str, field: str) -> str:
    """``alias.field`` as the JSON answer has it (a time as msgspec writes it)."""
    return _UTC.format(f"{alias}.{field}") if field in _TIMES else f"{alias}.{field}"


def _json_columns(
    alias: str, fields: Iterable[str], rename: Mapping[str, str] | None = None
) -> str:
    """``alias``'s ``fields`` as columns named as the JSON answer's keys."""
    names = rename or {}
    return ", ".join(f"{_json_value(alias, f)} AS {names.get(f, f)}" for f in fields)


#: ``json_agg`` of rows whose column names are the JSON keys (cheaper than
#: ``json_build_object`` per lot), sorted as the Python answers are (names by code point).
_TRACE_JSON = """,
results AS (
    SELECT t.lot_id, json_agg(json_build_object({test_object})
        ORDER BY t.property COLLATE "C", t.tested_at) AS results
    FROM tests t GROUP BY t.lot_id
)
SELECT CAST(json_build_object(
    'lot', CAST(:lot AS TEXT), 'direction', '{direction}', 'depth', :depth, 'limit', :limit,
    'truncated', cut.truncated_by IS NOT NULL, 'truncated_by', cut.truncated_by,
    '{lots_key}', COALESCE((
        SELECT json_agg(z ORDER BY z.depth, z.lot COLLATE "C") FROM (
            SELECT {lot_row}, COALESCE(r.results, '[]') AS test_results
            FROM lots x LEFT JOIN results r ON r.lot_id = x.lot_id
        ) z
    ), '[]'),
    'edges', COALESCE((
        SELECT json_agg(y ORDER BY y.{a} COLLATE "C", y.{b} COLLATE "C") FROM (
            SELECT {edge_row} FROM edges e
        ) y
    ), '[]')
) AS TEXT)
FROM cut WHERE EXISTS (SELECT 1 FROM kept)"""

_IMPACT_JSON = """SELECT CAST(json_build_object(
    'lot', CAST(:lot AS TEXT), 'depth', :depth, 'limit', :limit,
    'truncated', cut.truncated_by IS NOT NULL, 'truncated_by', cut.truncated_by,
    'finished', COALESCE((
        SELECT json_agg(z ORDER BY z.depth, z.lot COLLATE "C") FROM (
            SELECT {impact_row} FROM lots x WHERE x.finished
        ) z
    ), '[]')
) AS TEXT)
FROM cut WHERE EXISTS (SELECT 1 FROM kept)"""

Shape = Literal["trace", "graph", "impact"]

_COLUMNS = {"backward": ("material_lot_id", "component_lot_id")}
_COLUMNS["forward"] = ("component_lot_id", "material_lot_id")
#: A graph's edge: ``TraceEdge``'s columns, ``component`` and ``lot`` named as material flows.
_GRAPH_EDGE = {"component": "source", "lot": "target"}
_GRAPH_EDGE_FIELDS = ("component", "lot", *_EDGE_FIELDS[2:])
_IMPACT_FIELDS = tuple(f.name for f in msgspec.structs.fields(ImpactLot))


def _numbers(sql: str, depth: int, limit: int) -> str:
    """``depth`` and ``limit`` written into ``sql`` as integers (``:depth``, ``:limit`` and
    ``:cap``, the most lots the walk finds: ``limit + 1``).

    The numbers are in the text because psycopg prepares a statement after a few runs and
    PostgreSQL then plans it once for any parameters: a ``LIMIT $n`` it cannot see makes it
    guess a handful of lots and loop over them pairwise. With the numbers in the text, the
    plan is made for them (one per depth and limit).
    """
    numbers = {"depth": int(depth), "limit": int(limit), "cap": int(limit) + 1}
    return re.sub(r":(depth|limit|cap)\b", lambda m: str(numbers[m.group(1)]), sql)


def walk_sql(dialect: str, direction: Direction, depth: int, limit: int) -> str:
    """The walk alone (``WITH RECURSIVE`` … ``visit(lot_id, depth)``, to be followed by a
    SELECT), as the traces run it; one parameter, ``:lot``."""
    near, far = _COLUMNS[direction]
    walk = _WALK["postgresql" if dialect == "postgresql" else "sqlite"]
    return _numbers(walk.format(near=near, far=far), depth, limit)


def _statement(
    dialect: str,
    direction: Direction,
    depth: int,
    limit: int,
    answer: str,
    lots_read_again: bool = True,
) -> str:
    """``_TRACE_SQL`` with ``answer`` as its final SELECT; one parameter, ``:lot``.
    ``lots_read_again``: the answer reads ``lots`` more than once (a trace: the lots and
    the edges' lots), so it is made once and kept."""
    sql = _TRACE_SQL.format(
        walk=walk_sql(dialect, direction, depth, limit),
        near=_COLUMNS[direction][0],
        collate='COLLATE "C"' if dialect == "postgresql" else "COLLATE BINARY",
        lot_columns=_select(_LOT_COLUMNS),
        edge_columns=_select(_EDGE_COLUMNS),
        test_columns=_select(_TEST_COLUMNS),
        near_side="n" if direction == "backward" else "c",
        # Read once (the recall list's finished lots), ``lots`` is folded into that query:
        # the joins whose columns it does not show go (measured: 10-15 % off an impact).
        lots_materialized="MATERIALIZED" if lots_read_again else "NOT MATERIALIZED",
        answer=answer,
    )
    return _numbers(sql, depth, limit)


@functools.lru_cache(maxsize=256)
def trace_sql(dialect: str, direction: Direction, depth: int, limit: int) -> str:
    """The trace as rows (``_ROWS_ANSWER``), for ``dialect`` (``postgresql`` or ``sqlite``);
    one parameter, ``:lot``."""
    return _statement(dialect, direction, depth, limit, _ROWS_ANSWER)


@functools.lru_cache(maxsize=256)
def trace_json_sql(direction: Direction, shape: Shape, depth: int, limit: int) -> str:
    """The statement that returns one answer as JSON text (one row; none for an unknown
    lot), PostgreSQL only; one parameter, ``:lot``."""
    if shape == "impact":
        answer = _IMPACT_JSON.format(impact_row=_json_columns("x", _IMPACT_FIELDS))
        direction = "forward"
    else:
        graph = shape == "graph"
        rename = _GRAPH_EDGE if graph else {}
        answer = _TRACE_JSON.format(
            direction=direction,
            lots_key="nodes" if graph else "lots",
            lot_row=_json_columns("x", _LOT_FIELDS),
            test_object=", ".join(f"'{f}', {_json_value('t', f)}" for f in _TEST_FIELDS),
            edge_row=_json_columns("e", _GRAPH_EDGE_FIELDS if graph else _EDGE_FIELDS, rename),
            a="target" if graph else "lot",
            b="source" if graph else "component",
        )
    return _statement("postgresql", direction, depth, limit, answer, shape != "impact")


def driver_sql(sql: str, paramstyle: str) -> str:
    """A statement of this module for a DB-API driver: psycopg takes ``%(lot)s``, sqlite3
    ``:lot``."""
    return sql.replace(":lot", "%(lot)s") if paramstyle == "pyformat" else sql


@overload
def _utc(value: datetime | str) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | str | None) -> datetime | None:
    """A stored time as an aware UTC datetime (PostgreSQL hands back datetimes, SQLite the
    text SQLAlchemy stored): the rows are read untyped, so that only the values used pay."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _number(value: Decimal | float | None) -> float | None:
    """A quantity as a JSON number (``mes.quantities.json_number``; SQLite gives a float)."""
    return None if value is None else float(value)


class _Walk(msgspec.Struct):
    lots: list[TraceLot]
    edges: list[TraceEdge]
    finished: list[ImpactLot]
    truncated_by: Bound | None


def _walk(session: Session, lot_id: str, direction: Direction, depth: int, limit: int) -> _Walk:
    # One statement on the driver's own cursor: no transaction around it (no BEGIN and
    # ROLLBACK round trips) and no SQLAlchemy row layer; the values are converted below.
    with session.get_bind().engine.connect() as connection:
        dialect = connection.dialect
        cursor = connection.execution_options(isolation_level="AUTOCOMMIT").connection.cursor()
        try:
            sql = trace_sql(dialect.name, direction, depth, limit)
            cursor.execute(driver_sql(sql, dialect.paramstyle), {"lot": lot_id})
            rows = cursor.fetchall()
        finally:
            cursor.close()
    if not rows:  # the lot itself is always a row
        raise NotFound("lot", lot_id)
    lots: dict[int, TraceLot] = {}
    finished: list[ImpactLot] = []
    edges: list[TraceEdge] = []
    tests: list[tuple[int, TestResultOut]] = []
    truncated_by: Bound | None = None
    for r in rows:
        kind = r[0]
        if kind == "lot":
            truncated_by = r[2]
            lot = dict(zip(_LOT_FIELDS, r[_LOT_AT : _EDGE_AT - 1], strict=True))
            for time in ("created_at", "started_at", "ended_at"):
                lot[time] = _utc(lot[time])
            lot["quantity"] = float(lot["quantity"])
            lots[r[1]] = TraceLot(**lot)
            if r[_EDGE_AT - 1]:
                finished.append(ImpactLot(**{f: lot[f] for f in _IMPACT_FIELDS}))
        elif kind == "edge":
            edge = dict(zip(_EDGE_FIELDS, r[_EDGE_AT:_TEST_AT], strict=True))
            edge["quantity"] = _number(edge["quantity"])
            edges.append(TraceEdge(**edge))
        else:
            test = dict(zip(_TEST_FIELDS, r[_TEST_AT:], strict=True))
            test["passed"] = bool(test["passed"])
            test["tested_at"] = _utc(test["tested_at"])
            tests.append((r[1], TestResultOut(**test)))
    for pk, result in tests:
        lots[pk].test_results.append(result)
    for made in lots.values():
        if len(made.test_results) > 1:
            made.test_results.sort(key=lambda t: (t.property, t.tested_at))
    return _Walk(
        lots=sorted(lots.values(), key=lambda lot: (lot.depth, lot.lot)),
        edges=sorted(edges, key=lambda e: (e.lot, e.component)),
        finished=sorted(finished, key=lambda f: (f.depth, f.lot)),
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


def answer_statement(shape: Shape, direction: Direction, depth: int, limit: int) -> str:
    """``trace_json_sql`` for psycopg (parameter ``%(lot)s``): what ``answer_json`` runs on
    PostgreSQL."""
    return driver_sql(trace_json_sql(direction, shape, depth, limit), "pyformat")


def answer_json(
    session: Session,
    lot_id: str,
    shape: Shape,
    direction: Direction = "forward",
    depth: int = 10,
    limit: int = DEFAULT_LIMIT,
) -> bytes:
    """The JSON answer of ``trace`` (``shape`` ``trace``), ``as_graph`` (``graph``) or
    ``impact`` (``impact``; always forward), as the bytes to send.

    On PostgreSQL the database builds them (``trace_json_sql``: one statement, no Python
    object per lot); elsewhere (SQLite) they are the encoded answer of the functions above.
    """
    engine = session.get_bind().engine
    if engine.dialect.name != "postgresql":
        answer: Trace | Graph | Impact
        if shape == "impact":
            answer = impact(session, lot_id, depth, limit)
        else:
            answer = trace(session, lot_id, direction, depth, limit)
            if shape == "graph":
                answer = as_graph(answer)
        return msgspec.json.encode(answer)
    sql = answer_statement(shape, direction, depth, limit)
    # As ``_walk``: the driver's own cursor, outside a transaction.
    with engine.connect() as connection:
        cursor = connection.execution_options(isolation_level="AUTOCOMMIT").connection.cursor()
        try:
            cursor.execute(sql, {"lot": lot_id})
            row = cursor.fetchone()
        finally:
            cursor.close()
    if row is None:
        raise NotFound("lot", lot_id)
    text: str = row[0]
    return text.encode()


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
        label = _dot_id(*(p for p in (_quantity(e.quantity, e.unit), e.job_order or "") if p))
        lines.append(f"  {_dot_id(e.component)} -> {_dot_id(e.lot)} [label={label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
