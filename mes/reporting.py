"""Reporting production back to the ERP: an outbox written with every order state change.

Whenever an order's state changes (released, running, held, completed, aborted, cancelled),
the same database transaction adds an ``erp_message`` with the order's performance as it is
then; the document (B2MML ``SyncOperationsPerformance`` or its JSON equivalent, as the ERP
client asked) is rendered from it when the message is first delivered, outside the order's
transaction, and kept.
One session hook does this for every writer, so no code path can change a state and forget
the report. The order's workflow delivers the messages in order (``undelivered`` and
``mark_attempt`` below, called by its delivery activity), retrying with backoff while the ERP is
away; each message keeps one ``message_id`` (the BODID) so the ERP can drop duplicates.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from sqlalchemy import event, func, inspect, select, update
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from mes import audit
from mes.b2mml import (
    MaterialActualData,
    OperationsPerformanceData,
    SegmentResponseData,
    sync_operations_performance,
)
from mes.callbacks import CallbackPolicy, CallbackRefused, new_secret
from mes.errors import DomainError, FieldError, NotFound
from mes.models import (
    ErpClient,
    ErpMessage,
    JobOrder,
    JobResponse,
    MaterialActual,
    OperationsRequest,
    OperationsSegment,
    RequestState,
    SegmentRequirement,
    utcnow,
)

SENDER = "MES"
B2MML_XML = "application/xml"
JSON = "application/json"


class ErpClientIn(BaseModel):
    """Where an ERP client wants its callbacks, and in which format."""

    model_config = ConfigDict(extra="forbid")
    callback_url: HttpUrl = Field(
        description=(
            "https (plain http only to loopback); link-local, metadata, unspecified and, "
            "unless MES_CALLBACK_ALLOW lists them, loopback and private addresses are refused"
        )
    )
    format: str = Field(pattern="^(json|b2mml)$", description='"json" or "b2mml"')


class ErpClientOut(BaseModel):
    name: str
    callback_url: str
    format: str
    signing_secret: str | None = Field(
        default=None,
        description=(
            "The key of the HMAC-SHA256 signature every callback carries; shown only in the "
            "answer that created the client or rotated its secret. Keep it."
        ),
    )


def set_erp_client(
    session: Session,
    name: str,
    body: ErpClientIn,
    policy: CallbackPolicy,
    actor: str = audit.SYSTEM,
) -> ErpClientOut:
    """Create or change the callback settings of the ERP client ``name`` (its token's name).

    The URL must pass ``policy`` (else a 422 naming ``callback_url``). A new client gets a
    signing secret, returned this once.
    """
    url = str(body.callback_url)
    try:
        policy.check_url(url)
    except CallbackRefused as e:
        raise DomainError(
            title="Callback URL refused",
            detail=f"callback_url: {e}",
            errors=[FieldError("callback_url", str(e))],
        ) from None
    client = session.scalar(select(ErpClient).where(ErpClient.name == name))
    before = (
        None if client is None else {"callback_url": client.callback_url, "format": client.format}
    )
    secret = None
    if client is None:
        secret = new_secret()
        client = ErpClient(name=name, callback_url=url, format=body.format, signing_secret=secret)
        session.add(client)
    else:
        client.callback_url, client.format = url, body.format
        client.updated_at = utcnow()
    after = {"callback_url": url, "format": body.format}
    if before != after:
        audit.record(
            session,
            actor=actor,
            action="erp_client.set",
            object_type="erp_client",
            object_id=name,
            before=before,
            after=after,
        )
    session.commit()
    return ErpClientOut(
        name=name, callback_url=client.callback_url, format=client.format, signing_secret=secret
    )


def rotate_secret(session: Session, name: str, actor: str = audit.SYSTEM) -> ErpClientOut:
    """Give the ERP client ``name`` a new signing secret (returned this once); every callback
    sent from now on is signed with it."""
    client = session.scalar(select(ErpClient).where(ErpClient.name == name))
    if client is None:
        raise NotFound("ERP client", name)
    client.signing_secret = secret = new_secret()
    client.updated_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action="erp_client.rotate_secret",
        object_type="erp_client",
        object_id=name,
    )
    session.commit()
    return ErpClientOut(
        name=name, callback_url=client.callback_url, format=client.format, signing_secret=secret
    )


def get_erp_client(session: Session, name: str) -> ErpClientOut:
    client = session.scalar(select(ErpClient).where(ErpClient.name == name))
    if client is None:
        raise NotFound("ERP client", name)
    return ErpClientOut(name=name, callback_url=client.callback_url, format=client.format)


def performance(session: Session, order: OperationsRequest) -> OperationsPerformanceData:
    """The order's performance now: one segment response per routing step, with its lots."""
    if order.id is not None and "segment_requirements" in inspect(order).unloaded:
        # What the answer needs, in a few statements instead of one per relationship: the
        # eager loaders fill what is not loaded yet and leave what the session changed.
        with session.no_autoflush:
            session.execute(
                select(OperationsRequest)
                .where(OperationsRequest.id == order.id)
                .options(
                    joinedload(OperationsRequest.operations_definition),
                    selectinload(OperationsRequest.segment_requirements).options(
                        joinedload(SegmentRequirement.operations_segment).joinedload(
                            OperationsSegment.process_segment
                        ),
                        joinedload(SegmentRequirement.job_order).options(
                            joinedload(JobOrder.equipment),
                            joinedload(JobOrder.job_response)
                            .selectinload(JobResponse.material_actuals)
                            .options(
                                joinedload(MaterialActual.material_definition),
                                joinedload(MaterialActual.material_lot),
                            ),
                        ),
                    ),
                )
            ).all()
    # The relationship, not a query: a new order's steps are not in the database yet.
    requirements = order.segment_requirements
    segments = []
    for req in requirements:
        job = req.job_order
        response = job.job_response if job else None
        segment = req.operations_segment
        segments.append(
            SegmentResponseData(
                id=job.external_id if job else f"{order.external_id}-{req.sequence:02d}",
                process_segment_id=(
                    segment.process_segment.external_id
                    if segment.process_segment
                    else segment.external_id
                ),
                state=req.state,
                actual_start=job.started_at if job else None,
                actual_end=job.ended_at if job else None,
                operations_segment_id=segment.external_id,
                segment_requirement_id=req.erp_id,
                job_response_id=response.external_id if response else None,
                equipment_id=job.equipment.external_id if job else None,
                material_actuals=[
                    MaterialActualData(
                        material_definition_id=a.material_definition.external_id,
                        quantity=a.quantity,
                        unit=a.unit,
                        use=a.use,
                        lot_id=a.material_lot.external_id,
                    )
                    for a in (response.material_actuals if response else [])
                ],
            )
        )
    return OperationsPerformanceData(
        order_number=order.external_id,
        state=order.state,
        operations_definition_id=order.operations_definition.external_id,
        actual_start=order.started_at,
        actual_end=order.completed_at,
        segments=segments,
        schedule_id=order.erp_schedule_id,
    )


def render(perf: OperationsPerformanceData, fmt: str, message_id: str) -> tuple[str, str]:
    """The document in the client's format: (content type, body)."""
    if fmt == "b2mml":
        return B2MML_XML, sync_operations_performance(perf, message_id, SENDER).decode()
    body = {"message_id": message_id, "sender": SENDER, "operations_performance": perf.to_json()}
    return JSON, json.dumps(body, sort_keys=True)


def released_message(
    order_id: int,
    order_number: str,
    routing: str,
    steps: list[tuple[int, str, str]],
    client: str,
    fmt: str,
) -> dict[str, Any]:
    """The outbox row of a new order's first message (Released, every step Waiting), as
    ``_outbox`` writes it for an order the unit of work stores: for a writer that inserts
    the order's rows itself (``production_orders.insert_order``), in its transaction.
    ``steps``: (sequence, process segment id, operations segment id) in routing order."""
    perf = OperationsPerformanceData(
        order_number=order_number,
        state=RequestState.RELEASED,
        operations_definition_id=routing,
        actual_start=None,
        actual_end=None,
        segments=[
            SegmentResponseData(
                id=f"{order_number}-{sequence:02d}",
                process_segment_id=process_segment,
                state=RequestState.WAITING,
                operations_segment_id=segment,
            )
            for sequence, process_segment, segment in steps
        ],
    )
    # Rendered at delivery (``undelivered``), as every message is.
    return {
        "operations_request_id": order_id,
        "seq": 1,
        "message_id": f"MES-{order_number}-{1:04d}",
        "erp_client": client,
        "state": perf.state,
        "content_type": B2MML_XML if fmt == "b2mml" else JSON,
        "performance": perf.to_json(),
        "body": None,
    }


def _outbox(session: Session, _context: object, _instances: object) -> None:
    """Add an ERP message for every order whose state this flush changes (or creates)."""
    changed = [
        o
        for o in list(session.new) + list(session.dirty)
        if isinstance(o, OperationsRequest)
        and o.source
        and (o in session.new or inspect(o).attrs.state.history.has_changes())
    ]
    if not changed:
        return
    with session.no_autoflush:
        for order in changed:
            client = session.scalar(select(ErpClient).where(ErpClient.name == order.source))
            if client is None:
                continue
            seq = 1 + _last_seq(session, order)
            # The performance as it is now; the document is rendered at delivery
            # (``undelivered``), outside this transaction.
            session.add(
                ErpMessage(
                    operations_request=order,
                    seq=seq,
                    message_id=f"MES-{order.external_id}-{seq:04d}",
                    erp_client=client.name,
                    state=order.state,
                    content_type=B2MML_XML if client.format == "b2mml" else JSON,
                    performance=performance(session, order).to_json(),
                )
            )


def _last_seq(session: Session, order: OperationsRequest) -> int:
    pending = [
        m.seq for m in session.new if isinstance(m, ErpMessage) and m.operations_request is order
    ]
    stored = (
        session.scalar(
            select(func.max(ErpMessage.seq)).where(ErpMessage.operations_request_id == order.id)
        )
        if order.id is not None
        else None
    )
    return max([stored or 0, *pending])


class Delivery(BaseModel):
    """The next message to send for an order, and where to."""

    id: int
    message_id: str
    order_number: str
    url: str
    content_type: str
    body: str
    #: The client's secret the delivery signs with (it never leaves the activity).
    signing_secret: str


def undelivered(session: Session, order_id: int) -> list[Delivery]:
    """The order's messages not yet delivered (nor refused for good), oldest first, in one
    statement; those not rendered yet are rendered now (once: a retry sends the same
    document) and kept."""
    rows = session.execute(
        select(
            ErpMessage,
            OperationsRequest.external_id,
            ErpClient.callback_url,
            ErpClient.signing_secret,
        )
        .join(ErpClient, ErpClient.name == ErpMessage.erp_client)
        .join(OperationsRequest, OperationsRequest.id == ErpMessage.operations_request_id)
        .where(
            ErpMessage.operations_request_id == order_id,
            ErpMessage.delivered_at.is_(None),
            ErpMessage.rejected_at.is_(None),
        )
        .order_by(ErpMessage.seq)
    ).all()
    if not rows:
        return []
    rendered = False
    for msg, *_ in rows:
        if msg.body is None:
            perf = OperationsPerformanceData.from_json(msg.performance or {})
            fmt = "b2mml" if msg.content_type == B2MML_XML else "json"
            msg.content_type, msg.body = render(perf, fmt, msg.message_id)
            rendered = True
    deliveries = [
        Delivery(
            id=msg.id,
            message_id=msg.message_id,
            order_number=number,
            url=url,
            content_type=msg.content_type,
            body=msg.body or "",
            signing_secret=secret,
        )
        for msg, number, url, secret in rows
    ]
    if rendered:
        session.commit()
    return deliveries


def mark_attempt(session: Session, message_pk: int, error: str | None, rejected: bool) -> None:
    """Record a delivery attempt: delivered (no error), failed for now, or refused for good;
    one UPDATE."""
    now = utcnow()
    session.execute(
        update(ErpMessage)
        .where(ErpMessage.id == message_pk)
        .values(
            attempts=ErpMessage.attempts + 1,
            last_error=error,
            delivered_at=now if error is None else ErpMessage.delivered_at,
            rejected_at=now if error is not None and rejected else ErpMessage.rejected_at,
        )
    )
    session.commit()


def messages(session: Session, order_id: int) -> list[dict[str, Any]]:
    """The order's messages with their delivery state (for the API and the demo)."""
    rows = session.scalars(
        select(ErpMessage)
        .where(ErpMessage.operations_request_id == order_id)
        .order_by(ErpMessage.seq)
    )
    return [
        {
            "seq": m.seq,
            "message_id": m.message_id,
            "state": m.state,
            "content_type": m.content_type,
            "attempts": m.attempts,
            "delivered_at": m.delivered_at,
            "rejected_at": m.rejected_at,
            "last_error": m.last_error,
        }
        for m in rows
    ]


def install(factory: sessionmaker[Session]) -> None:
    """Write an ERP outbox row with every order state change made in a session of
    ``factory`` (in the same transaction, so the message exists exactly when the change
    does)."""
    event.listen(factory, "before_flush", _outbox)
