"""Audit trail routes (/api/v1/audit-events): the events in chain order and the chain check."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from mes import audit
from mes.api.params import Instant, Limit, Offset, text_filter
from mes.api.security import READ_AUDIT, allow, roles_note
from mes.db import Database
from mes.models import AuditEvent

API = "/api/v1"


class AuditEventOut(BaseModel):
    seq: int
    occurred_at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    limit: int
    offset: int


class ChainReportOut(BaseModel):
    """The audit chain recomputed: intact, or the first broken link."""

    intact: bool
    events: int
    first_broken_seq: int | None
    reason: str | None
    checked_at: datetime | None


def _audit_page(
    s: Session,
    object_type: str | None,
    object_id: str | None,
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> list[AuditEventOut]:
    q = select(AuditEvent)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if actor:
        q = q.where(AuditEvent.actor.startswith(actor, autoescape=True))
    if since:
        q = q.where(AuditEvent.occurred_at >= since)
    if until:
        q = q.where(AuditEvent.occurred_at < until)
    rows = s.scalars(q.order_by(AuditEvent.seq).limit(limit).offset(offset))
    return [AuditEventOut.model_validate(r, from_attributes=True) for r in rows]


class AuditController(Controller):
    path = f"{API}/audit-events"
    tags = ["audit"]

    @get(
        "/",
        guards=[allow(READ_AUDIT)],
        summary="Audit events, in chain order",
        description="Filter by object, actor (name prefix) and time. " + roles_note(READ_AUDIT),
    )
    async def list_events(
        self,
        db: NamedDependency[Database],
        object_type: Annotated[str | None, text_filter()] = None,
        object_id: Annotated[str | None, text_filter()] = None,
        actor: Annotated[str | None, text_filter("The actor's name starts with this")] = None,
        since: Annotated[Instant | None, QueryParameter()] = None,
        until: Annotated[Instant | None, QueryParameter()] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> AuditPage:
        items = await db.run(
            lambda s: _audit_page(s, object_type, object_id, actor, since, until, limit, offset)
        )
        return AuditPage(items=items, limit=limit, offset=offset)

    @get(
        "/verify",
        guards=[allow(READ_AUDIT)],
        summary="Recompute the hash chain; report the first broken link",
        description=roles_note(READ_AUDIT),
    )
    async def verify(self, db: NamedDependency[Database]) -> ChainReportOut:
        report = await db.run(audit.verify)
        return ChainReportOut.model_validate(report, from_attributes=True)
