"""exact quantities: every quantity of material is NUMERIC(18, 6), not a float

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 02:30:00.000000

PostgreSQL converts the stored doubles with its float8 → numeric cast, which keeps 15
significant digits: a stored 88.64999999999999 becomes 88.650000. SQLite copies each table
(batch mode) under the new declared type; the values stay 8-byte floats there (SQLite has no
decimal storage) and are read back as decimals rounded to six places (``mes.quantities``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The tables whose ``quantity`` column holds a quantity of material.
TABLES = (
    "material_lot",
    "material_sublot",
    "operations_material_spec",
    "operations_request",
    "segment_requirement",
    "material_actual",
)


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "quantity",
                existing_type=sa.Float(),
                type_=sa.Numeric(precision=18, scale=6),
                existing_nullable=False,
                postgresql_using="quantity::numeric(18, 6)",
            )


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "quantity",
                existing_type=sa.Numeric(precision=18, scale=6),
                type_=sa.Float(),
                existing_nullable=False,
                postgresql_using="quantity::double precision",
            )
