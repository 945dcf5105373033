"""Production orders (ISA-95 operations requests): accept from the ERP, read back.

The ERP's order number is the business key: the same number with the same body is the same
order (a retried post), with another body a conflict. Each order belongs to the ERP client
that sent it (``source``, its token's name): reading and changing take that client as
``source`` and treat another's order as unknown; a number another client took is a conflict
that says nothing of the other's order. Accepting an order stores the request
and one segment requirement per routing step in one transaction and answers; the order's
workflow, whose id is derived from the same number, is started by ``mes.relay``, which
records that it did (``workflow_started_at``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, Row, func, insert, select, text, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, contains_eager, joinedload, selectinload

from mes import audit, execution, reporting, transitions, units
from mes.erp_segments import ErpOrderData, ErpSegmentData, apply_plans, plan_segments
from mes.errors import Conflict, DomainError, NotFound, invalid
from mes.models import (
    FINAL_STATES,
    ErpClient,
    ErpMessage,
    JobOrder,
    MaterialDefinition,
    MaterialUse,
    OperationsDefinition,
    OperationsMaterialSpec,
    OperationsRequest,
    OperationsSegment,
    ProcessSegment,
    RequestState,
    SegmentRequirement,
    utcnow,
)
from mes.paging import FIRST_PAGE, Paging, SortKey, fetch_page
from mes.quantities import QuantityIn, QuantityNumber, exact
from workflows.types import order_workflow_id

if TYPE_CHECKING:  # the workflow client imports the workflows, which import this module
    from mes.db import Database

log = logging.getLogger(__name__)

ORDER_NUMBER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$"


class ProductionOrderIn(BaseModel):
    """A production order as the ERP posts it (B2MML OperationsRequest, type Production)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    order_number: Annotated[
        str,
        Field(
            pattern=ORDER_NUMBER_PATTERN,
            description="The ERP's order number (OperationsRequest ID); letters, digits, . _ -",
        ),
    ]
    product: Annotated[
        str,
        Field(min_length=1, max_length=100, description="Material definition ID of the product"),
    ]
    quantity: Annotated[
        QuantityIn, Field(gt=0, le=1e9, allow_inf_nan=False, description="How many to make")
    ]
    unit: Annotated[str, Field(min_length=1, max_length=20, description="Unit of the quantity")]
    due: Annotated[
        AwareDatetime,
        Field(
            description="When it must be done (OperationsRequest EndTime)",
            json_schema_extra={"pattern": r"^2[0-9]{3}-"},  # the years 2000 to 2999
        ),
    ]
    priority: Annotated[
        int, Field(ge=0, le=1_000_000, strict=True, description="Higher runs first")
    ]
    customer_order: Annotated[str | None, Field(max_length=100)] = None

    @field_validator("due")
    @classmethod
    def _due_in_range(cls, v: datetime) -> datetime:
        if not 2000 <= v.year <= 2999:
            raise ValueError("due must be between the years 2000 and 2999")
        return v

    def fingerprint(self) -> str:
        """A hash of the order's content, insensitive to key order and time-zone notation."""
        body = self.model_dump(mode="json")
        body["due"] = self.due.timestamp()
        # As a float, as before quantities were decimals: a stored order's hash still matches.
        body["quantity"] = float(self.quantity)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ErpProductionOrderIn(ProductionOrderIn):
    """An order from B2MML: the JSON route's fields plus the ERP's ids and per-step data
    (``mes.erp_segments``). Not a shape of the JSON API."""

    erp: ErpOrderData


class JobOrderOut(BaseModel):
    """A work order (ISA-95 job order) of a production order."""

    id: str = Field(description="JobOrderID, as the PLC knows it")
    step: int
    segment: str
    work_master: str
    equipment: str
    state: str
    dispatched_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None


class LotOut(BaseModel):
    lot: str
    material: str
    quantity: QuantityNumber
    unit: str


