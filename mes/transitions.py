"""State changes of orders and work orders, with their audit events.

Shared by production (``mes.execution``), the supervisor's actions (``mes.work_orders``,
``mes.production_orders``) and quality dispositions (``mes.quality``), so none of those
needs another just for this.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from mes import audit
from mes.models import FINAL_STATES, JobOrder, OperationsRequest, utcnow


def change_state(
    session: Session,
    obj: JobOrder | OperationsRequest,
    state: str,
    actor: str = audit.SYSTEM,
    reason: str | None = None,
) -> None:
    """Move a job order or an order to ``state`` with its audit event; no-op if already there.

    A job order's step (segment requirement) follows it, and a job order ending gets its end
    time unless one is already known. The caller commits.
    """
    if obj.state == state:
        return
    before = obj.state
    obj.state = state
    if isinstance(obj, JobOrder):
        obj.segment_requirement.state = state
        if state in FINAL_STATES and obj.ended_at is None:
            obj.ended_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action=f"{obj.__tablename__}.state",
        object_type=obj.__tablename__,
        object_id=obj.external_id,
        before={"state": before},
        after={"state": state},
        reason=reason,
    )
