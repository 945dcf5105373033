"""Decoding inbound B2MML: the examples, a third party's own document, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from mes.b2mml import (
    B2MMLError,
    CancelOperationsSchedule,
    ChangeOperationsSchedule,
    OrderRequest,
    ProcessOperationsSchedule,
    SyncMasterData,
    decode,
)
from mes.production_orders import ProductionOrderIn
from tests.b2mml.conftest import example

CET = timezone(timedelta(hours=1))


def process(data: bytes) -> ProcessOperationsSchedule:
    message = decode(data)
    assert isinstance(message, ProcessOperationsSchedule)
    return message


# --- the examples -----------------------------------------------------------------------------


def test_process_example_gives_two_orders() -> None:
    message = process(example("process-operations-schedule.xml"))

    assert message.bod_id == "9f1c2e34-5b6a-4c7d-8e9f-0a1b2c3d4e5f"
    assert (message.sender, message.confirmation_code) == ("ERP-SPRINGFIELD", "OnError")
    assert message.acknowledge_code == "Always"
    assert message.created == datetime(2030, 3, 1, 5, 30, tzinfo=UTC)
    assert message.schedule_id == "SCHED-2030-03-01"
    bread, rolls = message.requests
    assert ProductionOrderIn(
        **bread.to_order_in().model_dump(exclude={"erp"})
    ) == ProductionOrderIn(
        order_number="PO-2030-0001",
        product="BREAD-WHITE",
        quantity=500.0,
        unit="ea",
        due=datetime(2030, 3, 1, 14, tzinfo=CET),
        priority=5,
    )
    assert (bread.routing, bread.start, bread.state) == (
        "OD-BREAD-WHITE",
        datetime(2030, 3, 1, 6, tzinfo=CET),
        "Released",
    )
    assert bread.description == "White loaves for the weekend"
    assert bread.segment_ids == ["MIX", "BAKE"]
    assert [s.id for s in bread.segments] == ["PO-2030-0001-10", "PO-2030-0001-20"]
    order = rolls.to_order_in()
    # The Produced requirement, not the bags consumed beside it.
    assert (order.product, order.quantity, order.unit) == ("ROLL-6PK", Decimal(200), "ea")
    assert (order.due, order.priority) == (datetime(2030, 3, 1, 17, tzinfo=UTC), 3)
    assert rolls.routing == "OD-ROLL-6PK"
    assert rolls.segment_ids == ["MIX", "BAKE", "PACK"]
    assert rolls.start is None


def test_change_example() -> None:
    message = decode(example("change-operations-schedule.xml"))

    assert isinstance(message, ChangeOperationsSchedule)
    assert message.bod_id == "2b7d9a10-3c4e-4f5a-9b8c-7d6e5f4a3b2c"
    assert message.response_code == "Always"
    (change,) = message.requests
    assert change.order_number == "PO-2030-0001"
    assert (change.quantity, change.unit) == (Decimal(600), "ea")
    assert change.due == datetime(2030, 3, 1, 16, tzinfo=CET)
    assert change.priority == 8
    assert change.segment_ids == ["BAKE"]


def test_cancel_example() -> None:
    message = decode(example("cancel-operations-schedule.xml"))

    assert isinstance(message, CancelOperationsSchedule)
    assert message.order_ids == ["PO-2030-0002"]
    assert (message.bod_id, message.confirmation_code) == (
        "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
        "Always",
    )


def test_sync_material_definition_example() -> None:
    message = decode(example("sync-material-definition.xml"))

    assert isinstance(message, SyncMasterData)
    assert message.noun == "MaterialDefinition"
    assert message.bod_id == "c0ffee00-1234-4abc-8def-000000000001"
    assert message.plant == {
        "materials": [
            {
                "id": "SEEDS-SESAME",
                "description": "Sesame seeds, hulled",
                "material_class": "Raw",
                "unit": "kg",
            },
            {"id": "SALT", "description": "Fine sea salt", "material_class": "Raw", "unit": "kg"},
        ]
    }


# --- written by someone else ------------------------------------------------------------------

# As a third-party ERP might write it: a "b2mml:" prefix, optional elements we ignore
# (Version, HierarchyScope, personnel and equipment requirements, parameters, extension
# namespace declarations, comments), the product in a nested SegmentRequirementChild with
# its unit as a unitCode attribute, no Priority, no StartTime, no ConfirmationCode, padded
# ids, and a time with fractional seconds and a negative offset.
THIRD_PARTY = """<?xml version="1.0" encoding="ISO-8859-1"?>
<b2mml:ProcessOperationsSchedule
    xmlns:b2mml="http://www.mesa.org/xml/B2MML"
    xmlns:ext="http://www.mesa.org/xml/B2MML-AllExtensions"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    releaseID="7.01" versionID="1">
  <b2mml:ApplicationArea>
    <b2mml:Sender><b2mml:LogicalID>SAP-PRD-100</b2mml:LogicalID>
      <b2mml:ComponentID>PP</b2mml:ComponentID></b2mml:Sender>
    <b2mml:Receiver><b2mml:LogicalID>MES</b2mml:LogicalID></b2mml:Receiver>
    <b2mml:CreationDateTime>2031-06-30T22:15:00.250-04:00</b2mml:CreationDateTime>
    <b2mml:BODID>  SAP-000000123  </b2mml:BODID>
  </b2mml:ApplicationArea>
  <b2mml:DataArea>
    <b2mml:Process/>
    <b2mml:OperationsSchedule>
      <b2mml:ID>W27</b2mml:ID>
      <b2mml:Description languageID="de">Wochenplan 27</b2mml:Description>
      <b2mml:Version>3</b2mml:Version>
      <b2mml:PublishedDate>2031-06-30T20:00:00Z</b2mml:PublishedDate>
      <b2mml:HierarchyScope>
        <b2mml:EquipmentID>SPRINGFIELD</b2mml:EquipmentID>
        <b2mml:EquipmentLevel>Site</b2mml:EquipmentLevel>
      </b2mml:HierarchyScope>
      <b2mml:OperationsType>Production</b2mml:OperationsType>
      <!-- one order, Brötchen -->
      <b2mml:OperationsRequest>
        <b2mml:ID> 000100234 </b2mml:ID>
        <b2mml:Description>Brötchen für Kunde 4711</b2mml:Description>
        <b2mml:Description>second description, ignored</b2mml:Description>
        <b2mml:EndTime>2031-07-01T23:59:59.999-04:00</b2mml:EndTime>
        <b2mml:SegmentRequirement>
          <b2mml:ID>0010</b2mml:ID>
          <b2mml:EarliestStartTime>2031-07-01T04:00:00-04:00</b2mml:EarliestStartTime>
          <b2mml:ProcessSegmentID>MIX</b2mml:ProcessSegmentID>
          <b2mml:Duration>PT30M</b2mml:Duration>
          <b2mml:OperationsDefinitionID>OD-ROLL-6PK</b2mml:OperationsDefinitionID>
          <b2mml:OperationsSegmentID>MIX</b2mml:OperationsSegmentID>
          <b2mml:SegmentParameter>
            <b2mml:ID>MixTime</b2mml:ID>
            <b2mml:Value><b2mml:ValueString>420</b2mml:ValueString>
              <b2mml:UnitOfMeasure>s</b2mml:UnitOfMeasure></b2mml:Value>
          </b2mml:SegmentParameter>
          <b2mml:PersonnelRequirement>
            <b2mml:ID>P1</b2mml:ID><b2mml:PersonnelClassID>Baker</b2mml:PersonnelClassID>
          </b2mml:PersonnelRequirement>
          <b2mml:EquipmentRequirement>
            <b2mml:ID>E1</b2mml:ID><b2mml:EquipmentID>WU-MIXER-2</b2mml:EquipmentID>
          </b2mml:EquipmentRequirement>
          <b2mml:MaterialRequirement>
            <b2mml:ID>FLOUR</b2mml:ID>
            <b2mml:MaterialDefinitionID>FLOUR-WHEAT</b2mml:MaterialDefinitionID>
            <b2mml:MaterialUse>Consumed</b2mml:MaterialUse>
            <b2mml:Quantity><b2mml:QuantityString>28.8</b2mml:QuantityString>
              <b2mml:UnitOfMeasure>kg</b2mml:UnitOfMeasure></b2mml:Quantity>
          </b2mml:MaterialRequirement>
          <b2mml:SegmentRequirementChild>
            <b2mml:ID>0010-OUT</b2mml:ID>
            <b2mml:ProcessSegmentID>PACK</b2mml:ProcessSegmentID>
            <b2mml:OperationsDefinitionID>OD-ROLL-6PK</b2mml:OperationsDefinitionID>
            <b2mml:OperationsSegmentID>PACK</b2mml:OperationsSegmentID>
            <b2mml:MaterialRequirement>
              <b2mml:ID>OUT</b2mml:ID>
              <b2mml:MaterialDefinitionID>ROLL-6PK</b2mml:MaterialDefinitionID>
              <b2mml:Description>Product</b2mml:Description>
              <b2mml:MaterialUse>Produced</b2mml:MaterialUse>
              <b2mml:Quantity>
                <b2mml:QuantityString unitCode="ea"> 120.000 </b2mml:QuantityString>
              </b2mml:Quantity>
            </b2mml:MaterialRequirement>
          </b2mml:SegmentRequirementChild>
        </b2mml:SegmentRequirement>
      </b2mml:OperationsRequest>
    </b2mml:OperationsSchedule>
  </b2mml:DataArea>
