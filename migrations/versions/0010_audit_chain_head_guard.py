"""audit chain head guarded like the events: it moves only forward, to the newest event

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 09:00:00.000000

Before, ``audit_chain_head`` had no trigger: whoever could write it could move it back after
deleting the newest events, and the chain verified intact. Now an UPDATE passes only when it
leaves the row as it is (the lock an appending transaction takes first) or moves it forward
to the ``(seq, hash)`` of the newest event; INSERT, DELETE and TRUNCATE are refused.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The one rule, in SQL both databases read: unchanged, or forward to the newest event.
ALLOWED = """
    NEW.id = OLD.id AND (
        (NEW.seq = OLD.seq AND NEW.last_hash = OLD.last_hash)
        OR (
            NEW.seq > OLD.seq
            AND NEW.seq = (SELECT max(seq) FROM audit_event)
            AND EXISTS (
                SELECT 1 FROM audit_event WHERE seq = NEW.seq AND hash = NEW.last_hash
            )
        )
    )
"""

PG_GUARD = f"""
CREATE FUNCTION audit_chain_head_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND ({ALLOWED}) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_head moves only forward, to the newest event: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_chain_head_forward_only BEFORE INSERT OR UPDATE OR DELETE
    ON audit_chain_head FOR EACH ROW EXECUTE FUNCTION audit_chain_head_forward_only();
CREATE TRIGGER audit_chain_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_head_forward_only();
"""

_REFUSED = "audit_chain_head moves only forward, to the newest event"
SQLITE_GUARD = [
    f"""CREATE TRIGGER audit_chain_head_forward_only BEFORE UPDATE ON audit_chain_head
        WHEN NOT ({ALLOWED})
        BEGIN SELECT RAISE(ABORT, '{_REFUSED}: UPDATE refused'); END""",
    f"""CREATE TRIGGER audit_chain_head_no_insert BEFORE INSERT ON audit_chain_head
        BEGIN SELECT RAISE(ABORT, '{_REFUSED}: INSERT refused'); END""",
    f"""CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
        BEGIN SELECT RAISE(ABORT, '{_REFUSED}: DELETE refused'); END""",
]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_GUARD)
    elif dialect == "sqlite":
        for stmt in SQLITE_GUARD:
            op.execute(stmt)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER audit_chain_head_no_truncate ON audit_chain_head")
        op.execute("DROP TRIGGER audit_chain_head_forward_only ON audit_chain_head")
        op.execute("DROP FUNCTION audit_chain_head_forward_only()")
    elif dialect == "sqlite":
        for name in ("forward_only", "no_insert", "no_delete"):
            op.execute(f"DROP TRIGGER audit_chain_head_{name}")
