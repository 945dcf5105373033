"""quality gate: nonconformances, test results by hand, rework job orders

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 10:00:00.000000

A lot out of specification opens a ``nonconformance``; test specifications may belong to a
material instead of a work master and carry a target and a sample size; test results say
where they came from and who recorded them (a result entered by hand has no job response);
a rework is a second job order on the same step (``job_order.rework_of_id``), so a step no
longer has exactly one job order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mes.models import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nonconformance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=120), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("material_lot_id", sa.Integer(), nullable=False),
        sa.Column("job_order_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("opened_by", sa.String(length=100), nullable=False),
        sa.Column("opened_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("disposition", sa.String(length=20), nullable=True),
        sa.Column("disposition_reason", sa.Text(), nullable=True),
        sa.Column("disposed_by", sa.String(length=100), nullable=True),
        sa.Column("disposed_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("rework_job_order_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_order_id"],
            ["job_order.id"],
            name=op.f("fk_nonconformance_job_order_id_job_order"),
        ),
        sa.ForeignKeyConstraint(
            ["material_lot_id"],
            ["material_lot.id"],
            name=op.f("fk_nonconformance_material_lot_id_material_lot"),
        ),
        sa.ForeignKeyConstraint(
            ["rework_job_order_id"],
            ["job_order.id"],
            name=op.f("fk_nonconformance_rework_job_order_id_job_order"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nonconformance")),
        sa.UniqueConstraint("external_id", name=op.f("uq_nonconformance_external_id")),
    )
    with op.batch_alter_table("nonconformance", schema=None) as batch_op:
        for column in ("state", "material_lot_id", "job_order_id", "opened_at"):
            batch_op.create_index(batch_op.f(f"ix_nonconformance_{column}"), [column])

    with op.batch_alter_table("job_order", schema=None) as batch_op:
        batch_op.drop_constraint("uq_job_order_segment_requirement_id", type_="unique")
        batch_op.create_index(
            batch_op.f("ix_job_order_segment_requirement_id"), ["segment_requirement_id"]
        )
        batch_op.add_column(sa.Column("rework_of_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_job_order_rework_of_id_job_order"), "job_order", ["rework_of_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_job_order_rework_of_id"), ["rework_of_id"])

    with op.batch_alter_table("test_specification", schema=None) as batch_op:
        batch_op.alter_column("work_master_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column("material_definition_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("target", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("sample_size", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_test_specification_material_definition_id_material_definition"),
            "material_definition",
            ["material_definition_id"],
            ["id"],
        )
        batch_op.create_index(
            batch_op.f("ix_test_specification_material_definition_id"), ["material_definition_id"]
        )

    with op.batch_alter_table("test_result", schema=None) as batch_op:
        batch_op.alter_column("job_response_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(
            sa.Column("source", sa.String(length=20), nullable=False, server_default="machine")
        )
        batch_op.add_column(
            sa.Column("recorded_by", sa.String(length=100), nullable=False, server_default="system")
        )
        batch_op.add_column(
            sa.Column(
                "recorded_at",
                UTCDateTime(timezone=True),
                nullable=False,
                server_default=sa.text("CURRENT_TIMESTAMP"),
            )
        )
        batch_op.add_column(sa.Column("nonconformance_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_test_result_nonconformance_id_nonconformance"),
            "nonconformance",
            ["nonconformance_id"],
            ["id"],
        )
        batch_op.create_index(batch_op.f("ix_test_result_nonconformance_id"), ["nonconformance_id"])


def downgrade() -> None:
    with op.batch_alter_table("test_result", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_test_result_nonconformance_id"))
        batch_op.drop_constraint(
            batch_op.f("fk_test_result_nonconformance_id_nonconformance"), type_="foreignkey"
        )
        for column in ("nonconformance_id", "recorded_at", "recorded_by", "source"):
            batch_op.drop_column(column)
        batch_op.alter_column("job_response_id", existing_type=sa.Integer(), nullable=False)
    with op.batch_alter_table("test_specification", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_test_specification_material_definition_id"))
        batch_op.drop_constraint(
            batch_op.f("fk_test_specification_material_definition_id_material_definition"),
            type_="foreignkey",
        )
        for column in ("sample_size", "target", "material_definition_id"):
            batch_op.drop_column(column)
        batch_op.alter_column("work_master_id", existing_type=sa.Integer(), nullable=False)
    with op.batch_alter_table("job_order", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_order_rework_of_id"))
        batch_op.drop_constraint(
            batch_op.f("fk_job_order_rework_of_id_job_order"), type_="foreignkey"
        )
        batch_op.drop_column("rework_of_id")
        batch_op.drop_index(batch_op.f("ix_job_order_segment_requirement_id"))
        batch_op.create_unique_constraint(
            "uq_job_order_segment_requirement_id", ["segment_requirement_id"]
        )
    op.drop_table("nonconformance")