</b2mml:ProcessOperationsSchedule>
""".encode("iso-8859-1")


def test_a_third_party_document_decodes() -> None:
    message = process(THIRD_PARTY)

    assert message.bod_id == "SAP-000000123"
    assert (message.sender, message.confirmation_code, message.acknowledge_code) == (
        "SAP-PRD-100",
        None,
        None,
    )
    (request,) = message.requests
    assert request.routing == "OD-ROLL-6PK"  # from the segment requirements
    assert request.description == "Brötchen für Kunde 4711"
    order = request.to_order_in()
    edt = timezone(timedelta(hours=-4))
    assert ProductionOrderIn(**order.model_dump(exclude={"erp"})) == ProductionOrderIn(
        order_number="000100234",
        product="ROLL-6PK",
        quantity=120.0,
        unit="ea",
        due=datetime(2031, 7, 1, 23, 59, 59, 999000, tzinfo=edt),
        priority=0,
    )
    # The nested SegmentRequirementChild is a step too, mapped and checked like the others.
    assert request.segment_ids == ["MIX", "PACK"]


# --- refused content --------------------------------------------------------------------------

PROCESS = example("process-operations-schedule.xml")


def edited(*edits: tuple[bytes, bytes]) -> bytes:
    data = PROCESS
    for old, new in edits:
        assert old in data, old
        data = data.replace(old, new, 1)
    return data


def first_request(data: bytes) -> OrderRequest:
    return process(data).requests[0]


def test_missing_produced_requirement_names_the_request() -> None:
    request = first_request(
        edited((b"<MaterialUse>Produced</MaterialUse>", b"<MaterialUse>Consumed</MaterialUse>"))
    )
    with pytest.raises(B2MMLError) as caught:
        request.to_order_in()
    assert caught.value.reasons == [
        "OperationsRequest PO-2030-0001: no MaterialRequirement with MaterialUse Produced "
        "names the product"
    ]


def test_missing_quantity_and_due_are_both_named() -> None:
    request = first_request(
        edited(
            (b"<EndTime>2030-03-01T14:00:00+01:00</EndTime>", b""),
            (
                b"""<Quantity>
              <QuantityString>500</QuantityString>
              <DataType>decimal</DataType>
              <UnitOfMeasure>ea</UnitOfMeasure>
            </Quantity>""",
                b"",
            ),
        )
    )
    with pytest.raises(B2MMLError) as caught:
        request.to_order_in()
    assert caught.value.reasons == [
        "OperationsRequest PO-2030-0001: the Produced MaterialRequirement has no Quantity",
        "OperationsRequest PO-2030-0001: no EndTime (the due date)",
    ]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            (b"<UnitOfMeasure>ea</UnitOfMeasure>", b""),
            "the Produced quantity has no UnitOfMeasure",
        ),
        (
            (b"2030-03-01T14:00:00+01:00", b"2030-03-01T14:00:00"),
            "EndTime 2030-03-01T14:00:00 has no time zone",
        ),
        (
            (b"<QuantityString>500</QuantityString>", b"<QuantityString>-5</QuantityString>"),
            "quantity: Input should be greater than 0",
        ),
        (
            (b"<ID>PO-2030-0001</ID>", b"<ID>PO 2030/1</ID>"),
            "order_number: String should match pattern",
        ),
    ],
)
def test_unfit_order_is_refused_by_to_order_in(edit: tuple[bytes, bytes], reason: str) -> None:
    request = first_request(edited(edit))
    with pytest.raises(B2MMLError) as caught:
        request.to_order_in()
    assert caught.value.reasons[0].startswith(f"OperationsRequest {request.order_number}: ")
    assert reason in caught.value.reasons[0]


@pytest.mark.parametrize(
    ("edits", "reasons"),
    [
        (
            [
                (
                    b"<OperationsType>Production</OperationsType>\n        <Priority>5",
                    b"<OperationsType>Maintenance</OperationsType>\n        <Priority>5",
                )
            ],
            [
                "OperationsRequest PO-2030-0001: OperationsType Maintenance; only Production "
                "requests are orders"
            ],
        ),
        (
            [
                (
                    b"<OperationsType>Production</OperationsType>\n      <OperationsRequest>",
                    b"<OperationsType>Quality</OperationsType>\n      <OperationsRequest>",
                ),
                (
                    b"<OperationsType>Production</OperationsType>\n        <Priority>5",
                    b"<Priority>5",
                ),
            ],
            [
                "OperationsRequest PO-2030-0001: OperationsType Quality; only Production "
                "requests are orders"
            ],
        ),
        (
            [(b"<Priority>5</Priority>", b"<Priority>2.5</Priority>")],
            ["OperationsRequest PO-2030-0001: Priority 2.5 is not a whole number"],
        ),
        (
            [(b"<QuantityString>500</QuantityString>", b"<QuantityString>lots</QuantityString>")],
            [
                "OperationsRequest PO-2030-0001.MaterialRequirement PO-2030-0001-OUT.Quantity: "
                "'lots' is not a number"
            ],
        ),
        (
            [(b"<ID>PO-2030-0002</ID>", b"<ID>PO-2030-0001</ID>")],
            ["OperationsRequest PO-2030-0001: listed twice"],
        ),
        (
            [
                (
                    b"<OperationsDefinitionID>OD-BREAD-WHITE</OperationsDefinitionID>\n"
                    b"        <SegmentRequirement>",
                    b"<OperationsDefinitionID>OD-ROLL-6PK</OperationsDefinitionID>\n"
                    b"        <SegmentRequirement>",
                )
            ],
            [
                "OperationsRequest PO-2030-0001: OperationsDefinitionID OD-ROLL-6PK, but its "
                "segment requirements name OD-BREAD-WHITE"
            ],
        ),
    ],
)
def test_unusable_requests_are_refused_by_decode(
    edits: list[tuple[bytes, bytes]], reasons: list[str]
) -> None:
    with pytest.raises(B2MMLError) as caught:
        decode(edited(*edits))
    assert caught.value.reasons == reasons
    assert caught.value.bod_id == "9f1c2e34-5b6a-4c7d-8e9f-0a1b2c3d4e5f"
    assert caught.value.message_type == "ProcessOperationsSchedule"


def test_missing_operations_type_means_production() -> None:
    message = process(
        edited(
            (
                b"<OperationsType>Production</OperationsType>\n      <OperationsRequest>",
                b"<OperationsRequest>",
            ),
            (b"<OperationsType>Production</OperationsType>\n        <Priority>5", b"<Priority>5"),
        )
    )
    assert message.requests[0].to_order_in().product == "BREAD-WHITE"
