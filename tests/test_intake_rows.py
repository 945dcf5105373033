"""The JSON route's intake writes rows (``insert_order``), the B2MML route and the services
objects (``create_order``): both must store the same order, steps, ERP message and audit
event, and answer a repost the same way. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mes import audit
from mes.callbacks import LOOPBACK, CallbackPolicy
from mes.errors import Conflict, DomainError
from mes.launch import point_erp_client
from mes.models import (
    AuditEvent,
    ErpMessage,
    OperationsRequest,
    SegmentRequirement,
)
from mes.production_orders import ProductionOrderIn, create_order, insert_order

#: B2MML's CreationDateTime: when the message was written.
_when = re.compile(r"<CreationDateTime>[^<]*</CreationDateTime>")
SKIP = {"id", "external_id", "workflow_id", "request_hash", "created_at"}


def _body(number: str, product: str, **change: Any) -> ProductionOrderIn:
    fields: dict[str, Any] = {
        "order_number": number,
        "product": product,
        "quantity": 2.5,
        "unit": "ea",
        "due": datetime.now(UTC) + timedelta(hours=2),
        "priority": 3,
        "customer_order": "C-1",
    } | change
    return ProductionOrderIn.model_validate(fields)


def _stored(s: Session, number: str) -> dict[str, Any]:
    order = s.scalars(
        select(OperationsRequest).where(OperationsRequest.external_id == number)
    ).one()
    steps = s.scalars(
        select(SegmentRequirement)
        .where(SegmentRequirement.operations_request_id == order.id)
        .order_by(SegmentRequirement.sequence)
    ).all()
    messages = s.scalars(
        select(ErpMessage).where(ErpMessage.operations_request_id == order.id)
    ).all()
    event = s.scalars(
        select(AuditEvent).where(
            AuditEvent.object_id == number, AuditEvent.action == "order.created"
        )
    ).one()

    def cols(obj: Any, skip: set[str]) -> dict[str, Any]:
        return {
            c.key: getattr(obj, c.key)
            for c in obj.__mapper__.column_attrs
            if c.key not in skip | {"operations_request_id"}
        }

    return {
        "order": cols(order, SKIP),
        "steps": [cols(r, {"id"}) for r in steps],
        "messages": [
            cols(m, {"id", "created_at"})
            | {
                # Both store the performance; the document is rendered at delivery.
                "performance": _when.sub(
                    "T", json.dumps(m.performance, sort_keys=True).replace(number, "N")
                ),
                "message_id": m.message_id.replace(number, "N"),
            }
            for m in messages
        ],
        "event": {k: v for k, v in (event.after or {}).items() if k != "order_number"},
        "actor": event.actor,
    }


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("fmt", ["json", "b2mml"])
def test_rows_and_objects_store_the_same_order(
    backend: str, fmt: str, request: pytest.FixtureRequest
) -> None:
    sessions: sessionmaker[Session] = request.getfixturevalue(
        "plant_sqlite" if backend == "sqlite" else "plant_pg"
    )
    source = f"erp-{uuid.uuid4().hex[:6]}"
    point_erp_client(
        sessions, source, "http://127.0.0.1:9/cb", fmt, CallbackPolicy.allowing(LOOPBACK)
    )
    for product in ("BREAD-WHITE", "ROLL-6PK"):
        a, b = f"A-{uuid.uuid4().hex[:8]}", f"B-{uuid.uuid4().hex[:8]}"
        due = datetime.now(UTC) + timedelta(hours=5)
        with sessions() as s:
            create_order(s, _body(a, product, due=due), "erp:x", source)
        with sessions() as s:
            out, created = insert_order(s, _body(b, product, due=due), "erp:x", source)
        assert created
        with sessions() as s:
            objects, rows = _stored(s, a), _stored(s, b)
            assert (
                out.id
                == s.scalars(
                    select(OperationsRequest.id).where(OperationsRequest.external_id == b)
                ).one()
            )
        assert rows == objects
        assert rows["steps"]
        assert len(rows["messages"]) == 1

        # Posted again: the same order (200); another body: a conflict; both write nothing.
        with sessions() as s:
            again, created = insert_order(s, _body(b, product, due=due), "erp:x", source)
        assert not created
        assert again.id == out.id
        with sessions() as s, pytest.raises(Conflict):
            insert_order(s, _body(b, product, due=due, priority=4), "erp:x", source)
        with sessions() as s, pytest.raises(Conflict):
            # Taken by another client: a conflict that says nothing of the order.
            insert_order(s, _body(b, product, due=due), "erp:x", "someone-else")
        with sessions() as s, pytest.raises(Conflict):
            # An unknown product under a number taken: the conflict, not the product.
            insert_order(s, _body(b, "NO-SUCH-THING", due=due), "erp:x", source)
    with sessions() as s, pytest.raises(DomainError) as refused:
        insert_order(s, _body(f"C-{uuid.uuid4().hex[:8]}", "NO-SUCH-THING"), "erp:x", source)
    assert refused.value.status == 422
    with sessions() as s:
        assert audit.verify(s).intact
