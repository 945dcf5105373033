"""genealogy details: edge quantities, the job that made a lot, the recipe's hash and version,
an index for forward walks

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 04:20:00.000000
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("material_lot_assembly", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quantity", sa.Numeric(18, 6), nullable=True))
        batch_op.add_column(sa.Column("unit", sa.String(20), nullable=True))
        batch_op.drop_index("ix_material_lot_assembly_component_lot_id")
        batch_op.create_index(
            "ix_material_lot_assembly_component_lot",
            ["component_lot_id", "material_lot_id"],
            unique=False,
        )
    with op.batch_alter_table("work_master", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.String(40), nullable=False, server_default="1"))
    with op.batch_alter_table("material_lot", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_order_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_material_lot_job_order_id_job_order", "job_order", ["job_order_id"], ["id"]
        )
    with op.batch_alter_table("job_order", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parameters_hash", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("work_master_version", sa.String(40), nullable=True))

    # Existing edges: the quantity the job consumed of the component (its material actual).
    op.execute(
        """
        UPDATE material_lot_assembly SET
          quantity = (SELECT ma.quantity FROM material_actual ma
                      WHERE ma.job_response_id = material_lot_assembly.job_response_id
                        AND ma.material_lot_id = material_lot_assembly.component_lot_id
                        AND ma.use = 'Consumed'),
          unit = (SELECT ma.unit FROM material_actual ma
                  WHERE ma.job_response_id = material_lot_assembly.job_response_id
                    AND ma.material_lot_id = material_lot_assembly.component_lot_id
                    AND ma.use = 'Consumed')
        """
    )
    # Made lots: the job order that made them (their first produced material actual).
    op.execute(
        """
        UPDATE material_lot SET job_order_id = (
          SELECT jr.job_order_id FROM material_actual ma
          JOIN job_response jr ON jr.id = ma.job_response_id
          WHERE ma.material_lot_id = material_lot.id AND ma.use = 'Produced'
          ORDER BY ma.id LIMIT 1)
        """
    )
    # Recorded jobs: the hash of the parameters they were sent (as mes.genealogy computes it).
    conn = op.get_bind()
    job = sa.table(
        "job_order",
        sa.column("id", sa.Integer),
        sa.column("parameters", sa.JSON),
        sa.column("parameters_hash", sa.String),
    )
    recorded: sa.Select[int] = sa.select(sa.column("job_order_id", sa.Integer)).select_from(
        sa.table("job_response")
    )
    for row in conn.execute(sa.select(job.c.id, job.c.parameters).where(job.c.id.in_(recorded))):
        sent = [
            {"name": p["name"], "value": float(p["value"]), "unit": p["unit"]}
            for p in row.parameters or []
        ]
        digest = hashlib.sha256(
            json.dumps(sent, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        conn.execute(job.update().where(job.c.id == row.id).values(parameters_hash=digest))


def downgrade() -> None:
    with op.batch_alter_table("job_order", schema=None) as batch_op:
        batch_op.drop_column("work_master_version")
        batch_op.drop_column("parameters_hash")
    with op.batch_alter_table("material_lot", schema=None) as batch_op:
        batch_op.drop_constraint("fk_material_lot_job_order_id_job_order", type_="foreignkey")
        batch_op.drop_column("job_order_id")
    with op.batch_alter_table("work_master", schema=None) as batch_op:
        batch_op.drop_column("version")
    with op.batch_alter_table("material_lot_assembly", schema=None) as batch_op:
        batch_op.drop_index("ix_material_lot_assembly_component_lot")
        batch_op.create_index(
            "ix_material_lot_assembly_component_lot_id", ["component_lot_id"], unique=False
        )
        batch_op.drop_column("unit")
        batch_op.drop_column("quantity")
