"""machine data: PackML state intervals and counter deltas per work unit (OEE); calendars

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 10:00:00.000000

Written by the collector (``mes.collector``), read by the KPIs (``mes.kpi``). Both tables
grow with time and are read by (equipment, time): one index each on that pair. See README
"KPIs" for their size over a year and how to partition them on PostgreSQL. An equipment's
work calendar (shifts, planned downtime) is a JSON column of ``equipment``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mes.models import UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("equipment") as batch:
        batch.add_column(sa.Column("calendar", sa.JSON(), nullable=True))
    op.create_table(
        "equipment_state_interval",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("equipment_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.Integer(), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("ended_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["equipment_id"],
            ["equipment.id"],
            name=op.f("fk_equipment_state_interval_equipment_id_equipment"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_equipment_state_interval")),
    )
    op.create_index(
        "ix_equipment_state_interval_equipment",
        "equipment_state_interval",
        ["equipment_id", "started_at"],
    )
    op.create_table(
        "equipment_count",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("equipment_id", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("processed_delta", sa.Integer(), nullable=False),
        sa.Column("defective_delta", sa.Integer(), nullable=False),
        sa.Column("processed_total", sa.BigInteger(), nullable=False),
        sa.Column("defective_total", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["equipment_id"],
            ["equipment.id"],
            name=op.f("fk_equipment_count_equipment_id_equipment"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_equipment_count")),
    )
    op.create_index("ix_equipment_count_equipment", "equipment_count", ["equipment_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_equipment_count_equipment", table_name="equipment_count")
    op.drop_table("equipment_count")
    op.drop_index("ix_equipment_state_interval_equipment", table_name="equipment_state_interval")
    op.drop_table("equipment_state_interval")
    with op.batch_alter_table("equipment") as batch:
        batch.drop_column("calendar")
