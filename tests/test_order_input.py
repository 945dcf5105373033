"""Unit tests of the production order input: what the ERP may send, and the business key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from mes.production_orders import ProductionOrderIn
from workflows.types import order_workflow_id

GOOD = {
    "order_number": "PO-1",
    "product": "BREAD-WHITE",
    "quantity": 10,
    "unit": "ea",
    "due": "2030-01-01T12:00:00Z",
    "priority": 5,
}


def test_good_order_parses() -> None:
    order = ProductionOrderIn.model_validate(GOOD)
    assert order.quantity == 10
    assert order.due == datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert order.customer_order is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quantity": 0}, "quantity"),
        ({"quantity": -5}, "quantity"),
        ({"quantity": "10"}, "quantity"),
        ({"priority": "high"}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"due": "tomorrow"}, "due"),
        ({"due": "2030-01-01T12:00:00"}, "due"),  # no time zone: ambiguous on a plant floor
        ({"order_number": "has space"}, "order_number"),
        ({"order_number": ""}, "order_number"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_field_is_named(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        ProductionOrderIn.model_validate(GOOD | change)
    assert field in {str(e["loc"][0]) for e in err.value.errors()}


@pytest.mark.parametrize(
    "missing", ["order_number", "product", "quantity", "unit", "due", "priority"]
)
def test_required_fields(missing: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValidationError) as err:
        ProductionOrderIn.model_validate(body)
    assert err.value.errors()[0]["loc"] == (missing,)


def test_fingerprint_ignores_notation_not_content() -> None:
    a = ProductionOrderIn.model_validate(GOOD)
    b = ProductionOrderIn.model_validate(
        GOOD | {"due": "2030-01-01T13:00:00+01:00", "quantity": 10.0}
    )
    c = ProductionOrderIn.model_validate(GOOD | {"quantity": 11})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert b.due == datetime(2030, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))


def test_workflow_id_is_the_business_key() -> None:
    assert order_workflow_id("PO-77") == "order-PO-77"