class ProductionOrderOut(BaseModel):
    """A production order (ISA-95 operations request) and where it stands."""

    id: int
    order_number: str
    product: str
    quantity: QuantityNumber
    unit: str
    priority: int
    due: datetime
    customer_order: str | None
    state: str
    late: bool
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    workflow_id: str
    links: dict[str, str]
    job_orders: list[JobOrderOut]
    produced_lots: list[LotOut]
    pending: list[str] = Field(
        default_factory=list,
        description="Actions decided and answered, still being carried out (e.g. a cancel "
        "waiting for a machine)",
    )


async def accept_order(
    db: Database, body: ProductionOrderIn, actor: str, source: str
) -> tuple[ProductionOrderOut, bool]:
    """Accept an ERP's production order: store it, in one short transaction, and answer.

    The one way in for the JSON and the B2MML routes. Returns the order and whether it is
    new; the same order posted again is found as it stands now. Nothing here waits for the
    workflow engine: the stored order, its ``workflow_started_at`` still empty, is the
    request to start its workflow, which the relay (``mes.relay``, beside every worker)
    carries out; the transaction wakes it (``NOTIFY`` on PostgreSQL, and ``wake_relays``
    for a relay in this process).
    """

    def store(s: Session) -> tuple[ProductionOrderOut, bool]:
        if not isinstance(body, ErpProductionOrderIn):
            return insert_order(s, body, actor, source)
        order, created = create_order(s, body, actor, source)
        if created:  # just written: no job orders, no lots yet, nothing to read back
            return new_order_out(order), True
        return order_out(s, get_order(s, order.id)), False

    out, created = await db.run(store)
    if created:
        wake_relays()
    return out, created


#: The PostgreSQL channel an accepted order is announced on (at commit, by a trigger on
#: ``operations_request``: migration 0016); relays listen.
START_CHANNEL = "mes_order_start"
_relay_wakers: set[Callable[[], None]] = set()


def wake_relays() -> None:
    """Wake the relays of this process (the API and the worker in one process, as ``mes
    dev`` and ``mes demo`` run them): an order waits for its start."""
    for wake in list(_relay_wakers):
        wake()


def on_order_stored(wake: Callable[[], None]) -> Callable[[], None]:
    """Call ``wake`` (thread-safe, quick) whenever this process stores a new order; returns
    the function that stops it."""
    _relay_wakers.add(wake)
    return lambda: _relay_wakers.discard(wake)


#: SQLite has no row locks (``FOR UPDATE`` is left out): there this lock, held by the relay
#: for a whole pass and by ``order_lock`` until the transaction ends, stands for them. The
#: API and the relay then share one process (``mes demo``, ``mes dev``).
START_LOCK = threading.Lock()


@contextmanager
def order_lock(session: Session) -> Iterator[None]:
    """Around a transaction that reads an order with ``locked_order`` and acts on it in the
    database because its workflow has not started: on SQLite, ``START_LOCK`` for the whole
    block (commit inside it); on PostgreSQL nothing (the row lock is the lock)."""
    if session.get_bind().dialect.name == "sqlite":
        with START_LOCK:
            yield
    else:
        yield


