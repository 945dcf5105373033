"""indexes for every filter and sort of the API's lists

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-09 10:00:00.000000

Each list (work orders by priority or due, the dispatch list, production orders, quality
nonconformances, audit events) reads a range of one index in its sort order, ending in the
id that makes the order total, so a page after a cursor (``after=``, ``mes.paging``) starts
where the index says, not after the rows before it. Single-column indexes that a new one
begins with are dropped (the composite serves their lookups). The audit actor index uses
``varchar_pattern_ops`` on PostgreSQL: the actor filter is a prefix (``LIKE 'x%'``), which a
plain index serves only under the C collation.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, dropped, created: name, columns)
CHANGES: list[tuple[str, list[str], list[tuple[str, list[str]]]]] = [
    (
        "operations_request",
        ["ix_operations_request_state", "ix_operations_request_source"],
        [
            ("ix_operations_request_state_id", ["state", "id"]),
            ("ix_operations_request_source_id", ["source", "id"]),
            ("ix_operations_request_due_id", ["due", "id"]),
        ],
    ),
    (
        "job_order",
        ["ix_job_order_state", "ix_job_order_equipment_id"],
        [
            ("ix_job_order_priority_id", ["priority", "id"]),
            ("ix_job_order_state_priority_id", ["state", "priority", "id"]),
            ("ix_job_order_equipment_state", ["equipment_id", "state"]),
        ],
    ),
    (
        "nonconformance",
        ["ix_nonconformance_state", "ix_nonconformance_opened_at"],
        [
            ("ix_nonconformance_opened_at_id", ["opened_at", "id"]),
            ("ix_nonconformance_state_opened_at_id", ["state", "opened_at", "id"]),
        ],
    ),
    (
        "audit_event",
        ["ix_audit_event_object"],
        [("ix_audit_event_object_seq", ["object_type", "object_id", "seq"])],
    ),
]


def upgrade() -> None:
    for table, dropped, created in CHANGES:
        for name in dropped:
            op.drop_index(name, table_name=table)
        for name, columns in created:
            op.create_index(name, table, columns)
    op.drop_index("ix_audit_event_actor", table_name="audit_event")
    op.create_index(
        "ix_audit_event_actor_prefix",
        "audit_event",
        ["actor"],
        postgresql_ops={"actor": "varchar_pattern_ops"},
    )


def downgrade() -> None:
    op.drop_index("ix_audit_event_actor_prefix", table_name="audit_event")
    op.create_index("ix_audit_event_actor", "audit_event", ["actor"])
    for table, dropped, created in reversed(CHANGES):
        for name, _columns in created:
            op.drop_index(name, table_name=table)
        for name in dropped:
            column = name.removeprefix(f"ix_{table}_")
            columns = ["object_type", "object_id"] if column == "object" else [column]
            op.create_index(name, table, columns)
