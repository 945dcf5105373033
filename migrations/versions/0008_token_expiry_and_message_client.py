"""token expiry; the client that sent each B2MML message

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import mes.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("expires_at", mes.models.UTCDateTime(timezone=True), nullable=True)
        )
    # Messages stored before this revision name no client: their answers are replayed to
    # nobody (a BODID already used is refused as taken).
    with op.batch_alter_table("b2mml_message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("b2mml_message", schema=None) as batch_op:
        batch_op.drop_column("client")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
