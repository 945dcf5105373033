"""new orders announce themselves to the relays: NOTIFY mes_order_start at commit

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29 08:00:00.000000

An order stored is a request to start its workflow, which the relays (``mes.relay``) carry
out; on PostgreSQL they ``LISTEN`` on ``mes_order_start``. The accepting transaction used
to send the ``NOTIFY`` as a statement of its own, a round trip per order; this statement
trigger sends it with the ``INSERT`` (delivered at commit, only if it commits), whoever
stores the order. SQLite has no ``NOTIFY``: there the API wakes the relay of its process.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_NOTIFY = """
CREATE FUNCTION operations_request_notify_start() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mes_order_start', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER operations_request_notify_start AFTER INSERT ON operations_request
    FOR EACH STATEMENT EXECUTE FUNCTION operations_request_notify_start();
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_NOTIFY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER operations_request_notify_start ON operations_request")
        op.execute("DROP FUNCTION operations_request_notify_start()")
