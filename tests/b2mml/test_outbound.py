"""Every B2MML message the MES sends validates against the official XSDs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from mes.b2mml import (
    NS,
    ChangeOperationsSchedule,
    MaterialActualData,
    OperationsPerformanceData,
    ProcessOperationsSchedule,
    SegmentResponseData,
    acknowledge_operations_schedule,
    confirm_bod,
    decode,
    parse_xml,
    respond_operations_schedule,
    sync_operations_performance,
)
from mes.models import RequestState
from tests.b2mml.conftest import example
from tests.b2mml.test_decode import THIRD_PARTY

N = {"b": NS}
PROCESS = example("process-operations-schedule.xml")


def valid(data: bytes, root: str) -> Any:
    """The parsed document: well-formed, XSD-valid (parse_xml checks), of the right type."""
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    element = parse_xml(data)
    assert element.tag == f"{{{NS}}}{root}"
    area = element.find("b:ApplicationArea", N)
    assert area.findtext("b:Sender/b:LogicalID", namespaces=N)
    assert area.findtext("b:CreationDateTime", namespaces=N).endswith("Z")
    assert area.findtext("b:BODID", namespaces=N)
    return element


def process(data: bytes = PROCESS) -> ProcessOperationsSchedule:
    message = decode(data)
    assert isinstance(message, ProcessOperationsSchedule)
    return message


def change() -> ChangeOperationsSchedule:
    message = decode(example("change-operations-schedule.xml"))
    assert isinstance(message, ChangeOperationsSchedule)
    return message


# Two schedules in one message: the answer keeps them apart.
TWO_SCHEDULES = PROCESS.replace(
    b"      <OperationsRequest>\n        <ID>PO-2030-0002</ID>",
    b"    </OperationsSchedule>\n    <OperationsSchedule>\n      <ID>SCHED-B</ID>\n"
    b"      <OperationsRequest>\n        <ID>PO-2030-0002</ID>",
)


# --- AcknowledgeOperationsSchedule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "accepted", "rejected"),
    [
        (PROCESS, [("PO-2030-0001", "Released"), ("PO-2030-0002", "Released")], []),
        (PROCESS, [("PO-2030-0001", "Waiting")], [("PO-2030-0002", "unknown product ROLL-6PK")]),
        (PROCESS, [], [("PO-2030-0001", "bad\x00reason <&> ünïcode"), ("PO-2030-0002", "")]),
        (TWO_SCHEDULES, [("PO-2030-0002", "Ready")], []),
        (THIRD_PARTY, [("000100234", "Released")], []),
    ],
)
def test_acknowledge_is_valid(
    data: bytes, accepted: list[tuple[str, str]], rejected: list[tuple[str, str]]
) -> None:
    original = process(data)
    out = acknowledge_operations_schedule(original, accepted, "MES-SPRINGFIELD", rejected=rejected)

    root = valid(out, "AcknowledgeOperationsSchedule")
    assert root.get("releaseID") == "7.01"
    verb = root.find("b:DataArea/b:Acknowledge", N)
    assert verb.findtext("b:OriginalApplicationArea/b:BODID", namespaces=N) == original.bod_id
    actions = [
        (e.text, e.get("actionCode"))
        for e in verb.findall("b:ResponseCriteria/b:ResponseExpression", N)
    ]
    assert actions == [
        *[(f"/OperationsSchedule/OperationsRequest[ID='{n}']", "Accepted") for n, _ in accepted],
        *[(f"/OperationsSchedule/OperationsRequest[ID='{n}']", "Rejected") for n, _ in rejected],
    ]
    schedules = root.findall("b:DataArea/b:OperationsSchedule", N)
    echoed = {
        r.findtext("b:ID", namespaces=N): r.findtext("b:RequestState", namespaces=N)
        for s in schedules
        for r in s.findall("b:OperationsRequest", N)
    }
    assert echoed == {r.order_number: dict(accepted).get(r.order_number) for r in original.requests}
    assert len(schedules) == len({r.schedule_id for r in original.requests})


def test_acknowledge_refuses_what_the_original_does_not_hold() -> None:
    with pytest.raises(ValueError, match="not in the original message: PO-9"):
        acknowledge_operations_schedule(process(), [("PO-9", "Released")], "MES")
    with pytest.raises(ValueError, match="'Baking' is not an ISA-95 request state"):
        acknowledge_operations_schedule(process(), [("PO-2030-0001", "Baking")], "MES")


# --- RespondOperationsSchedule ----------------------------------------------------------------


@pytest.mark.parametrize(
    "results",
    [
        [("PO-2030-0001", True, None)],
        [("PO-2030-0001", False, "order PO-2030-0001 is Running; it can no longer change")],
        [("PO-2030-0001", False, None)],
    ],
)
def test_respond_is_valid(results: list[tuple[str, bool, str | None]]) -> None:
    out = respond_operations_schedule(change(), results, "MES", bod_id="answer-1")

    root = valid(out, "RespondOperationsSchedule")
    assert root.findtext("b:ApplicationArea/b:BODID", namespaces=N) == "answer-1"
    criteria = root.find("b:DataArea/b:Respond/b:ResponseCriteria", N)
    _, accepted, reason = results[0]
    action = "Accepted" if accepted else "Rejected"
    assert criteria.find("b:ResponseExpression", N).get("actionCode") == action
    assert criteria.findtext("b:ChangeStatus/b:Code", namespaces=N) == action
    assert criteria.findtext("b:ChangeStatus/b:Reason", namespaces=N) == reason
    request = root.find("b:DataArea/b:OperationsSchedule/b:OperationsRequest", N)
    expected = None if accepted else (reason or "change refused")
    assert request.findtext("b:Description", namespaces=N) == expected


def test_respond_to_several_changes() -> None:
    data = example("change-operations-schedule.xml")
    start = data.index(b"<OperationsRequest>")
    end = data.index(b"</OperationsRequest>") + len(b"</OperationsRequest>")
    second = data[start:end].replace(b"PO-2030-0001", b"PO-2030-0003")
    message = decode(data[:end] + b"\n      " + second + data[end:])
    assert isinstance(message, ChangeOperationsSchedule)

    out = respond_operations_schedule(
        message, [("PO-2030-0001", True, None), ("PO-2030-0003", False, "unknown order")], "MES"
    )

    root = valid(out, "RespondOperationsSchedule")
    codes = root.findall("b:DataArea/b:Respond/b:ResponseCriteria/b:ChangeStatus/b:Code", N)
    assert [c.text for c in codes] == ["Accepted", "Rejected"]


# --- ConfirmBOD -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original_bod_id", "errors", "created"),
    [
        ("9f1c2e34", ["line 12: Element 'Priority': 'high' is not a valid value"], None),
        (None, ["not well-formed XML: line 1: Couldn't find end of Start Tag"], None),
        ("b-2", [f"problem {i}: \x07 <![CDATA[ ]]>" for i in range(30)], datetime(2030, 1, 1)),
        ("b-3", [], datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))),
    ],
)
def test_confirm_bod_is_valid(
    original_bod_id: str | None, errors: list[str], created: datetime | None
) -> None:
    out = confirm_bod(
        original_bod_id,
        "ProcessOperationsSchedule",
        errors,
        "MES",
        original_sender="ERP" if created else None,
        original_created=created,
    )

    root = valid(out, "ConfirmBOD")
    assert root.get("releaseID") is None  # V0701 declares no attribute on ConfirmBOD
    bod = root.find("b:DataArea/b:BOD", N)
    assert bod.findtext("b:OriginalApplicationArea/b:BODID", namespaces=N) == original_bod_id
    descriptions = [d.text for d in bod.findall("b:Description", N)]
    assert len(descriptions) == max(len(errors), 1)
    action = root.find("b:DataArea/b:Confirm/b:ResponseCriteria/b:ResponseExpression", N)
    assert action.get("actionCode") == ("Rejected" if errors else "Accepted")


# --- SyncOperationsPerformance ----------------------------------------------------------------

T0 = datetime(2030, 3, 1, 6, tzinfo=UTC)


def performance(state: str = "Running", **changes: Any) -> OperationsPerformanceData:
    fields: dict[str, Any] = {
        "order_number": "PO-2030-0001",
        "state": state,
        "operations_definition_id": "OD-BREAD-WHITE",
        "actual_start": T0,
        "actual_end": T0 + timedelta(hours=2) if state == "Completed" else None,
        "schedule_id": "SCHED-2030-03-01",
        "segments": [
            SegmentResponseData(
                id="PO-2030-0001-MIX",
                process_segment_id="MIX",
                operations_segment_id="MIX",
                state="Completed",
                actual_start=T0,
                actual_end=T0 + timedelta(minutes=40),
                equipment_id="WU-MIXER-1",
                material_actuals=[
                    MaterialActualData(
                        "FLOUR-WHEAT", Decimal(150), "kg", "Consumed", "LOT-FLOUR-0001"
                    ),
                    MaterialActualData(
                        "YEAST-FRESH", Decimal("0.006") * 500, "kg", "Consumed", "LOT-Y-1"
                    ),
                    MaterialActualData(
                        "DOUGH-WHITE", Decimal(260), "kg", "Produced", "LOT-DOUGH-1"
                    ),
                ],
            ),
            SegmentResponseData(
                id="PO-2030-0001-BAKE",
                process_segment_id="BAKE",
                operations_segment_id="BAKE",
                state="Running" if state != "Completed" else "Completed",
                actual_start=T0 + timedelta(minutes=45),
            ),
        ],
    }
    fields.update(changes)
    return OperationsPerformanceData(**fields)


@pytest.mark.parametrize("state", [s.value for s in RequestState])
def test_performance_is_valid_in_every_request_state(state: str) -> None:
    out = sync_operations_performance(performance(state), "perf-1", "MES")

    root = valid(out, "SyncOperationsPerformance")
    assert root.get("releaseID") == "7.01"
    assert root.findtext("b:ApplicationArea/b:BODID", namespaces=N) == "perf-1"
    perf = root.find("b:DataArea/b:OperationsPerformance", N)
    response = perf.find("b:OperationsResponse", N)
    for element in (perf.find("b:PerformanceState", N), response.find("b:ResponseState", N)):
        if state in ("Forecast", "Released", "Cancelled"):  # not in ResponseStateType
            assert (element.text, element.get("OtherValue")) == ("Other", state)
        else:
            assert (element.text, element.get("OtherValue")) == (state, None)
    # V0701 spells the performance's end "Endtime", the response's "EndTime".
    if state == "Completed":
        assert perf.findtext("b:Endtime", namespaces=N) == "2030-03-01T08:00:00Z"
        assert response.findtext("b:EndTime", namespaces=N) == "2030-03-01T08:00:00Z"
    assert response.findtext("b:OperationsRequestID", namespaces=N) == "PO-2030-0001"
    segments = response.findall("b:SegmentResponse", N)
    assert [s.findtext("b:OperationsSegmentID", namespaces=N) for s in segments] == ["MIX", "BAKE"]
    actuals = segments[0].findall("b:MaterialActual", N)
    assert [
        (
            a.findtext("b:MaterialLotID", namespaces=N),
            a.findtext("b:MaterialUse", namespaces=N),
            a.findtext("b:Quantity/b:QuantityString", namespaces=N),
            a.findtext("b:Quantity/b:UnitOfMeasure", namespaces=N),
        )
        for a in actuals
    ] == [
        ("LOT-FLOUR-0001", "Consumed", "150", "kg"),
        ("LOT-Y-1", "Consumed", "3", "kg"),
        ("LOT-DOUGH-1", "Produced", "260", "kg"),
    ]


@pytest.mark.parametrize(
    "quantity", ["0.1", "1e-7", "123456789.125", "6", "0.0", "88.650000", "0.000001"]
)
def test_performance_quantities_are_xsd_decimals(quantity: str) -> None:
    actual = MaterialActualData("BREAD-WHITE", Decimal(quantity), "ea", "Produced", None)
    segment = SegmentResponseData("S1", "BAKE", "Completed", material_actuals=[actual])
    perf = performance("Completed", segments=[segment], actual_start=None, actual_end=None)

    root = valid(sync_operations_performance(perf, "p", "MES"), "SyncOperationsPerformance")
    text = root.findtext(".//b:QuantityString", namespaces=N)
    assert Decimal(text) == Decimal(quantity)  # digit for digit, no float on the way
    assert "e" not in text.lower()


def test_performance_to_json_round_trips() -> None:
    perf = performance("Completed")

    data = perf.to_json()

    assert json.loads(json.dumps(data)) == data
    assert data["state"] == "Completed"
    assert data["actual_end"] == "2030-03-01T08:00:00+00:00"
    assert data["segments"][0]["material_actuals"][0] == {
        "material_definition_id": "FLOUR-WHEAT",
        "lot_id": "LOT-FLOUR-0001",
        "quantity": 150.0,
        "unit": "kg",
        "use": "Consumed",
    }
    assert OperationsPerformanceData.from_json(data) == perf


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state": "Baking"}, "'Baking' is not an ISA-95 request or response state"),
        ({"actual_start": datetime(2030, 1, 1)}, "has no time zone"),
        ({"segments": []}, "at least one segment response"),
        (
            {"segments": [SegmentResponseData("S", "MIX", "Done")]},
            "segment S: 'Done' is not an ISA-95",
        ),
        (
            {
                "segments": [
                    SegmentResponseData(
                        "S",
                        "MIX",
                        "Running",
                        material_actuals=[
                            MaterialActualData("X", Decimal("NaN"), "kg", "Consumed")
                        ],
                    )
                ]
            },
            "NaN is not a finite number",
        ),
        (
            {
                "segments": [
                    SegmentResponseData(
                        "S",
                        "MIX",
                        "Running",
                        material_actuals=[MaterialActualData("X", Decimal(1), "kg", "Eaten")],
                    )
                ]
            },
            "'Eaten' is not a B2MML MaterialUse",
        ),
    ],
)
def test_performance_refuses_what_b2mml_cannot_say(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sync_operations_performance(performance(**changes), "p", "MES")
