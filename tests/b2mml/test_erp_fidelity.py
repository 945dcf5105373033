"""ERP fidelity: third-party-shaped documents decoded, mapped, checked, stored and echoed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree  # type: ignore[import-untyped, unused-ignore]  # lxml: no type hints
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mes import units
from mes.b2mml import (
    B2MMLError,
    ProcessOperationsSchedule,
    acknowledge_operations_schedule,
    choose_amount,
    confirm_bod,
    decode,
    schema,
    sync_operations_performance,
)
from mes.b2mml.parsing import QuantityData
from mes.erp_segments import ErpLotChoice, ErpSegmentData, plan_segments
from mes.execution import plan_order, prepare_job
from mes.masterdata import parse_plant
from mes.models import (
    Equipment,
    MaterialDefinition,
    OperationsDefinition,
    OperationsRequest,
    SegmentRequirement,
)
from mes.production_orders import ProductionOrderIn, check_segments, create_order
from mes.reporting import performance
from tests.b2mml.test_sync import sync

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NS = "{http://www.mesa.org/xml/B2MML}"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def process(name: str) -> ProcessOperationsSchedule:
    message = decode(fixture(name))
    assert isinstance(message, ProcessOperationsSchedule)
    return message


def valid(xml: bytes, name: str) -> etree._Element:
    root = etree.fromstring(xml)
    assert schema().validate(root), schema().error_log
    assert etree.QName(root).localname == name
    return root


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"), [("EA", "ea"), ("C62", "ea"), ("KGM", "kg"), ("kg", "KG"), ("TNE", "t")]
)
def test_unit_spellings_are_one_unit(a: str, b: str) -> None:
    assert units.same(a, b)


def test_units_convert_within_a_dimension_only() -> None:
    assert units.factor("t", "KGM") == 1000
    assert units.factor("g", "kg") == Decimal("0.001")
    assert units.factor("kg", "ea") is None
    assert units.factor("t/h", "t") is None
    assert units.is_rate("t/h")
    assert units.is_rate("EA/H")
    assert not units.is_rate("t")


# --- quantities by meaning --------------------------------------------------------------------


def q(value: str, unit: str | None, key: str | None = None) -> QuantityData:
    return QuantityData(Decimal(value), unit, key)


def test_a_rate_before_the_amount_is_never_the_amount() -> None:
    amount = choose_amount([q("41.9", "t/h"), q("11.9", "t")], "kg", "R")
    assert amount == (Decimal("11900.0"), "kg")


def test_the_amount_keyed_wins_over_position() -> None:
    found = [q("5", "kg", "Scrap"), q("7", "kg", "Amount"), q("9", "kg")]
    assert choose_amount(found, "kg", "R") == (Decimal(7), "kg")


@pytest.mark.parametrize(
    ("found", "reason"),
    [
        ([q("41.9", "t/h")], "no Quantity in the product's unit 'kg'"),
        ([q("3", "kg"), q("4", "kg")], "2 different amounts"),
        ([q("3", "ea")], "no Quantity in the product's unit 'kg'"),
    ],
)
def test_no_or_ambiguous_amount_is_refused_with_a_reason(
    found: list[QuantityData], reason: str
) -> None:
    with pytest.raises(B2MMLError, match=reason):
        choose_amount(found, "kg", "R")


# --- decoding a third-party schedule ----------------------------------------------------------


def test_third_party_schedule_decodes_with_per_step_data() -> None:
    message = process("third-party-schedule.xml")
    (request,) = message.requests
    order = request.to_order_in("ea")
    assert (order.quantity, order.unit) == (Decimal(12), "ea")  # the rate (41.9 EA/H) is skipped
    assert order.erp.schedule_id == "ACME-SCHED-77"
    mix, bake, pack = order.erp.segments
    assert (mix.id, mix.equipment) == ("0010", ["WU-MIXER-2"])
    assert (bake.operations_segment_id, bake.process_segment_id) == ("BAKE-OP", "BAKE")
    assert pack.lots == [
        ErpLotChoice(
            requirement_id="0030-BAG", material="BAG-6PK", lot="LOT-BAG6-0002", quantity=12.0,
            unit="C62",
        )
    ]  # fmt: skip
    assert pack.earliest_start == datetime(2031, 5, 5, 4, tzinfo=UTC)


# --- mapping and checking on the plant --------------------------------------------------------


def _routing(s: Session) -> OperationsDefinition:
    return s.scalars(
        select(OperationsDefinition).where(OperationsDefinition.external_id == "OD-ROLL-6PK")
    ).one()


def _count(s: Session, model: type[object]) -> int:
    return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_unknown_operation_is_named(plant_db: sessionmaker[Session]) -> None:
    order = process("third-party-unknown-operation.xml").requests[0].to_order_in("ea")
    with plant_db() as s:
        problems = check_segments(s, order)
    assert problems == [
        "SegmentRequirement 0025: names operation GLAZE, which routing OD-ROLL-6PK does not "
        "have (steps: MIX, BAKE, PACK)"
    ]


def seg(**fields: object) -> ErpSegmentData:
    return ErpSegmentData.model_validate({"id": "S1", "operations_segment_id": "PACK"} | fields)


@pytest.mark.parametrize(
    ("segment", "reason"),
    [
        (seg(lots=[{"requirement_id": "M", "lot": "NO-SUCH"}]), "lot NO-SUCH is unknown"),
        (
            seg(lots=[{"requirement_id": "M", "material": "BAG-6PK", "lot": "LOT-FLOUR-0001"}]),
            "is a lot of FLOUR-WHEAT, not of BAG-6PK",
        ),
        (
            seg(lots=[{"requirement_id": "M", "lot": "LOT-FLOUR-0001"}]),
            "FLOUR-WHEAT, which step PACK does not consume",
        ),
        (
            seg(lots=[{"requirement_id": "M", "lot": "LOT-BAG6-0001", "quantity": 60000}]),
            "holds 50000 ea, not enough for 60000",
        ),
        (seg(equipment=["WU-NOPE"]), "unknown equipment WU-NOPE"),
        (seg(equipment=["WU-OVEN-1"]), "WU-OVEN-1 cannot run work master WM-PACK-ROLL6"),
        (
            seg(
                earliest_start="2031-05-06T00:00:00Z",
                latest_end="2031-05-05T00:00:00Z",
            ),
            "is not before LatestEndTime",
        ),
        (seg(quantity=3, unit="kg"), "is not in step PACK's unit 'ea'"),
    ],
)
def test_segment_data_refused_with_a_reason(
    plant_db: sessionmaker[Session], segment: ErpSegmentData, reason: str
) -> None:
    with plant_db() as s:
        _, problems = plan_segments(s, _routing(s), Decimal(10), [segment])
    assert len(problems) == 1
    assert problems[0].startswith("SegmentRequirement S1")
    assert reason in problems[0]


def test_a_lot_not_released_is_refused(plant_db: sessionmaker[Session]) -> None:
    from mes.models import MaterialLot

    with plant_db() as s:
        lot = s.scalars(select(MaterialLot).where(MaterialLot.external_id == "LOT-BAG6-0001")).one()
        lot.disposition = "Restricted"
        s.commit()
        _, problems = plan_segments(
            s,
            _routing(s),
            Decimal(10),
            [seg(lots=[{"requirement_id": "M", "lot": "LOT-BAG6-0001"}])],
        )
    assert problems
    assert "is Restricted, not Released" in problems[0]


def test_accepted_order_keeps_erp_ids_and_uses_chosen_lot_and_unit(
    plant_db: sessionmaker[Session],
) -> None:
    body = process("third-party-schedule.xml").requests[0].to_order_in("ea")
    with plant_db() as s:
        order, created = create_order(s, body)
        assert created
        assert order.erp_schedule_id == "ACME-SCHED-77"
        reqs = {r.operations_segment.external_id: r for r in order.segment_requirements}
        assert {k: r.erp_id for k, r in reqs.items()} == {
            "MIX": "0010",
            "BAKE": "0020",
            "PACK": "0030",
        }
        mixer = s.scalars(select(Equipment).where(Equipment.external_id == "WU-MIXER-2")).one()
        assert reqs["MIX"].equipment_id == mixer.id
        assert reqs["PACK"].material_lots == [
            {"material": "BAG-6PK", "lot": "LOT-BAG6-0002", "quantity": 12.0}
        ]
        jobs = plan_order(s, order.id)
        _, plc = prepare_job(s, jobs[0])
        assert plc.equipment_id == "WU-MIXER-2"
        # The report back names the ERP's ids beside the MES's own, and is XSD-valid.
        perf = performance(s, order)
        doc = valid(sync_operations_performance(perf, "B1", "MES"), "SyncOperationsPerformance")
        assert doc.findtext(f".//{NS}OperationsScheduleID") == "ACME-SCHED-77"
        assert doc.findtext(f".//{NS}OperationsResponse/{NS}OperationsRequestID") == "ACME-4711"
        responses = doc.findall(f".//{NS}SegmentResponse")
        assert [r.findtext(f"{NS}SegmentRequirementID") for r in responses] == [
            "0010",
            "0020",
            "0030",
        ]
        assert [r.findtext(f"{NS}ID") for r in responses] == [
            "ACME-4711-01",
            "ACME-4711-02",
            "ACME-4711-03",
        ]
        as_json = perf.to_json()
        assert as_json["schedule_id"] == "ACME-SCHED-77"
        assert as_json["operations_request_id"] == "ACME-4711"
        assert [x["segment_requirement_id"] for x in as_json["segments"]] == [
            "0010",
            "0020",
            "0030",
        ]


def test_refused_segment_data_stores_nothing(plant_db: sessionmaker[Session]) -> None:
    body = process("third-party-unknown-operation.xml").requests[0].to_order_in("ea")
    with plant_db() as s:
        before = (_count(s, OperationsRequest), _count(s, SegmentRequirement))
        with pytest.raises(Exception, match="GLAZE"):
            create_order(s, body)
        s.rollback()
        assert (_count(s, OperationsRequest), _count(s, SegmentRequirement)) == before


def test_json_order_in_ea_for_a_product_in_ea_upper_case(plant_db: sessionmaker[Session]) -> None:
    body = ProductionOrderIn(
        order_number="JSON-EA-1",
        product="BREAD-WHITE",
        quantity=5.0,
        unit="EA",
        due=datetime(2031, 1, 1, tzinfo=UTC),
        priority=0,
    )
    with plant_db() as s:
        order, _ = create_order(s, body)
        assert (order.quantity, order.unit) == (Decimal(5), "ea")


# --- answers echo what they answer ------------------------------------------------------------


def test_refusal_acknowledge_rejects_the_whole_schedule_and_echoes() -> None:
    message = process("third-party-unknown-operation.xml")
    out = acknowledge_operations_schedule(
        message, [], "MES", rejected=[("ACME-4712", "SegmentRequirement 0025: GLAZE")]
    )
    root = valid(out, "AcknowledgeOperationsSchedule")
    original = root.find(f".//{NS}OriginalApplicationArea")
    assert original is not None
    assert original.findtext(f"{NS}Sender/{NS}LogicalID") == "ACME-ERP-PRD"
    assert original.findtext(f"{NS}BODID") == "ACME-BOD-0002"
    assert original.findtext(f"{NS}CreationDateTime") == "2031-05-04T06:15:00Z"
    assert root.find(f".//{NS}ResponseExpression").get("actionCode") == "Rejected"
    assert b"GLAZE" in out


def test_confirm_bod_echoes_sender_and_time() -> None:
    created = datetime(2031, 5, 4, 6, 15, tzinfo=UTC)
    out = confirm_bod(
        "B-1", "SyncEquipment", [], "MES", original_sender="ACME", original_created=created
    )
    root = valid(out, "ConfirmBOD")
    for area in root.iter(f"{NS}OriginalApplicationArea"):
        assert area.findtext(f"{NS}Sender/{NS}LogicalID") == "ACME"
        assert area.findtext(f"{NS}CreationDateTime") == "2031-05-04T06:15:00Z"
        assert area.findtext(f"{NS}BODID") == "B-1"


def test_a_refused_message_still_tells_sender_and_time() -> None:
    bad = fixture("third-party-schedule.xml").replace(b"<b2:Priority>4", b"<b2:Priority>x")
    with pytest.raises(B2MMLError) as caught:
        decode(bad)
    assert (caught.value.bod_id, caught.value.sender) == ("ACME-BOD-0001", "ACME-ERP-PRD")
    assert caught.value.created == datetime(2031, 5, 4, 6, 15, tzinfo=UTC)


# --- equipment levels -------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["Other", "EquipmentModule", "ControlModule", "StorageZone"])
def test_every_v0701_equipment_level_is_taken(plant_db: sessionmaker[Session], level: str) -> None:
    from mes.masterdata import load_plant

    data = sync(
        "Equipment",
        f"<Equipment><ID>EQ-{level}</ID>"
        "<HierarchyScope><EquipmentID>LINE-1</EquipmentID>"
        "<EquipmentLevel>ProductionLine</EquipmentLevel></HierarchyScope>"
        f"<EquipmentLevel>{level}</EquipmentLevel></Equipment>",
    )
    message = decode(data)
    plant = parse_plant(message.plant, partial=True)  # type: ignore[union-attr]
    with plant_db.begin() as s:
        load_plant(s, plant, partial=True)
    with plant_db() as s:
        stored = s.scalars(select(Equipment).where(Equipment.external_id == f"EQ-{level}")).one()
        assert stored.equipment_level == level


def test_material_units_in_another_spelling_are_the_material_unit(
    plant_db: sessionmaker[Session],
) -> None:
    with plant_db() as s:
        unit = s.scalar(
            select(MaterialDefinition.unit).where(MaterialDefinition.external_id == "BAG-6PK")
        )
    assert unit is not None
    assert units.same("C62", unit)
