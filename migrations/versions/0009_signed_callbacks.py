"""signed callbacks: a signing secret per ERP client; B2MML answers remembered per client

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 05:00:00.000000
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("erp_client", schema=None) as batch_op:
        batch_op.add_column(sa.Column("signing_secret", sa.String(length=64), nullable=True))
    # Each existing client gets its own secret; an admin rotates it to learn it.
    clients = sa.table("erp_client", sa.column("id", sa.Integer), sa.column("signing_secret"))
    conn = op.get_bind()
    for (client_id,) in conn.execute(sa.select(clients.c.id)).all():
        conn.execute(
            clients.update()
            .where(clients.c.id == client_id)
            .values(signing_secret=secrets.token_hex(32))
        )
    with op.batch_alter_table("erp_client", schema=None) as batch_op:
        batch_op.alter_column("signing_secret", existing_type=sa.String(64), nullable=False)

    # 0008 added the column; rows stored before it name the sender instead.
    op.execute("UPDATE b2mml_message SET client = sender WHERE client IS NULL")
    with op.batch_alter_table("b2mml_message", schema=None) as batch_op:
        batch_op.alter_column("client", existing_type=sa.String(100), nullable=False)
        batch_op.drop_constraint("uq_b2mml_message_bod_id", type_="unique")
        batch_op.create_unique_constraint("uq_b2mml_message_client_bod_id", ["client", "bod_id"])


def downgrade() -> None:
    with op.batch_alter_table("b2mml_message", schema=None) as batch_op:
        batch_op.drop_constraint("uq_b2mml_message_client_bod_id", type_="unique")
        batch_op.create_unique_constraint("uq_b2mml_message_bod_id", ["bod_id"])
        batch_op.alter_column("client", existing_type=sa.String(100), nullable=True)
    with op.batch_alter_table("erp_client", schema=None) as batch_op:
        batch_op.drop_column("signing_secret")
