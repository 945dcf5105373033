"""erp message: the order's performance stored with the state change, rendered at delivery

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 10:00:00.000000

The outbox row written with an order's state change keeps the order's performance as it is
then (``performance``, the JSON form of ``OperationsPerformanceData``); the document in the
ERP client's format (B2MML, schema-checked, or JSON) is rendered when the row is first
delivered and kept in ``body`` (null until then), so the order's transaction does not build
and validate XML.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("erp_message") as batch:
        batch.add_column(sa.Column("performance", sa.JSON(), nullable=True))
        batch.alter_column("body", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    # A row not rendered yet has no body: it gets an empty one (it was never sent).
    op.execute("UPDATE erp_message SET body = '' WHERE body IS NULL")
    with op.batch_alter_table("erp_message") as batch:
        batch.alter_column("body", existing_type=sa.Text(), nullable=False)
        batch.drop_column("performance")
