"""Lot genealogy: where a lot came from (backward), where it went (forward), and which
finished lots a suspect lot reached (impact: the recall list).

The edges are ``material_lot_assembly`` rows (a component lot went into a lot within one job
response, with the quantity the job consumed of it). A trace is **one SQL statement, one
round trip** (``TRACE_SQL``): a recursive walk over the edges, then every reached lot with
how it was made (job order, work unit, work master and version, the hash of the parameters
sent to the machine, times, production order), the edges between them and the lots' test
results, as rows of three kinds. The service only turns those rows into the answer; for
the JSON answers on PostgreSQL, the statement builds the answer itself (``trace_json_sql``,
``answer_json``), and the API sends its bytes as they are.

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

#: The whole trace in one statement: ``{near}``/``{far}`` are the assembly's columns
#: (backward: from a lot to its components; forward: the other way). Rows of kind ``lot``,
#: ``edge`` and ``test``; ``visits`` (on lot rows) counts the walk's visits, at most ``:cap``.
TRACE_SQL = """
WITH RECURSIVE walk(lot_id, depth) AS (
    SELECT id, 0 FROM material_lot WHERE external_id = :lot
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
    jo.work_master_version, jo.parameters_hash, jo.started_at, jo.ended_at,
    o.id AS order_pk, o.external_id AS order_number, o.customer_order,
    o.material_definition_id = l.material_definition_id AS finished,
    CAST(NULL AS VARCHAR(100)) AS test, CAST(NULL AS FLOAT) AS test_value,
    CAST(NULL AS BOOLEAN) AS test_passed, CAST(NULL AS TIMESTAMP WITH TIME ZONE) AS tested_at
FROM reached r
JOIN material_lot l ON l.id = r.lot_id
JOIN material_definition m ON m.id = l.material_definition_id
LEFT JOIN job_order jo ON jo.id = l.job_order_id
LEFT JOIN equipment eq ON eq.id = jo.equipment_id
LEFT JOIN work_master wm ON wm.id = jo.work_master_id
LEFT JOIN segment_requirement sr ON sr.id = jo.segment_requirement_id
LEFT JOIN operations_request o ON o.id = sr.operations_request_id
UNION ALL
SELECT 'edge', a.material_lot_id, a.component_lot_id, NULL, NULL, NULL,
    NULL, NULL, a.quantity, a.unit, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL
FROM material_lot_assembly a
JOIN reached n ON n.lot_id = a.{near} AND n.depth < :depth
JOIN reached f ON f.lot_id = a.{far}
UNION ALL
SELECT 'test', t.material_lot_id, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, t.unit, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    s.property_name, t.value, t.passed, t.tested_at
FROM reached r
JOIN test_result t ON t.material_lot_id = r.lot_id
JOIN test_specification s ON s.id = t.test_specification_id
"""

#: The answer itself built in PostgreSQL, for the JSON formats: the same walk, the same
#: lots, edges and test results as ``TRACE_SQL``, aggregated into the bytes the API sends
#: (no Python object per lot). ``{answer}`` is the final SELECT of one answer shape
#: (``_TRACE_ANSWER`` for a trace or a graph, ``_IMPACT_ANSWER``). Names sort by code point
#: (``COLLATE "C"``), as Python sorts them; times are UTC with a ``Z``, as msgspec writes them.
TRACE_JSON_SQL = """
WITH RECURSIVE walk(lot_id, depth) AS (
    SELECT id, 0 FROM material_lot WHERE external_id = :lot
    UNION
    SELECT a.{far}, w.depth + 1
    FROM walk w JOIN material_lot_assembly a ON a.{near} = w.lot_id
    WHERE w.depth < :depth
),
visit AS (SELECT lot_id, depth FROM walk LIMIT :cap),
reached AS (SELECT lot_id, MIN(depth) AS depth FROM visit GROUP BY lot_id),
kept AS MATERIALIZED (
    SELECT r.lot_id, r.depth, l.external_id AS lot, l.material_definition_id, l.quantity,
        l.unit, l.status, l.disposition, l.created_at, l.job_order_id
    FROM reached r JOIN material_lot l ON l.id = r.lot_id
    ORDER BY r.depth, l.external_id COLLATE "C"
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
lots AS MATERIALIZED (
    SELECT k.lot_id, k.depth, k.lot, m.external_id AS material,
        CAST(k.quantity AS FLOAT) AS quantity, k.unit, k.status, k.disposition,
        k.created_at, jo.external_id AS job_order, eq.external_id AS work_unit,
        wm.external_id AS work_master, jo.work_master_version, jo.parameters_hash,
        jo.started_at, jo.ended_at, o.id AS production_order, o.external_id AS order_number,
        o.customer_order, o.material_definition_id = k.material_definition_id AS finished
    FROM kept k
    JOIN material_definition m ON m.id = k.material_definition_id
    LEFT JOIN job_order jo ON jo.id = k.job_order_id
    LEFT JOIN equipment eq ON eq.id = jo.equipment_id
    LEFT JOIN work_master wm ON wm.id = jo.work_master_id
    LEFT JOIN segment_requirement sr ON sr.id = jo.segment_requirement_id
    LEFT JOIN operations_request o ON o.id = sr.operations_request_id
)
{answer}
"""

#: A time as msgspec writes it: ISO 8601 in UTC, microseconds (six digits) only when there
#: are any, ``Z``.
_UTC = (
    "replace(to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '.000000Z', 'Z')"
)

#: A lot of the answer, one row whose column names are the JSON keys (``json_agg`` of a row
#: is cheaper than ``json_build_object`` per lot).
_LOT_ROW = """SELECT x.lot, x.material, x.depth, x.quantity, x.unit, x.status, x.disposition,
    {created_at} AS created_at, x.job_order, x.work_unit, x.work_master,
    x.work_master_version, x.parameters_hash, {started_at} AS started_at,
    {ended_at} AS ended_at, x.production_order, x.order_number, x.customer_order,
    COALESCE(tr.results, '[]') AS test_results
FROM lots x LEFT JOIN tests tr ON tr.lot_id = x.lot_id""".format(
    created_at=_UTC.format("x.created_at"),
    started_at=_UTC.format("x.started_at"),
    ended_at=_UTC.format("x.ended_at"),
)

#: The test results of the kept lots, as a JSON list per lot.
_TESTS = """tests AS (
    SELECT t.material_lot_id AS lot_id, json_agg(json_build_object(
        'property', s.property_name, 'value', t.value, 'unit', t.unit,
        'passed', t.passed, 'tested_at', {tested_at}
    ) ORDER BY s.property_name COLLATE "C", t.tested_at) AS results
    FROM kept k
    JOIN test_result t ON t.material_lot_id = k.lot_id
    JOIN test_specification s ON s.id = t.test_specification_id
    GROUP BY t.material_lot_id
)""".format(tested_at=_UTC.format("t.tested_at"))

#: The edges between kept lots, from the near side of the walk short of ``depth`` (as
#: ``TRACE_SQL``): ``{a}`` and ``{b}`` name the made lot and the component
#: (``lot``/``component``, or ``target``/``source`` in a graph), ``{near}`` its near side.
_EDGES_JSON = """COALESCE((
    SELECT json_agg(y ORDER BY y.{a} COLLATE "C", y.{b} COLLATE "C") FROM (
        SELECT {edge_columns}
        FROM material_lot_assembly e
        JOIN lots n ON n.lot_id = e.material_lot_id
        JOIN kept c ON c.lot_id = e.component_lot_id
        WHERE {near}.depth < :depth
    ) y
), '[]')"""

_TRACE_EDGE = (
    "n.lot AS lot, c.lot AS component, CAST(e.quantity AS FLOAT) AS quantity, e.unit, n.job_order"
)
_GRAPH_EDGE = (
    "c.lot AS source, n.lot AS target, CAST(e.quantity AS FLOAT) AS quantity, e.unit, n.job_order"
)

_HEAD_JSON = """'lot', CAST(:lot AS TEXT), {direction}'depth', :depth,
    'limit', :limit, 'truncated', cut.truncated_by IS NOT NULL,
    'truncated_by', cut.truncated_by"""

_TRACE_ANSWER = """, {tests}
SELECT CAST(json_build_object(
    {head},
    '{lots_key}', COALESCE(
        (SELECT json_agg(z ORDER BY z.depth, z.lot COLLATE "C") FROM ({lot_row}) z), '[]'
    ),
    'edges', {edges}
) AS TEXT)
FROM cut WHERE EXISTS (SELECT 1 FROM kept)"""

_IMPACT_ANSWER = """SELECT CAST(json_build_object(
    {head},
    'finished', COALESCE((
        SELECT json_agg(z ORDER BY z.depth, z.lot COLLATE "C") FROM (
            SELECT x.lot, x.material, x.depth, x.production_order, x.order_number,
                x.customer_order, x.disposition, x.status, x.quantity, x.unit,
                {ended_at} AS ended_at
            FROM lots x WHERE x.finished
        ) z
    ), '[]')
) AS TEXT)
FROM cut WHERE EXISTS (SELECT 1 FROM kept)"""

Shape = Literal["trace", "graph", "impact"]


def trace_json_sql(direction: Direction, shape: Shape, depth: int, limit: int) -> str:
    """The statement that returns one answer as JSON text (one row; none for an unknown
    lot), PostgreSQL only; one parameter, ``:lot``.

    ``depth`` and ``limit`` are written into the text as integers: psycopg prepares a
    statement after a few runs and PostgreSQL then plans it once for any parameters, and a
    ``LIMIT $n`` it cannot see makes it guess a handful of lots and loop over them pairwise.
    With the numbers in the text, the plan is made for them (one per depth and limit).
    """
    near, far = _COLUMNS[direction]
    direction_json = "" if shape == "impact" else f"'direction', '{direction}', "
    head = _HEAD_JSON.format(direction=direction_json)
    if shape == "impact":
        answer = _IMPACT_ANSWER.format(head=head, ended_at=_UTC.format("x.ended_at"))
    else:
        graph = shape == "graph"
        edges = _EDGES_JSON.format(
            a="target" if graph else "lot",
            b="source" if graph else "component",
            edge_columns=_GRAPH_EDGE if graph else _TRACE_EDGE,
            near="n" if direction == "backward" else "c",
        )
        answer = _TRACE_ANSWER.format(
            tests=_TESTS,
            head=head,
            lots_key="nodes" if graph else "lots",
            lot_row=_LOT_ROW,
            edges=edges,
        )
    sql = TRACE_JSON_SQL.format(near=near, far=far, answer=answer)
    numbers = {"depth": int(depth), "limit": int(limit), "cap": int(limit) + 1}
    return re.sub(r":(depth|limit|cap)\b", lambda m: str(numbers[m.group(1)]), sql)


_COLUMNS = {"backward": ("material_lot_id", "component_lot_id")}
_COLUMNS["forward"] = ("component_lot_id", "material_lot_id")


def trace_sql(direction: Direction) -> str:
    """The trace statement for one direction; parameters ``:lot`` (its ID), ``:depth`` and
    ``:cap`` (the most visits: the node limit + 1)."""
    near, far = _COLUMNS[direction]
    return TRACE_SQL.format(near=near, far=far)


def driver_sql(direction: Direction, paramstyle: str) -> str:
    """``trace_sql`` for a DB-API driver: psycopg takes ``%(name)s``, sqlite3 ``:name``."""
    sql = trace_sql(direction)
    return re.sub(r":(\w+)", r"%(\1)s", sql) if paramstyle == "pyformat" else sql


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
        cursor = connection.execution_options(isolation_level="AUTOCOMMIT").connection.cursor()
        try:
            cursor.execute(
                driver_sql(direction, connection.dialect.paramstyle),
                {"lot": lot_id, "depth": depth, "cap": limit + 1},
            )
            rows = cursor.fetchall()
        finally:
            cursor.close()
    if not rows:  # the lot itself is always a row
        raise NotFound("lot", lot_id)
    lots: dict[int, TraceLot] = {}
    finished: dict[int, ImpactLot] = {}
    edge_rows = []
    test_rows = []
    visits = 0
    more = False
    for r in rows:
        kind = r[0]
        if kind == "edge":
            edge_rows.append(r)
            continue
        if kind == "test":
            test_rows.append(r)
            continue
        (_, pk, _, depth_, visits, more_, lot, material, quantity, unit, status, disposition,
         created_at, job_order, work_unit, work_master, version, phash, started_at, ended_at,
         order_pk, order_number, customer_order, is_finished, *_) = r  # fmt: skip
        more = more or bool(more_)
        ended = _utc(ended_at)
        lots[pk] = TraceLot(
            lot=lot,
            material=material,
            depth=depth_,
            quantity=float(quantity),
            unit=unit,
            status=status,
            disposition=disposition,
            created_at=_utc(created_at),
            job_order=job_order,
            work_unit=work_unit,
            work_master=work_master,
            work_master_version=version,
            parameters_hash=phash,
            started_at=_utc(started_at),
            ended_at=ended,
            production_order=order_pk,
            order_number=order_number,
            customer_order=customer_order,
        )
        if is_finished:
            finished[pk] = ImpactLot(
                lot=lot,
                material=material,
                depth=depth_,
                production_order=order_pk,
                order_number=order_number,
                customer_order=customer_order,
                disposition=disposition,
                status=status,
                quantity=float(quantity),
                unit=unit,
                ended_at=ended,
            )
    truncated_by: Bound | None = None
    if visits > limit:
        # The walk stopped at limit + 1 visits: keep the nearest ``limit`` lots.
        truncated_by = "limit"
        keep = sorted(lots, key=lambda pk: (lots[pk].depth, lots[pk].lot))[:limit]
        lots = {pk: lots[pk] for pk in keep}
    elif more:
        truncated_by = "depth"
    for r in test_rows:
        if (made := lots.get(r[1])) is not None:
            made.test_results.append(
                TestResultOut(
                    property=r[24],
                    value=r[25],
                    unit=r[9],
                    passed=bool(r[26]),
                    tested_at=_utc(r[27]),
                )
            )
    edges = [
        TraceEdge(
            lot=made.lot,
            component=component.lot,
            quantity=_number(r[8]),
            unit=r[9],
            job_order=made.job_order,
        )
        for r in edge_rows
        if (made := lots.get(r[1])) is not None and (component := lots.get(r[2])) is not None
    ]
    for lot in lots.values():
        if len(lot.test_results) > 1:
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
    if shape == "impact":
        direction = "forward"
    sql = trace_json_sql(direction, shape, depth, limit).replace(":lot", "%(lot)s")
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
