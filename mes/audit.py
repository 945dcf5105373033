"""The audit trail: append-only, hash-chained events written in the changing transaction.

``record`` queues an event on the session; just before the session commits, the queued
events get the next chain positions and hashes. Taking the chain head's row lock last in the
transaction orders concurrent writers without risking a deadlock with the rows they change.
``verify`` recomputes the whole chain and reports the first broken link.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from mes.models import AuditChainHead, AuditEvent, utcnow

SYSTEM = "system"
GENESIS = "0" * 64
_PENDING = "mes.audit.pending"


def record(
    session: Session,
    *,
    action: str,
    object_type: str,
    object_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    actor: str = SYSTEM,
    reason: str | None = None,
) -> AuditEvent:
    """Queue an audit event; it is chained and written when the session commits."""
    # Begin the database transaction now, so that a rollback of it drops the queued event.
    session.connection()
    ev = AuditEvent(
        occurred_at=utcnow(),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        before=before,
        after=after,
        reason=reason,
    )
    session.info.setdefault(_PENDING, []).append(ev)
    return ev


def event_hash(ev: AuditEvent, prev_hash: str) -> str:
    """SHA-256 over the event's content and the previous hash, in a canonical JSON form."""
    body = {
        "seq": ev.seq,
        "occurred_at": ev.occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": ev.actor,
        "action": ev.action,
        "object_type": ev.object_type,
        "object_id": ev.object_id,
        "before": ev.before,
        "after": ev.after,
        "reason": ev.reason,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    session.flush()  # the changed rows first; the chain head is the last lock we take
    head = session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(seq=AuditChainHead.seq + len(pending))
        .returning(AuditChainHead.seq, AuditChainHead.last_hash)
    ).one()
    seq, prev = head.seq - len(pending), head.last_hash
    for ev in pending:
        seq += 1
        ev.seq = seq
        ev.prev_hash = prev
        ev.hash = prev = event_hash(ev, prev)
        session.add(ev)
    session.execute(update(AuditChainHead).where(AuditChainHead.id == 1).values(last_hash=prev))
    session.flush()


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, _previous: object) -> None:
    # Fires on every rollback (also one with no database transaction begun yet, and on close).
    session.info.pop(_PENDING, None)


@dataclass
class ChainReport:
    """The result of recomputing the chain."""

    intact: bool
    events: int
    first_broken_seq: int | None = None
    reason: str | None = None
    checked_at: datetime | None = None


def verify(session: Session, batch: int = 5000) -> ChainReport:
    """Recompute every hash in order; report the first event whose link does not hold."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    while True:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.seq >= expected_seq)
            .order_by(AuditEvent.seq)
            .limit(batch)
        ).all()
        if not rows:
            break
        for ev in rows:
            count += 1
            if ev.seq != expected_seq:
                return _broken(expected_seq, f"event {expected_seq} is missing", count)
            if ev.prev_hash != prev:
                return _broken(ev.seq, "prev_hash does not match the previous event's hash", count)
            if event_hash(ev, prev) != ev.hash:
                return _broken(ev.seq, "the event's content does not match its hash", count)
            prev = ev.hash
            expected_seq += 1
        session.expunge_all()
    head = session.get(AuditChainHead, 1)
    if head is not None and (head.seq != expected_seq - 1 or head.last_hash != prev):
        return _broken(expected_seq, "events after the last one were removed", count)
    return ChainReport(intact=True, events=count, checked_at=utcnow())


def _broken(seq: int, reason: str, count: int) -> ChainReport:
    return ChainReport(
        intact=False, events=count, first_broken_seq=seq, reason=reason, checked_at=utcnow()
    )
