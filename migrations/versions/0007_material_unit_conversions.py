"""material unit conversions: a material's own units (1 BAG of FLOUR = 25 kg)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 02:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("material_definition", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("unit_conversions", sa.JSON(), nullable=False, server_default="{}")
        )


def downgrade() -> None:
    with op.batch_alter_table("material_definition", schema=None) as batch_op:
        batch_op.drop_column("unit_conversions")