def locked_order(
    session: Session,
    order_id: int | None = None,
    number: str | None = None,
    source: str | None = None,
) -> OperationsRequest | None:
    """The order by id or number (with ``source``: that ERP client's), its row locked until
    the transaction ends (``FOR UPDATE``, waiting for the relay while it starts the order's
    workflow), read afresh: after the lock, ``workflow_started_at`` says whether the order
    is its workflow's to steer or still the database's alone."""
    where = (
        OperationsRequest.id == order_id
        if order_id is not None
        else OperationsRequest.external_id == number
    )
    return session.scalar(
        select(OperationsRequest)
        .where(_sent_by(source), where)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def mark_workflow_started(session: Session, order_id: int) -> None:
    """Record that the order's workflow runs or ran (once: the first time is kept)."""
    session.execute(
        update(OperationsRequest)
        .where(OperationsRequest.id == order_id, OperationsRequest.workflow_started_at.is_(None))
        .values(workflow_started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def create_order(
    session: Session,
    body: ProductionOrderIn,
    actor: str = audit.SYSTEM,
    source: str | None = None,
) -> tuple[OperationsRequest, bool]:
    """Store a new order, or find the same one posted before.

    ``source`` names the ERP client (its token) that sent it: its callbacks go there.
    Returns the order and whether it was created now. Raises ``Conflict`` when the number is
    taken by a different order, and a 422 ``DomainError`` naming the field when the product,
    its routing or the unit do not fit.
    """
    fingerprint = body.fingerprint()
    try:
        order = _new_order(session, body, fingerprint, source)
    except DomainError:
        # The same order posted before is found as it was accepted, whatever its product or
        # routing became since; and a number taken by another order is a conflict first.
        existing = _by_number(session, body.order_number)
        if existing is None:
            raise
        return _same_or_conflict(existing, fingerprint, source), False
    session.add(order)
    audit.record(
        session,
        actor=actor,
        action="order.created",
        object_type="operations_request",
        object_id=body.order_number,
        after=body.model_dump(mode="json") | {"state": order.state, "late": order.late},
    )
    try:
        # A number already taken fails here (its unique key): no read before the write.
        session.commit()
    except IntegrityError:
        # Posted before (a retry), or by another request between our read and our write.
        session.rollback()
        existing = _by_number(session, body.order_number)
        if existing is None:
            raise
        return _same_or_conflict(existing, fingerprint, source), False
    return order, True


def _new_order(
    session: Session, body: ProductionOrderIn, fingerprint: str, source: str | None
) -> OperationsRequest:
    """The new order with its segment requirements, not yet added; a 422 ``DomainError``
    naming the field when the product, its routing, the unit or the ERP's segments do not
    fit."""
    erp = body.erp if isinstance(body, ErpProductionOrderIn) else None

    # The product, its routing, each step's materials and process segment (which the ERP's
    # first report names): one statement.
    routing = (
        session.execute(
            select(OperationsDefinition)
            .join(OperationsDefinition.product)
            .where(MaterialDefinition.external_id == body.product)
            .options(
                contains_eager(OperationsDefinition.product),
                joinedload(OperationsDefinition.segments).options(
                    joinedload(OperationsSegment.materials),
                    joinedload(OperationsSegment.process_segment),
                ),
            )
            .order_by(OperationsDefinition.id)
            .limit(1)
        )
        .unique()
        .scalar_one_or_none()
    )
    if routing is None:
        known = session.scalar(
            select(MaterialDefinition.id).where(MaterialDefinition.external_id == body.product)
        )
        if known is None:
            raise invalid("product", f"unknown product {body.product!r}")
    if routing is None or not routing.segments:
        raise invalid("product", f"product {body.product!r} has no routing")
    product = routing.product
    quantity = in_product_unit(body, product)

    now = utcnow()
    order = OperationsRequest(
        external_id=body.order_number,
        operations_definition=routing,
        product=product,
        source=source,
        quantity=quantity,
        unit=product.unit,
        erp_schedule_id=erp.schedule_id if erp else None,
        priority=body.priority,
        due=body.due,
        customer_order=body.customer_order,
        state=RequestState.RELEASED,
        # A due date already past is accepted (the ERP knows best) but flagged from the start.
        late=body.due < now,
        request_hash=fingerprint,
        workflow_id=order_workflow_id(body.order_number),
        created_at=now,
    )
    for segment in routing.segments:
        produced = [m for m in segment.materials if m.use == MaterialUse.PRODUCED]
        per_unit = produced[0].quantity if produced else Decimal(1)
        order.segment_requirements.append(
            SegmentRequirement(
                operations_segment=segment,
                sequence=segment.sequence,
                quantity=exact(per_unit * quantity),
                unit=produced[0].unit if produced else product.unit,
                state=RequestState.WAITING,
            )
        )
    if erp is not None:
        apply_segment_data(session, order, erp.segments)
    return order


@dataclass(frozen=True)
class _Step:
    segment_id: int
    sequence: int
    segment: str  # the operations segment's id
    process_segment: str | None
    per_unit: Decimal | None  # of the material the step produces (None: it names none)
    unit: str | None  # of that material


def _routing_steps(
    session: Session, product: str, source: str | None
) -> tuple[Row[Any] | None, list[_Step], str | None]:
    """The product's routing (its first) with the product, its steps in order with what each
    produces, and the format of ERP client ``source`` (None: no such client): one statement,
    rows not objects."""
    routing, made = aliased(OperationsDefinition), aliased(MaterialDefinition)
    first_routing = (
        select(func.min(routing.id))
        .join(made, made.id == routing.material_definition_id)
        .where(made.external_id == product)
        .scalar_subquery()
    )

    def produced(column: Any) -> Any:
        # What the step makes (its first produced material): a correlated subquery, as
        # SQLite has no LATERAL.
        return (
            select(column)
            .where(
                OperationsMaterialSpec.operations_segment_id == OperationsSegment.id,
                OperationsMaterialSpec.use == MaterialUse.PRODUCED,
            )
            .order_by(OperationsMaterialSpec.id)
            .limit(1)
            .scalar_subquery()
        )

    rows = session.execute(
        select(
            MaterialDefinition.id.label("product_id"),
            MaterialDefinition.unit.label("product_unit"),
            OperationsDefinition.id.label("routing_id"),
            OperationsDefinition.external_id.label("routing"),
            OperationsSegment.id.label("segment_id"),
            OperationsSegment.sequence,
            OperationsSegment.external_id.label("segment"),
            ProcessSegment.external_id.label("process_segment"),
            produced(OperationsMaterialSpec.quantity).label("quantity"),
            produced(OperationsMaterialSpec.unit).label("unit"),
            select(ErpClient.format).where(ErpClient.name == source).scalar_subquery(),
        )
        .select_from(MaterialDefinition)
        .outerjoin(
            OperationsDefinition,
            (OperationsDefinition.material_definition_id == MaterialDefinition.id)
            & (OperationsDefinition.id == first_routing),
        )
        .outerjoin(
            OperationsSegment,
            OperationsSegment.operations_definition_id == OperationsDefinition.id,
        )
        .outerjoin(ProcessSegment, ProcessSegment.id == OperationsSegment.process_segment_id)
        .where(MaterialDefinition.external_id == product)
        .order_by(OperationsSegment.sequence)
    ).all()
    if not rows:
        return None, [], None
    steps = [
        _Step(r.segment_id, r.sequence, r.segment, r.process_segment, r.quantity, r.unit)
        for r in rows
        if r.segment_id is not None
    ]
    return rows[0], steps, rows[0][-1]


def insert_order(
    session: Session, body: ProductionOrderIn, actor: str, source: str | None
) -> tuple[ProductionOrderOut, bool]:
    """``create_order`` for an order without ERP segment data (the JSON route), in rows
    rather than objects: the same rows, audit event and ERP message, for a fraction of the
    CPU (the unit of work and the loading of the routing as objects cost more than the
    statements). Returns the order's view and whether it is new."""
    fingerprint = body.fingerprint()
    try:
        head, steps, fmt = _routing_steps(session, body.product, source)
        if head is None:
            raise invalid("product", f"unknown product {body.product!r}")
        if head.routing_id is None or not steps:
            raise invalid("product", f"product {body.product!r} has no routing")
        f = units.factor(body.unit, head.product_unit)
        if f is None:
            raise invalid("unit", f"product {body.product!r} is made in {head.product_unit!r}")
    except DomainError:
        existing = _by_number(session, body.order_number)
        if existing is None:
            raise
        return _existing_out(session, _same_or_conflict(existing, fingerprint, source)), False
    quantity = exact(body.quantity if f == 1 else body.quantity * f)
    now = utcnow()
    order = {
        "external_id": body.order_number,
        "operations_definition_id": head.routing_id,
        "material_definition_id": head.product_id,
        "source": source,
        "quantity": quantity,
        "unit": head.product_unit,
        "erp_schedule_id": None,
        "priority": body.priority,
        "due": body.due,
        "customer_order": body.customer_order,
        "state": RequestState.RELEASED,
        # A due date already past is accepted (the ERP knows best) but flagged from the start.
        "late": body.due < now,
        "request_hash": fingerprint,
        "workflow_id": order_workflow_id(body.order_number),
        "created_at": now,
    }
    connection = session.connection()
    try:
        # A number already taken fails here (its unique key): no read before the write.
        order_id: int = connection.execute(_INSERT_ORDER, order).scalar_one()
    except IntegrityError:
        session.rollback()
        existing = _by_number(session, body.order_number)
        if existing is None:
            raise
        return _existing_out(session, _same_or_conflict(existing, fingerprint, source)), False
    connection.execute(
        _INSERT_STEPS,
        [
            {
                "operations_request_id": order_id,
                "operations_segment_id": step.segment_id,
                "sequence": step.sequence,
                "quantity": exact(
                    (step.per_unit if step.per_unit is not None else Decimal(1)) * quantity
                ),
                "unit": step.unit if step.per_unit is not None else head.product_unit,
                "state": RequestState.WAITING,
            }
            for step in steps
        ],
    )
    if source is not None and fmt is not None:
        message = reporting.released_message(
            order_id,
            body.order_number,
            head.routing,
            [(step.sequence, step.process_segment or step.segment, step.segment) for step in steps],
            source,
            fmt,
        )
        connection.execute(_INSERT_MESSAGE, message)
    audit.record(
        session,
        actor=actor,
        action="order.created",
        object_type="operations_request",
        object_id=body.order_number,
        after=body.model_dump(mode="json") | {"state": order["state"], "late": order["late"]},
    )
    session.commit()
    return (
        ProductionOrderOut(
            id=order_id,
            order_number=body.order_number,
            product=body.product,
            quantity=quantity,
            unit=head.product_unit,
            priority=body.priority,
            due=body.due,
            customer_order=body.customer_order,
            state=RequestState.RELEASED,
            late=order["late"],
            created_at=now,
            started_at=None,
            completed_at=None,
            workflow_id=order["workflow_id"],
            links={"self": f"/api/v1/production-orders/{order_id}"},
            job_orders=[],
            produced_lots=[],
        ),
        True,
    )


_INSERT_ORDER = insert(OperationsRequest).returning(OperationsRequest.id)
_INSERT_STEPS = insert(SegmentRequirement)
_INSERT_MESSAGE = insert(ErpMessage)


def _existing_out(session: Session, order: OperationsRequest) -> ProductionOrderOut:
    return order_out(session, get_order(session, order.id))


def apply_segment_data(
    session: Session, order: OperationsRequest, segments: list[ErpSegmentData]
) -> None:
    """Map the ERP's segment requirements onto the new order's steps and keep their data;
    a 422 naming every problem (the B2MML route checks first, with ``check_segments``)."""
    plans, problems = plan_segments(session, order.operations_definition, order.quantity, segments)
    if problems:
        raise invalid("segments", "; ".join(problems))
    apply_plans(order.segment_requirements, plans)


def check_segments(session: Session, body: ErpProductionOrderIn) -> list[str]:
    """Every problem of the ERP's segment data for a new order, without writing."""
    if _by_number(session, body.order_number) is not None:
        return []
    product = session.scalar(
        select(MaterialDefinition).where(MaterialDefinition.external_id == body.product)
    )
    if product is None:
        return []
    routing = session.scalar(
        select(OperationsDefinition)
        .where(OperationsDefinition.material_definition_id == product.id)
        .order_by(OperationsDefinition.id)
    )
    if routing is None:
        return []
    _, problems = plan_segments(session, routing, in_product_unit(body, product), body.erp.segments)
    return problems


def in_product_unit(body: ProductionOrderIn, product: MaterialDefinition) -> Decimal:
    """The order's quantity in the product's unit: ``EA`` is ``ea``, ``t`` converts to ``kg``;
    a 422 naming the unit when it is not one the product can be counted in."""
    f = units.factor(body.unit, product.unit)
    if f is None:
        raise invalid("unit", f"product {body.product!r} is made in {product.unit!r}")
    return exact(body.quantity if f == 1 else body.quantity * f)


def _by_number(
    session: Session, number: str, source: str | None = None
) -> OperationsRequest | None:
    """The order with this number; with ``source``, only if that ERP client sent it."""
    return session.scalar(
        select(OperationsRequest).where(_sent_by(source), OperationsRequest.external_id == number)
    )


def _sent_by(source: str | None) -> ColumnElement[bool]:
    """Orders ERP client ``source`` sent (None: every order)."""
    return true() if source is None else OperationsRequest.source == source


def _same_or_conflict(
    existing: OperationsRequest, fingerprint: str, source: str | None
) -> OperationsRequest:
    if existing.source != source:
        # Another client's order: whether its content is the same is not this client's to know.
        raise Conflict(
            f"order number {existing.external_id!r} is taken; an order number can be used once"
        )
    if existing.request_hash != fingerprint:
        raise Conflict(
            f"order {existing.external_id!r} exists with different content; "
            "an order number can be used once"
        )
    return existing


def get_order(session: Session, order_id: int, source: str | None = None) -> OperationsRequest:
    """The order with its steps, job orders and product loaded, or ``NotFound`` (also when
    ``source`` is given and another ERP client sent it)."""
    order = session.scalar(
        select(OperationsRequest)
        .where(_sent_by(source), OperationsRequest.id == order_id)
        .options(
            selectinload(OperationsRequest.product),
            selectinload(OperationsRequest.segment_requirements)
            .selectinload(SegmentRequirement.job_order)
            .options(
                selectinload(JobOrder.work_master),
                selectinload(JobOrder.equipment),
            ),
            selectinload(OperationsRequest.segment_requirements).selectinload(
                SegmentRequirement.operations_segment
            ),
        )
    )
    if order is None:
        raise NotFound("production order", str(order_id))
    return order


def new_order_out(order: OperationsRequest) -> ProductionOrderOut:
    """The API view of an order just stored: no job orders and no lots yet."""
    return _order_view(order, [], [])


def order_out(session: Session, order: OperationsRequest) -> ProductionOrderOut:
    """The API view of an order: state, due, job orders and produced lots."""
    jobs: list[JobOrderOut] = []
    for req in order.segment_requirements:
        job = req.job_order
        if job is None:
            continue
        jobs.append(
            JobOrderOut(
                id=job.external_id,
                step=req.sequence,
                segment=req.operations_segment.external_id,
                work_master=job.work_master.external_id,
                equipment=job.equipment.external_id,
                state=job.state,
                dispatched_at=job.dispatched_at,
                started_at=job.started_at,
                ended_at=job.ended_at,
            )
        )
    return _order_view(order, jobs, produced_lots(session, order))


def _order_view(
    order: OperationsRequest, jobs: list[JobOrderOut], lots: list[LotOut]
) -> ProductionOrderOut:
    return ProductionOrderOut(
        id=order.id,
        order_number=order.external_id,
        product=order.product.external_id,
        quantity=order.quantity,
        unit=order.unit,
        priority=order.priority,
        due=order.due,
        customer_order=order.customer_order,
        state=order.state,
        late=order.late,
        created_at=order.created_at,
        started_at=order.started_at,
        completed_at=order.completed_at,
        workflow_id=order.workflow_id,
        links={"self": f"/api/v1/production-orders/{order.id}"},
        job_orders=jobs,
        produced_lots=lots,
    )


def produced_lots(session: Session, order: OperationsRequest) -> list[LotOut]:
    """Lots of the order's product made by its job orders."""
    actuals = [
        a
        for a in execution.produced_actuals(session, order.id)
        if a.material_definition_id == order.material_definition_id
    ]
    return [
        LotOut(
            lot=a.material_lot.external_id,
            material=a.material_definition.external_id,
            quantity=a.quantity,
            unit=a.unit,
        )
        for a in actuals
    ]


def list_orders(
    session: Session,
    state: str | None = None,
    paging: Paging = FIRST_PAGE,
    source: str | None = None,
) -> tuple[list[OperationsRequest], str | None]:
    """Orders, newest first, optionally only those in one state; with ``source``, only those
    that ERP client sent. With the cursor of the next page (None on the last)."""
    q = (
        select(OperationsRequest)
        .where(_sent_by(source))
        .options(selectinload(OperationsRequest.product))
    )
    if state is not None:
        q = q.where(OperationsRequest.state == state)
    return fetch_page(
        session,
        q,
        kind="production-orders",
        keys=(SortKey(OperationsRequest.id, descending=True),),
        types=(int,),
        paging=paging,
        key_of=lambda o: (o.id,),
    )


def set_order_state(
    session: Session, order_id: int, state: str, actor: str, reason: str | None
) -> None:
    """Record a supervisor's change of a whole order's state (held, resumed), after its
    work orders took the action."""
    order = locked_order(session, order_id)
    if order is None:
        raise NotFound("production order", str(order_id))
    if order.state not in FINAL_STATES:
        transitions.change_state(session, order, state, actor, reason)
    session.commit()


def cancel_unstarted(session: Session, order_id: int, actor: str, reason: str | None) -> bool:
    """Cancel the order in the database if its workflow has not started; False (nothing
    done) when it has: then the cancel is its workflow's.

    Under the order's lock (``order_lock``, ``locked_order``), so the relay cannot start
    the workflow meanwhile; it later starts one that plans nothing and delivers the order's
    ERP messages, the Cancelled one included (woken at commit)."""
    with order_lock(session):
        order = locked_order(session, order_id)
        if order is None:
            raise NotFound("production order", str(order_id))
        if order.workflow_started_at is not None:
            session.rollback()
            return False
        if order.state in FINAL_STATES:
            raise Conflict(f"order {order.external_id} is {order.state}; it takes no cancel")
        transitions.change_state(session, order, RequestState.CANCELLED, actor, reason)
        order.completed_at = utcnow()
        _notify_relays(session)
        session.commit()
    wake_relays()
    return True


def _notify_relays(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        # Delivered at commit, and only if it commits.
        session.execute(text(f"NOTIFY {START_CHANNEL}"))


def set_order_priority(
    session: Session, order_id: int, priority: int, actor: str, reason: str | None
) -> bool:
    """Record a new priority for a whole order; returns whether its workflow has started
    (then its open work orders are the workflow's to change; before, the workflow plans them
    with the new one). Under the order's lock (``locked_order``)."""
    with order_lock(session):
        order = locked_order(session, order_id)
        if order is None:
            raise NotFound("production order", str(order_id))
        started = order.workflow_started_at is not None
        if order.priority != priority:
            before = order.priority
            order.priority = priority
            audit.record(
                session,
                actor=actor,
                action="operations_request.changed",
                object_type="operations_request",
                object_id=order.external_id,
                before={"priority": before},
                after={"priority": priority},
                reason=reason,
            )
        session.commit()
    return started


def check_order(session: Session, body: ProductionOrderIn, source: str | None = None) -> None:
    """Everything ``create_order`` would refuse, without writing: for all-or-nothing batches."""
    existing = _by_number(session, body.order_number)
    if existing is not None:
        _same_or_conflict(existing, body.fingerprint(), source)
        return
    product = session.scalar(
        select(MaterialDefinition).where(MaterialDefinition.external_id == body.product)
    )
    if product is None:
        raise invalid("product", f"unknown product {body.product!r}")
    routing = session.scalar(
        select(OperationsDefinition).where(
            OperationsDefinition.material_definition_id == product.id
        )
    )
    if routing is None:
        raise invalid("product", f"product {body.product!r} has no routing")
    in_product_unit(body, product)


def change_order(
    session: Session,
    order_number: str,
    actor: str,
    quantity: Decimal | None = None,
    due: datetime | None = None,
    priority: int | None = None,
    source: str | None = None,
) -> tuple[bool, str | None]:
    """Change quantity, due or priority of an order until a machine starts on it (with
    ``source``, only an order that ERP client sent: another's is unknown).

    Work orders already queued on a PLC are sent again as they are now (the caller tells
    their workflows: ``WorkflowClient.order_changed``). Returns (accepted, reason); once a
    machine started a work order of it the change is refused with the reason, and nothing
    changes.
    """
    with order_lock(session):
        answer = _change_order(session, order_number, actor, quantity, due, priority, source)
        session.commit()  # the lock goes with the transaction, changed or not
    return answer


def _change_order(
    session: Session,
    order_number: str,
    actor: str,
    quantity: Decimal | None,
    due: datetime | None,
    priority: int | None,
    source: str | None,
) -> tuple[bool, str | None]:
    # Locked: a relay starting the workflow is waited for, and the workflow's planning
    # (``execution.plan_order`` locks it too) comes before or after, not in between.
    order = locked_order(session, number=order_number, source=source)
    if order is None:
        return False, f"unknown order {order_number}"
    jobs = [r.job_order for r in order.segment_requirements if r.job_order is not None]
    if order.state in FINAL_STATES or order.started_at or any(j.started_at for j in jobs):
        return False, f"order {order_number} is {order.state} and has started; it cannot change"
    if quantity is not None and not (0 < quantity <= 1e9):
        return False, f"quantity {quantity} must be above 0"
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    if quantity is not None and quantity != order.quantity:
        before["quantity"], after["quantity"] = order.quantity, quantity
        for req in order.segment_requirements:
            req.quantity = exact(req.quantity / order.quantity * quantity)
            if req.job_order is not None:
                # Its materials are worked out again for the new amount when it is sent.
                req.job_order.material_requirements = None
        order.quantity = quantity
    if due is not None and due != order.due:
        before["due"], after["due"] = order.due.isoformat(), due.isoformat()
        order.due = due
        order.late = due < utcnow()
    if priority is not None and priority != order.priority:
        before["priority"], after["priority"] = order.priority, priority
        order.priority = priority
        for job in jobs:
            job.priority = priority
    if after:
        audit.record(
            session,
            actor=actor,
            action="operations_request.changed",
            object_type="operations_request",
            object_id=order_number,
            before=before,
            after=after,
        )
        session.commit()
    return True, None


def order_id_by_number(session: Session, order_number: str, source: str | None = None) -> int:
    """The id of the order with this number (with ``source``: that ERP client's), or
    ``NotFound``."""
    order = _by_number(session, order_number, source)
    if order is None:
        raise NotFound("production order", order_number)
    return order.id


def routing_of(session: Session, product: str) -> str:
    """The ISA-95 id of a product's routing (operations definition)."""
    routing = session.scalar(
        select(OperationsDefinition.external_id)
        .join(
            MaterialDefinition,
            MaterialDefinition.id == OperationsDefinition.material_definition_id,
        )
        .where(MaterialDefinition.external_id == product)
    )
    if routing is None:
        raise invalid("product", f"product {product!r} has no routing")
    return routing
