"""Quantities are exact: a lot of 90 kg after three consumptions of 0.45 kg holds 88.65 kg,
in SQL, in the API (a JSON number) and in B2MML; decoding never goes through a float."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from mes import execution
from mes.b2mml import ProcessOperationsSchedule, decode
from mes.machines import JobResponseData, JobState, MaterialActualData
from mes.models import MaterialDefinition, MaterialLot
from mes.production_orders import ProductionOrderIn, create_order
from mes.quantities import exact, json_number
from mes.quantities import text as quantity_text
from tests.b2mml.conftest import example
from tests.conftest import app_without_temporal, token
from tests.test_execution import _order


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def plant(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    name = "plant_pg" if request.param == "postgresql" else "plant_sqlite"
    sessions: sessionmaker[Session] = request.getfixturevalue(name)
    return sessions


def _consume_three_times(plant: sessionmaker[Session], take: float) -> tuple[str, list[str]]:
    """A 90 kg flour lot, consumed by three jobs (the machine reports floats, as OPC UA
    gives them); returns the lot and the dough lots the jobs made."""
    lot_id = f"LOT-FLOUR-{uuid.uuid4().hex[:8]}"
    with plant() as s:
        flour = s.scalars(
            select(MaterialDefinition).where(MaterialDefinition.external_id == "FLOUR-WHEAT")
        ).one()
        s.add(
            MaterialLot(
                external_id=lot_id,
                material_definition_id=flour.id,
                quantity=Decimal(90),
                unit="kg",
            )
        )
        s.commit()
    made = []
    for _ in range(3):
        order_id, _ = _order(plant, quantity=1)
        with plant() as s:
            job = execution.plan_order(s, order_id)[0]
        now = datetime.now(UTC)
        response = JobResponseData(
            job_order_id=job,
            state=JobState.ENDED,
            start_time=now - timedelta(seconds=5),
            end_time=now,
            material_actuals=[
                MaterialActualData("FLOUR-WHEAT", "Consumed", take, "kg", lot_id),
                MaterialActualData("DOUGH-WHITE", "Produced", 1.0, "kg", f"LOT-{job}"),
            ],
            processed_count=1,
        )
        with plant() as s:
            _, produced = execution.record_job_response(s, response)
        made.extend(produced)
    return lot_id, made


async def test_a_lot_after_three_consumptions_is_exact(plant: sessionmaker[Session]) -> None:
    # As floats: 90 - 0.45 - 0.45 - 0.45 == 88.64999999999999.
    assert 90 - 0.45 - 0.45 - 0.45 != 88.65
    lot_id, made = _consume_three_times(plant, 0.45)

    with plant() as s:
        lot = s.scalars(select(MaterialLot).where(MaterialLot.external_id == lot_id)).one()
        assert lot.quantity == Decimal("88.65")
        assert isinstance(lot.quantity, Decimal)
        assert quantity_text(lot.quantity) == "88.65"
        # The balance in SQL: the start less every consumption recorded against the lot.
        start_less_consumed, held = s.execute(
            text(
                "SELECT 90 - sum(a.quantity), l.quantity FROM material_lot l "
                "JOIN material_actual a ON a.material_lot_id = l.id AND a.use = 'Consumed' "
                "WHERE l.external_id = :lot GROUP BY l.quantity"
            ),
            {"lot": lot_id},
        ).one()
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            # Exact in the database itself, digit for digit.
            assert s.scalar(
                text("SELECT quantity::text FROM material_lot WHERE external_id = :lot"),
                {"lot": lot_id},
            ) == ("88.650000")
            assert start_less_consumed == held == Decimal("88.65")
        else:
            # SQLite stores a float; read through the model it is the decimal (see
            # mes.quantities), and it holds the float nearest to 88.65, not a drifted one.
            assert float(held) == 88.65
        actuals = s.execute(
            text(
                "SELECT a.quantity FROM material_actual a JOIN material_lot l "
                "ON a.material_lot_id = l.id WHERE l.external_id = :lot"
            ),
            {"lot": lot_id},
        ).all()
        assert [Decimal(str(q)) for (q,) in actuals] == [Decimal("0.45")] * 3

    auth = token(plant, "auditor")
    async with AsyncTestClient(app=app_without_temporal(plant)) as http:
        back = await http.get(f"/api/v1/genealogy/lots/{made[-1]}/backward", headers=auth)
        forward = await http.get(f"/api/v1/genealogy/lots/{lot_id}/forward", headers=auth)
    assert back.status_code == forward.status_code == 200, back.text
    flour = next(lot for lot in back.json()["lots"] if lot["lot"] == lot_id)
    assert flour["quantity"] == 88.65
    assert isinstance(flour["quantity"], float)  # a JSON number, not a string
    assert '"quantity":88.65' in back.text.replace(" ", "")
    assert "88.6499" not in back.text
    root = next(lot for lot in forward.json()["lots"] if lot["depth"] == 0)
    assert root["quantity"] == 88.65
    assert {lot["lot"] for lot in forward.json()["lots"]} >= set(made)


def test_consuming_a_lot_to_nothing_marks_it_consumed(plant: sessionmaker[Session]) -> None:
    # 1.35 - 0.45 - 0.45 - 0.45 is 2.2e-16 in floats: the lot would stay Available.
    lot_id = f"LOT-FLOUR-{uuid.uuid4().hex[:8]}"
    with plant() as s:
        flour = s.scalars(
            select(MaterialDefinition).where(MaterialDefinition.external_id == "FLOUR-WHEAT")
        ).one()
        lot = MaterialLot(
            external_id=lot_id, material_definition_id=flour.id, quantity=exact("1.35"), unit="kg"
        )
        s.add(lot)
        s.commit()
    for _ in range(3):
        order_id, _ = _order(plant, quantity=1)
        with plant() as s:
            job = execution.plan_order(s, order_id)[0]
        with plant() as s:
            execution.record_job_response(
                s,
                JobResponseData(
                    job_order_id=job,
                    state=JobState.ENDED,
                    material_actuals=[
                        MaterialActualData("FLOUR-WHEAT", "Consumed", 0.45, "kg", lot_id)
                    ],
                ),
            )
    with plant() as s:
        lot = s.scalars(select(MaterialLot).where(MaterialLot.external_id == lot_id)).one()
        assert (lot.quantity, lot.status) == (Decimal(0), "Consumed")


async def test_the_order_api_gives_quantities_as_numbers(
    plant_sqlite: sessionmaker[Session],
) -> None:
    body = ProductionOrderIn.model_validate_json(
        json.dumps(
            {
                "order_number": f"Q-{uuid.uuid4().hex[:8]}",
                "product": "BREAD-WHITE",
                "quantity": 11.9,
                "unit": "ea",
                "due": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                "priority": 1,
            }
        )
    )
    assert body.quantity == Decimal("11.9")  # parsed exactly, not 11.900000000000000355…
    with plant_sqlite() as s:
        order, _ = create_order(s, body)
        order_id = order.id
    async with AsyncTestClient(app=app_without_temporal(plant_sqlite)) as http:
        r = await http.get(
            f"/api/v1/production-orders/{order_id}",
            headers=token(plant_sqlite, "supervisor"),
        )
    assert r.status_code == 200, r.text
    assert r.json()["quantity"] == 11.9
    assert '"quantity":11.9' in r.text.replace(" ", "")


def test_the_order_api_refuses_a_quantity_as_a_string() -> None:
    with pytest.raises(ValueError, match="valid number"):
        ProductionOrderIn.model_validate(
            {
                "order_number": "Q-1",
                "product": "BREAD-WHITE",
                "quantity": "11.9",
                "unit": "ea",
                "due": datetime.now(UTC) + timedelta(hours=1),
                "priority": 1,
            }
        )


def test_b2mml_quantity_is_decoded_as_a_decimal() -> None:
    xml = example("process-operations-schedule.xml").replace(
        b"<QuantityString>500</QuantityString>", b"<QuantityString>11.9</QuantityString>"
    )
    message = decode(xml)
    assert isinstance(message, ProcessOperationsSchedule)
    order = message.requests[0].to_order_in()
    assert order.quantity == Decimal("11.9")
    assert isinstance(order.quantity, Decimal)


def test_exact_and_json_number() -> None:
    assert exact(0.45) == Decimal("0.45")
    assert exact(0.1 + 0.2) == Decimal("0.3")  # rounded to the stored six places
    assert exact("11.9") == Decimal("11.9")
    assert json_number(Decimal("88.650000")) == 88.65
    assert quantity_text(Decimal("50000.000000")) == "50000"
    for bad in (float("nan"), "inf", "plenty", True):
        with pytest.raises(ValueError, match="quantity"):
            exact(bad)
