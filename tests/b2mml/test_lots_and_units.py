"""Lots in (SyncMaterialLot, SyncMaterialInformation), units in SyncMaterialDefinition,
per-material unit conversions and SyncOperationsSchedule, below the HTTP route."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from mes import units
from mes.audit import verify
from mes.b2mml import (
    B2MMLError,
    SyncMasterData,
    SyncOperationsSchedule,
    decode,
)
from mes.masterdata import (
    MasterDataError,
    load_plant,
    load_plant_file,
    parse_plant,
    read_master_data_file,
)
from mes.models import AuditEvent, MaterialDefinition, MaterialLot
from tests.b2mml.conftest import example
from tests.b2mml.test_sync import sync

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def load(db: sessionmaker[Session], data: bytes, actor: str = "erp:acme") -> str:
    """Decode and load one Sync message as the B2MML route does: partially."""
    message = decode(data)
    assert isinstance(message, SyncMasterData)
    plant = parse_plant(message.plant, partial=True)
    with db.begin() as s:
        return str(load_plant(s, plant, partial=True, actor=actor))


def lot(db: sessionmaker[Session], lot_id: str) -> tuple[float, str, str, str] | None:
    with db() as s:
        row = s.execute(
            select(
                MaterialLot.quantity, MaterialLot.unit, MaterialLot.disposition, MaterialLot.status
            ).where(MaterialLot.external_id == lot_id)
        ).one_or_none()
    return None if row is None else (float(row[0]), row[1], row[2], row[3])


def counts(db: sessionmaker[Session]) -> dict[str, int]:
    """Row counts by SQL, for "a refusal changes nothing"."""
    with db() as s:
        return {
            t: int(s.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
            for t in ("material_lot", "material_definition", "audit_event")
        }


def lot_xml(lot_id: str, material: str, quantity: str, unit: str | None, extra: str = "") -> str:
    uom = f"<UnitOfMeasure>{unit}</UnitOfMeasure>" if unit else ""
    return (
        f"<MaterialLot><ID>{lot_id}</ID><MaterialDefinitionID>{material}</MaterialDefinitionID>"
        f"{extra}<Quantity><QuantityString>{quantity}</QuantityString>{uom}</Quantity>"
        "</MaterialLot>"
    )


# --- units ------------------------------------------------------------------------------------


def test_a_materials_own_unit_converts_where_the_vocabulary_has_none() -> None:
    bag = {"BAG": Decimal(25)}  # 1 BAG of this material = 25 kg
    assert units.factor("BAG", "kg") is None
    assert units.factor("BAG", "kg", bag) == 25
    assert units.factor("bag", "KGM", bag) == 25  # any spelling, case ignored
    assert units.factor("BAG", "t", bag, base="kg") == Decimal("0.025")
    assert units.factor("kg", "BAG", bag, base="kg") == Decimal("0.04")
    assert units.convert(Decimal(4), "BAG", "g", bag, base="kg") == 100_000
    assert units.factor("t", "kg", bag) == 1000  # the standard vocabulary still wins
    assert units.factor("DRUM", "kg", bag) is None


def test_plant_file_conversions_are_stored_and_used_for_lots(
    plant_db: sessionmaker[Session],
) -> None:
    plant = parse_plant(
        {
            "materials": [
                {
                    "id": "FLOUR-WHEAT",
                    "description": "Wheat flour type 550",
                    "material_class": "Raw",
                    "unit": "kg",
                    "conversions": [
                        {"unit": "BAG", "factor": 25},
                        {"unit": "BB", "factor": 1, "of": "t"},
                    ],
                }
            ],
            "lots": [
                {"id": "LOT-BAGS", "material": "FLOUR-WHEAT", "quantity": 3, "unit": "BAG"},
                {"id": "LOT-BIGBAG", "material": "FLOUR-WHEAT", "quantity": 2, "unit": "BB"},
            ],
        },
        partial=True,
    )
    with plant_db.begin() as s:
        load_plant(s, plant, partial=True)
    with plant_db() as s:
        flour = s.scalars(
            select(MaterialDefinition).where(MaterialDefinition.external_id == "FLOUR-WHEAT")
        ).one()
        assert flour.unit_conversions == {"BAG": "25", "BB": "1000"}
    assert lot(plant_db, "LOT-BAGS") == (75, "kg", "Released", "Available")
    assert lot(plant_db, "LOT-BIGBAG") == (2000, "kg", "Released", "Available")


@pytest.mark.parametrize(
    ("conversion", "problem"),
    [
        ({"unit": "g", "factor": 0.001}, "'g' already converts to 'kg'"),
        ({"unit": "BAG", "factor": 25, "of": "l"}, "'l' does not convert to the material's unit"),
    ],
)
def test_bad_conversions_are_refused(conversion: dict[str, object], problem: str) -> None:
    with pytest.raises(MasterDataError) as caught:
        parse_plant({"materials": [{"id": "X", "unit": "kg", "conversions": [conversion]}]})
    assert problem in str(caught.value)


# --- SyncMaterialDefinition: the unit where V0701 has it --------------------------------------


def definition(props: str, material: str = "FLOUR-WHEAT") -> bytes:
    return sync(
        "MaterialDefinition",
        f"<MaterialDefinition><ID>{material}</ID><Description>Wheat flour type 550</Description>"
        f"{props}<MaterialClassID>Raw</MaterialClassID></MaterialDefinition>",
    )


def prop(name: str, value: str, unit: str | None = None, key: str | None = None) -> str:
    return (
        f"<MaterialDefinitionProperty><ID>{name}</ID><Value><ValueString>{value}</ValueString>"
        + (f"<UnitOfMeasure>{unit}</UnitOfMeasure>" if unit else "")
        + (f"<Key>{key}</Key>" if key else "")
        + "</Value></MaterialDefinitionProperty>"
    )


def test_a_definition_without_a_unit_keeps_the_stored_one(plant_db: sessionmaker[Session]) -> None:
    message = decode(definition(prop("UnitConversion", "25", key="BAG")))
    assert isinstance(message, SyncMasterData)
    assert "unit" not in message.plant["materials"][0]
    before = counts(plant_db)
    load(plant_db, definition(prop("UnitConversion", "25", key="BAG")))
    with plant_db() as s:
        flour = s.scalars(
            select(MaterialDefinition).where(MaterialDefinition.external_id == "FLOUR-WHEAT")
        ).one()
        assert (flour.unit, flour.unit_conversions) == ("kg", {"BAG": "25"})
    assert counts(plant_db)["material_definition"] == before["material_definition"]


def test_the_unit_from_property_values_and_from_value_unit_of_measure() -> None:
    by_values = decode(definition(prop("NetWeight", "25", "KGM") + prop("Colour", "white"), "RYE"))
    assert isinstance(by_values, SyncMasterData)
    assert by_values.plant["materials"][0]["unit"] == "KGM"
    nested = decode(definition(prop("UOM", "", "LTR"), "OIL"))  # Value/UnitOfMeasure
    assert isinstance(nested, SyncMasterData)
    assert nested.plant["materials"][0]["unit"] == "LTR"
    two = decode(definition(prop("NetWeight", "25", "KGM") + prop("Volume", "30", "LTR"), "Y"))
    assert isinstance(two, SyncMasterData)
    assert "unit" not in two.plant["materials"][0]  # which one? none taken


def test_a_new_definition_with_no_unit_anywhere_is_refused(
    plant_db: sessionmaker[Session],
) -> None:
    before = counts(plant_db)
    with pytest.raises(MasterDataError) as caught:
        load(plant_db, definition(prop("Colour", "white"), "NEW-FLOUR"))
    assert caught.value.problems == [
        "materials[0] (NEW-FLOUR): no unit given (no UnitOfMeasure anywhere on it) and no "
        "stored NEW-FLOUR whose unit it could keep"
    ]
    assert counts(plant_db) == before


# --- lots in ----------------------------------------------------------------------------------


def test_sync_material_lot_creates_converted_lots_once_and_audits(
    plant_db: sessionmaker[Session],
) -> None:
    data = fixture("third-party-material-lot.xml")
    before = counts(plant_db)
    assert load(plant_db, data) == "created 2, updated 0, unchanged 0, deleted 0"
    assert lot(plant_db, "LOT-ACME-FLOUR-1") == (1200, "kg", "Released", "Available")
    assert lot(plant_db, "LOT-ACME-SALT-1") == (2.5, "kg", "Restricted", "Available")
    after = counts(plant_db)
    assert after["material_lot"] == before["material_lot"] + 2

    # The same message again changes nothing and records nothing.
    assert load(plant_db, data) == "created 0, updated 0, unchanged 2, deleted 0"
    assert counts(plant_db) == after

    # The ERP's next stock figure updates the lot, audited with before and after.
    update = sync("MaterialLot", lot_xml("LOT-ACME-FLOUR-1", "FLOUR-WHEAT", "900", "KGM"))
    assert load(plant_db, update) == "created 0, updated 1, unchanged 0, deleted 0"
    assert lot(plant_db, "LOT-ACME-FLOUR-1") == (900, "kg", "Released", "Available")
    with plant_db() as s:
        events = s.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.before, AuditEvent.after)
            .where(AuditEvent.object_id == "LOT-ACME-FLOUR-1")
            .order_by(AuditEvent.seq)
        ).all()
        assert [(e.action, e.actor) for e in events] == [
            ("lot.created", "erp:acme"),
            ("lot.updated", "erp:acme"),
        ]
        assert (events[1].before, events[1].after) == ({"quantity": 1200}, {"quantity": 900})
        assert verify(s).intact


def test_sync_material_information_loads_definitions_and_their_lots(
    plant_db: sessionmaker[Session],
) -> None:
    data = fixture("third-party-material-information.xml")
    assert load(plant_db, data) == "created 3, updated 0, unchanged 0, deleted 0"
    with plant_db() as s:
        rye = s.scalars(
            select(MaterialDefinition).where(MaterialDefinition.external_id == "FLOUR-RYE")
        ).one()
        assert (rye.unit, rye.unit_conversions) == ("KGM", {"BAG": "25"})
    assert lot(plant_db, "LOT-RYE-0001") == (100, "KGM", "Released", "Available")
    assert lot(plant_db, "LOT-RYE-0002") == (500, "KGM", "Restricted", "Available")
    assert load(plant_db, data) == "created 0, updated 0, unchanged 3, deleted 0"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (lot_xml("LOT-N", "NO-SUCH", "5", "kg"), "lots[1] (LOT-N): unknown material 'NO-SUCH'"),
        (
            lot_xml("LOT-N", "FLOUR-WHEAT", "5", "EA"),
            "lots[1] (LOT-N): unit 'EA' does not convert to FLOUR-WHEAT's unit 'kg'",
        ),
        (
            lot_xml("LOT-N", "FLOUR-WHEAT", "-5", "kg"),
            "MaterialLot LOT-N: quantity -5 kg is negative",
        ),
    ],
)
def test_a_bad_lot_refuses_the_whole_message_and_changes_nothing(
    plant_db: sessionmaker[Session], body: str, problem: str
) -> None:
    good = lot_xml("LOT-GOOD", "SALT", "1", "kg")
    before = counts(plant_db)
    with pytest.raises((MasterDataError, B2MMLError)) as caught:
        load(plant_db, sync("MaterialLot", good + body))
    assert str(caught.value).startswith(problem)
    assert counts(plant_db) == before
    assert lot(plant_db, "LOT-GOOD") is None


def test_a_lot_cannot_change_material(plant_db: sessionmaker[Session]) -> None:
    with pytest.raises(MasterDataError) as caught:
        load(plant_db, sync("MaterialLot", lot_xml("LOT-SALT-0001", "FLOUR-WHEAT", "1", "kg")))
    assert "a lot cannot change material" in str(caught.value)


def test_mes_load_takes_lot_messages(plant_db: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "stock.xml"
    path.write_bytes(fixture("third-party-material-lot.xml"))
    plant, partial = read_master_data_file(path)
    assert partial
    assert [x.id for x in plant.lots] == ["LOT-ACME-FLOUR-1", "LOT-ACME-SALT-1"]
    report = load_plant_file(plant_db, path)
    assert (report.created, report.updated) == (2, 0)
    assert str(load_plant_file(plant_db, path)).startswith("created 0, updated 0")
    assert lot(plant_db, "LOT-ACME-FLOUR-1") == (1200, "kg", "Released", "Available")


# --- SyncOperationsSchedule -------------------------------------------------------------------


def test_sync_operations_schedule_decodes_as_process_or_change() -> None:
    data = example("process-operations-schedule.xml")
    data = data.replace(b"ProcessOperationsSchedule", b"SyncOperationsSchedule")
    data = data.replace(b'<Process acknowledgeCode="Always"/>', b"<Sync/>")
    message = decode(data)
    assert isinstance(message, SyncOperationsSchedule)
    numbers = [r.order_number for r in message.requests]
    new = message.as_process({numbers[0]})
    changed = message.as_change({numbers[1]})
    assert [r.order_number for r in new.requests] == numbers[:1]
    assert [r.order_number for r in changed.requests] == numbers[1:]
    assert (new.bod_id, changed.sender, changed.created) == (
        message.bod_id,
        message.sender,
        message.created,
    )
    assert changed.requests[0].quantity == message.requests[1].quantity


def test_lot_count_by_sql_helper_sees_lots(plant_db: sessionmaker[Session]) -> None:
    with plant_db() as s:
        assert counts(plant_db)["material_lot"] == s.scalar(
            select(func.count()).select_from(MaterialLot)
        )


def test_an_order_amount_in_the_products_own_unit_is_converted() -> None:
    from mes.b2mml import choose_amount
    from mes.b2mml.parsing import QuantityData

    amounts = [QuantityData(Decimal(2), "CASE", None)]
    assert choose_amount(amounts, "ea", "OperationsRequest X", {"CASE": Decimal(24)}) == (
        Decimal(48),
        "ea",
    )
    with pytest.raises(B2MMLError):
        choose_amount(amounts, "ea", "OperationsRequest X")
