"""Audit trail routes (/api/v1/audit-events): the events in chain order, the chain check and
the signed checkpoints."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from mes import audit
from mes import audit_checkpoints as checkpoints
from mes.api.params import INT4_MAX, NEXT_AFTER, Paging, Period, text_filter
from mes.api.security import READ_AUDIT, allow, roles_note
from mes.db import Database
from mes.errors import DomainError
from mes.models import AuditEvent
from mes.paging import SortKey, fetch_page
from mes.settings import Settings

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
    next_after: str | None = Field(default=None, description=NEXT_AFTER)


class ChainReportOut(BaseModel):
    """The audit chain recomputed: intact, or the first broken link."""

    intact: bool
    events: int
    first_broken_seq: int | None
    reason: str | None
    checked_at: datetime | None
    checkpoints: int = Field(description="signed checkpoints the chain was compared with")
    anchored_seq: int | None = Field(
        description="the newest event a matching checkpoint vouches for; later events are "
        "protected by the hash chain alone"
    )
    full: bool = Field(description="every event recomputed from the first")
    started_after_seq: int = Field(
        description="the recomputation started after this event, a signed checkpoint whose "
        "event still has the signed hash (0: from the first event); the events up to it are "
        "vouched for by that checkpoint, not recomputed"
    )


class CheckpointOut(BaseModel):
    """Event ``seq`` had hash ``hash`` at ``at``: signed (Ed25519, base64) by key ``key_id``
    over the canonical JSON of ``{context: "mes-audit-checkpoint-v1", seq, hash, at}``."""

    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: str


class CheckpointsOut(BaseModel):
    """The signed checkpoints kept outside the database, and the key to check them with."""

    key_id: str | None = Field(description="the signing key's id; null: no key configured")
    public_key: str | None = Field(description="its Ed25519 public key, PEM")
    items: list[CheckpointOut]


def _audit_page(
    s: Session,
    object_type: str | None,
    object_id: str | None,
    actor: str | None,
    interval: Period,
    paging: Paging,
) -> tuple[list[AuditEventOut], str | None]:
    q = select(AuditEvent)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if actor:
        q = q.where(AuditEvent.actor.startswith(actor, autoescape=True))
    if interval.since:
        q = q.where(AuditEvent.occurred_at >= interval.since)
    if interval.until:
        q = q.where(AuditEvent.occurred_at < interval.until)
    rows, next_after = fetch_page(
        s,
        q,
        kind="audit-events",
        keys=(SortKey(AuditEvent.seq),),
        types=(int,),
        paging=paging,
        key_of=lambda e: (e.seq,),
    )
    return [AuditEventOut.model_validate(r, from_attributes=True) for r in rows], next_after


def _verify_key(settings: Settings) -> Ed25519PublicKey | None:
    """The checkpoint key's public half; None when no key is configured."""
    if settings.audit_key_file is None:
        return None
    try:
        return checkpoints.load_verify_key(settings.audit_key_file)
    except (OSError, ValueError) as e:
        raise DomainError(
            title="Audit key unavailable",
            detail="the checkpoint key (MES_AUDIT_KEY_FILE) cannot be read",
            status=503,
        ) from e


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
        paging: NamedDependency[Paging],
        interval: NamedDependency[Period],
        object_type: Annotated[str | None, text_filter()] = None,
        object_id: Annotated[str | None, text_filter()] = None,
        actor: Annotated[str | None, text_filter("The actor's name starts with this")] = None,
    ) -> AuditPage:
        items, next_after = await db.run(
            lambda s: _audit_page(s, object_type, object_id, actor, interval, paging)
        )
        return AuditPage(
            items=items, limit=paging.limit, offset=paging.offset, next_after=next_after
        )

    @get(
        "/verify",
        guards=[allow(READ_AUDIT)],
        summary="Recompute the hash chain; report the first broken link",
        description="With a checkpoint key configured, the chain is also compared with every "
        "signed checkpoint: an edit whose later hashes were recomputed, events removed from "
        "the end, and checkpoint lines whose signature does not hold are reported. By "
        "default the chain is recomputed from the newest signed checkpoint whose event still "
        "has the signed hash (`started_after_seq`), after checking every checkpoint's event "
        "hash; `full=true` recomputes every event from the first, which also finds an older "
        "event edited without recomputing the later hashes. Without a key it is always "
        "full. " + roles_note(READ_AUDIT),
    )
    async def verify(
        self,
        db: NamedDependency[Database],
        settings: NamedDependency[Settings],
        full: Annotated[
            bool, QueryParameter(description="recompute every event from the first")
        ] = False,
    ) -> ChainReportOut:
        key = await asyncio.to_thread(_verify_key, settings)
        if key is None:
            report = await db.run(audit.verify)
        else:
            path = settings.audit_checkpoint_file
            report = await db.run(lambda s: checkpoints.verify(s, path, key, full=full))
        return ChainReportOut.model_validate(report, from_attributes=True)

    @get(
        "/checkpoints",
        guards=[allow(READ_AUDIT)],
        summary="The signed checkpoints of the chain, kept outside the database",
        description="Checkpoints after event `after_seq`, oldest first, as the checkpoint "
        "file holds them (lines that are not checkpoints are left out; `verify` names "
        "them). Keep copies away from the plant: `mes audit verify --checkpoints` "
        "compares the chain with them. " + roles_note(READ_AUDIT),
    )
    async def list_checkpoints(
        self,
        settings: NamedDependency[Settings],
        after_seq: Annotated[int, QueryParameter(ge=0, le=INT4_MAX)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=10000)] = 1000,
    ) -> CheckpointsOut:
        def read() -> CheckpointsOut:
            public = _verify_key(settings)
            items = [
                CheckpointOut.model_validate(line.checkpoint, from_attributes=True)
                for line in checkpoints.read_lines(settings.audit_checkpoint_file)
                if line.checkpoint is not None and line.checkpoint.seq > after_seq
            ]
            return CheckpointsOut(
                key_id=checkpoints.key_id(public) if public else None,
                public_key=checkpoints.public_pem(public) if public else None,
                items=items[:limit],
            )

        return await asyncio.to_thread(read)
