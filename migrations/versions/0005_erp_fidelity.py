"""erp fidelity: the ERP's ids and per-step data on orders

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 02:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import mes.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("operations_request", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erp_schedule_id", sa.String(length=100), nullable=True))

    with op.batch_alter_table("segment_requirement", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erp_id", sa.String(length=100), nullable=True))
        batch_op.add_column(
            sa.Column("earliest_start", mes.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("latest_end", mes.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("equipment_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("material_lots", sa.JSON(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_segment_requirement_equipment_id"), ["equipment_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_segment_requirement_equipment_id_equipment"),
            "equipment",
            ["equipment_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("segment_requirement", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_segment_requirement_equipment_id_equipment"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_segment_requirement_equipment_id"))
        batch_op.drop_column("material_lots")
        batch_op.drop_column("equipment_id")
        batch_op.drop_column("latest_end")
        batch_op.drop_column("earliest_start")
        batch_op.drop_column("erp_id")

    with op.batch_alter_table("operations_request", schema=None) as batch_op:
        batch_op.drop_column("erp_schedule_id")
