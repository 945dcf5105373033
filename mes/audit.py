"""The audit trail: one row per state change or action, written in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from mes.models import AuditEvent

SYSTEM = "system"


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
    """Add an audit event to the session (the caller's commit makes it durable with the change)."""
    event = AuditEvent(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        before=before,
        after=after,
        reason=reason,
    )
    session.add(event)
    return event
