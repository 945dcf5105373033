"""The audit trail: append-only, hash-chained events written in the changing transaction.

``record`` queues an event on the session; just before the session commits, the queued
events get the next chain positions and hashes. Taking the chain head's row lock last in the
transaction orders concurrent writers without risking a deadlock with the rows they change.
``verify`` recomputes the whole chain and reports the first broken link; given signed
checkpoints (``mes.audit_checkpoints``), it also catches a recomputed tail and a truncation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, event, insert, inspect, select, update
from sqlalchemy.orm import Session, sessionmaker

from mes import quantities
from mes.models import (
    AuditChainHead,
    AuditEvent,
    Base,
    ControllerEndpoint,
    Equipment,
    MaterialClass,
    MaterialDefinition,
    MaterialLot,
    OperationsDefinition,
    OperationsMaterialSpec,
    OperationsSegment,
    ProcessSegment,
    TestSpecification,
    WorkMaster,
    WorkMasterEquipment,
    WorkMasterParameter,
    utcnow,
)

SYSTEM = "system"
GENESIS = "0" * 64
_PENDING = "mes.audit.pending"
_ACTOR = "mes.audit.actor"
_WIRED = "mes.audit.wired"


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
    """Queue an audit event; it is chained and written when the session commits.

    The session must come from a factory wired by ``install`` (``mes.db.make_sessionmaker``):
    elsewhere the event could never be written, so it is refused.
    """
    if not session.info.get(_WIRED):
        raise RuntimeError("audit.record needs a session from mes.db.make_sessionmaker")
    # Begin the database transaction now, so that a rollback of it drops the queued event.
    session.connection()
    ev = AuditEvent(
        occurred_at=utcnow(),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        # JSON: quantities (``Decimal``) as numbers.
        before=quantities.plain(before),
        after=quantities.plain(after),
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


def act_as(session: Session, actor: str) -> None:
    """Name the actor of the changes this session makes until it commits or rolls back
    (the master data hook below records them under that name)."""
    session.info[_ACTOR] = actor


#: Master data: every row created, changed or deleted is audited by one hook, whoever writes.
_MASTER_DATA: tuple[type[Base], ...] = (
    Equipment,
    ControllerEndpoint,
    MaterialClass,
    MaterialDefinition,
    ProcessSegment,
    WorkMaster,
    WorkMasterParameter,
    WorkMasterEquipment,
    OperationsDefinition,
    OperationsSegment,
    OperationsMaterialSpec,
    TestSpecification,
)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else quantities.plain(value)


def _row(obj: Base) -> dict[str, Any]:
    return {
        c.key: _plain(getattr(obj, c.key))
        for c in inspect(obj).mapper.column_attrs
        if c.key != "id"
    }


def _row_id(obj: Base) -> str:
    key = getattr(obj, "external_id", None) or getattr(obj, "name", None)
    return str(key if key is not None else getattr(obj, "id", ""))[:120]


def _audit_master_data(session: Session, _context: object, _instances: object) -> None:
    actor = session.info.get(_ACTOR, SYSTEM)

    def add(action: str, obj: Base, before: Any = None, after: Any = None) -> None:
        record(
            session,
            actor=actor,
            action=f"master_data.{action}",
            object_type=obj.__tablename__,
            object_id=_row_id(obj),
            before=before,
            after=after,
        )

    for obj in session.new:
        if isinstance(obj, _MASTER_DATA):
            add("created", obj, after=_row(obj))
        elif isinstance(obj, MaterialLot):
            # Lots are not master data, but their creation (stock loaded, lot produced) is
            # audited here too; their consumption by the production service itself.
            record(
                session,
                actor=actor,
                action="lot.created",
                object_type="material_lot",
                object_id=obj.external_id,
                after=_row(obj),
            )
    for obj in session.dirty:
        audited = isinstance(obj, (*_MASTER_DATA, MaterialLot))
        if audited and session.is_modified(obj, include_collections=False):
            state = inspect(obj)
            before, after = {}, {}
            for attr in state.mapper.column_attrs:
                hist = state.attrs[attr.key].history
                if hist.has_changes():
                    before[attr.key] = _plain(hist.deleted[0]) if hist.deleted else None
                    after[attr.key] = _plain(hist.added[0]) if hist.added else None
            if not after:
                continue
            if isinstance(obj, MaterialLot):
                # A lot changed through the ORM (the ERP's stock sync); production's own
                # consumption is an UPDATE statement that records "lot.consumed" itself.
                record(
                    session,
                    actor=actor,
                    action="lot.updated",
                    object_type="material_lot",
                    object_id=obj.external_id,
                    before=before,
                    after=after,
                )
            else:
                add("updated", obj, before, after)
    for obj in session.deleted:
        if isinstance(obj, _MASTER_DATA):
            add("deleted", obj, before=_row(obj))


def _chain_pending(session: Session) -> None:
    # The changed rows first (their flush may queue events); the chain head is the last lock
    # the transaction takes: an UPDATE that leaves it as it is (the head's trigger lets that
    # through, and on SQLite it takes the write lock before the head is read).
    session.flush()
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    connection = session.connection()
    seq, prev = connection.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(seq=AuditChainHead.seq)
        .returning(AuditChainHead.seq, AuditChainHead.last_hash)
    ).one()
    rows = []
    for ev in pending:
        seq += 1
        ev.seq = seq
        ev.prev_hash = prev
        ev.hash = prev = event_hash(ev, prev)
        rows.append({c: getattr(ev, c) for c in _EVENT_COLUMNS})
    # The events exist before the head moves to the newest of them: its trigger checks that.
    # Written as rows, not through the unit of work: nothing reads them back in this session.
    connection.execute(_INSERT_EVENTS, rows)
    connection.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": prev})


_EVENT_COLUMNS = (
    "seq",
    "occurred_at",
    "actor",
    "action",
    "object_type",
    "object_id",
    "before",
    "after",
    "reason",
    "prev_hash",
    "hash",
)
_INSERT_EVENTS = insert(AuditEvent)
_MOVE_HEAD = (
    update(AuditChainHead)
    .where(AuditChainHead.id == 1)
    .values(seq=bindparam("new_seq"), last_hash=bindparam("new_hash"))
)


def _drop_pending(session: Session, _previous: object) -> None:
    session.info.pop(_PENDING, None)
    session.info.pop(_ACTOR, None)


def _forget_actor(session: Session) -> None:
    session.info.pop(_ACTOR, None)


def install(factory: sessionmaker[Session]) -> None:
    """Wire the audit trail into every session ``factory`` makes.

    At each flush, master data and lot changes queue their events; at commit, the queued
    events are chained (the chain head is the last row the transaction locks); a rollback
    drops them.
    """
    factory.kw.setdefault("info", {})[_WIRED] = True
    event.listen(factory, "before_flush", _audit_master_data)
    event.listen(factory, "before_commit", _chain_pending)
    event.listen(factory, "after_soft_rollback", _drop_pending)
    event.listen(factory, "after_commit", _forget_actor)


@dataclass(frozen=True)
class Anchor:
    """A chain position known from outside the database (a signed checkpoint): event
    ``seq`` had hash ``hash`` at time ``at``."""

    seq: int
    hash: str
    at: datetime


@dataclass
class ChainReport:
    """The result of recomputing the chain (and comparing it with the checkpoints)."""

    intact: bool
    events: int
    first_broken_seq: int | None = None
    reason: str | None = None
    checked_at: datetime | None = None
    #: How many signed checkpoints the chain was compared with.
    checkpoints: int = 0
    #: The newest event a matching checkpoint vouches for; later events are protected by
    #: the hash chain alone.
    anchored_seq: int | None = None
    #: Whether every event was recomputed from the first (False: from a trusted checkpoint).
    full: bool = True
    #: The recomputation started after this event (0: from the first event); events up to
    #: it were vouched for by the checkpoint there, not recomputed.
    started_after_seq: int = 0


def verify(
    session: Session,
    anchors: Sequence[Anchor] = (),
    *,
    since: Anchor | None = None,
    batch: int = 5000,
) -> ChainReport:
    """Recompute every hash in order; report the first event whose link does not hold.

    With ``anchors`` (checkpoints whose signatures were checked), the recomputed hash at each
    anchor's ``seq`` must be the anchor's: a difference means an event up to it was changed
    and the later hashes recomputed (reported from the event after the last matching
    anchor); an anchor beyond the chain's end means events were removed.

    With ``since``, the walk starts at that anchor instead of the first event (event
    ``since.seq`` must still have its hash, and that hash must cover its content): only what
    came after it is checked, against the ``anchors`` after it. That is the checkpoint
    writer's check before it signs and the incremental verify
    (``mes.audit_checkpoints.verify``); the full verify starts from the first event.
    """
    todo = sorted((a for a in anchors if since is None or a.seq > since.seq), key=lambda a: a.seq)
    done = 0
    anchored: int | None = None
    count = 0

    def broken(seq: int, reason: str) -> ChainReport:
        return ChainReport(
            intact=False,
            events=count,
            first_broken_seq=seq,
            reason=reason,
            checked_at=utcnow(),
            checkpoints=done,
            anchored_seq=anchored,
            full=since is None,
            started_after_seq=since.seq if since is not None else 0,
        )

    prev, expected_seq = GENESIS, 1
    if since is not None:
        start = session.scalars(select(AuditEvent).where(AuditEvent.seq == since.seq)).first()
        if start is None:
            return broken(since.seq, f"event {since.seq} of the checkpoint of {since.at} is gone")
        if start.hash != since.hash:
            return broken(since.seq, f"event {since.seq} differs from the checkpoint of {since.at}")
        # The start event itself is recomputed too: its hash must still cover its content.
        if event_hash(start, start.prev_hash) != start.hash:
            return broken(since.seq, "the event's content does not match its hash")
        prev, expected_seq, anchored = since.hash, since.seq + 1, since.seq
        session.expunge(start)
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
                return broken(expected_seq, f"event {expected_seq} is missing")
            if ev.prev_hash != prev:
                return broken(ev.seq, "prev_hash does not match the previous event's hash")
            if event_hash(ev, prev) != ev.hash:
                return broken(ev.seq, "the event's content does not match its hash")
            prev = ev.hash
            while done < len(todo) and todo[done].seq <= ev.seq:
                anchor = todo[done]
                if anchor.seq == ev.seq and anchor.hash != ev.hash:
                    first = (anchored or 0) + 1
                    return broken(
                        first,
                        f"events {first} to {anchor.seq} do not match the checkpoint of "
                        f"{anchor.at}: one of them was changed and the later hashes recomputed",
                    )
                done += 1
                anchored = max(anchored or 0, anchor.seq)
            expected_seq += 1
        session.expunge_all()
    if done < len(todo):
        last = todo[-1]
        return broken(
            expected_seq,
            f"events {expected_seq} to {last.seq} were removed: the checkpoint of {last.at} "
            f"vouches for event {last.seq}",
        )
    head = session.get(AuditChainHead, 1)
    if head is not None and (head.seq != expected_seq - 1 or head.last_hash != prev):
        return broken(expected_seq, "events after the last one were removed")
    return ChainReport(
        intact=True,
        events=count,
        checked_at=utcnow(),
        checkpoints=done,
        anchored_seq=anchored,
        full=since is None,
        started_after_seq=since.seq if since is not None else 0,
    )
