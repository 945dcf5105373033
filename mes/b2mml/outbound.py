"""Outbound B2MML: the answers to the ERP and the production report, as XSD-valid bytes.

Every builder validates what it built against the shipped XSDs before returning it: an
invalid document is a bug here, raised as ``RuntimeError`` rather than sent. Input the
schema cannot express (an unknown state, a naive datetime, an order number not in the
original message) is a ``ValueError``.

Each message has ``releaseID="7.01"`` (``ConfirmBOD`` excepted: V0701 declares no
attributes on it) and an ``ApplicationArea`` with ``Sender/LogicalID``,
``CreationDateTime`` (now, UTC) and ``BODID`` (a new UUID unless given).

How V0701 carries an answer: the verb (``Acknowledge``, ``Respond``, ``Confirm``) holds the
``OriginalApplicationArea`` of the message answered and one ``ResponseCriteria`` per order,
whose ``ResponseExpression`` (an XPath to the request, ``actionCode`` Accepted, Modified
or Rejected) and ``ChangeStatus`` (``Code``, ``Reason``, ``Description``, ``StateChange``)
say what became of it; the noun then repeats the requests as the MES now holds them. A
refusal's reason also goes into the echoed request's ``Description``, for ERPs that read
only the noun.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from lxml import etree  # type: ignore[import-untyped, unused-ignore]

from mes.b2mml.messages import (
    ChangeOperationsSchedule,
    ProcessOperationsSchedule,
    ScheduleRequest,
    SegmentRequest,
)
from mes.b2mml.parsing import NS, RELEASE_ID, Element, validation_errors
from mes.models import MaterialUse, RequestState
from mes.quantities import exact, json_number

__all__ = [
    "MaterialActualData",
    "OperationsPerformanceData",
    "SegmentResponseData",
    "acknowledge_operations_schedule",
    "confirm_bod",
    "respond_operations_schedule",
    "sync_operations_performance",
]

_REQUEST_STATES = {s.value for s in RequestState}
#: ResponseStateType of V0701. It lacks Forecast, Released and Cancelled, which a request
#: has: those go out as ``Other`` with the state in ``OtherValue``, the schema's way.
_RESPONSE_STATES = (_REQUEST_STATES - {
    RequestState.FORECAST, RequestState.RELEASED, RequestState.CANCELLED,
}) | {"Paused"}  # fmt: skip
#: MaterialUse1Type of V0701 (the MES itself uses the first five).
_MATERIAL_USES = {u.value for u in MaterialUse} | {
    "Yield Produced", "Material Consumed", "Material Produced", "Destructive Sample",
    "Returned Sample", "Retained Sample", "Inventoried",
}  # fmt: skip


# --- building blocks --------------------------------------------------------------------------


def _xml_text(value: str) -> str:
    """Text XML 1.0 can hold: characters it forbids (control codes in an exception's message,
    say) become U+FFFD instead of failing the whole answer."""
    return "".join(
        c
        if c in "\t\n\r"
        or "\x20" <= c <= "\ud7ff"
        or "\ue000" <= c <= "\ufffd"
        or "\U00010000" <= c <= "\U0010ffff"
        else "\ufffd"
        for c in value
    )


def _sub(parent: Element, name: str, value: str | None = None, **attributes: str) -> Element:
    element = etree.SubElement(parent, f"{{{NS}}}{name}", attributes)
    if value is not None:
        element.text = _xml_text(value)
    return element


def _timestamp(value: datetime, where: str) -> str:
    """An aware datetime as ``xsd:dateTime`` in UTC; naive ones are refused (which zone?)."""
    if value.tzinfo is None:
        raise ValueError(f"{where}: {value.isoformat()} has no time zone")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _echo_timestamp(value: datetime) -> str:
    """A received datetime echoed back: as the sender wrote it when it had no zone."""
    return value.isoformat() if value.tzinfo is None else _timestamp(value, "")


def _number(value: Decimal, where: str) -> str:
    """A quantity as an ``xsd:decimal`` lexical form, digit for digit, without exponent or
    trailing zeros: 500.000000 → "500", 0.006 → "0.006", 88.65 → "88.65"."""
    if not value.is_finite():
        raise ValueError(f"{where}: {value} is not a finite number")
    return format(value.normalize(), "f")


def _root(name: str, sender: str, bod_id: str | None, release: bool = True) -> Element:
    """The message root and its ``ApplicationArea``."""
    root = etree.Element(f"{{{NS}}}{name}", nsmap={None: NS})
    if release:
        root.set("releaseID", RELEASE_ID)
    area = _sub(root, "ApplicationArea")
    _sub(_sub(area, "Sender"), "LogicalID", sender)
    _sub(area, "CreationDateTime", _timestamp(datetime.now(UTC), "CreationDateTime"))
    _sub(area, "BODID", bod_id or str(uuid.uuid4()))
    return root


def _original_area(
    parent: Element, bod_id: str | None, sender: str | None, created: datetime | None
) -> None:
    """``OriginalApplicationArea``: which message this answers. CreationDateTime is required;
    when the original's could not be read, this answer's own time stands in."""
    area = _sub(parent, "OriginalApplicationArea")
    if sender is not None:
        _sub(_sub(area, "Sender"), "LogicalID", sender)
    when = _echo_timestamp(created) if created is not None else _timestamp(datetime.now(UTC), "")
    _sub(area, "CreationDateTime", when)
    if bod_id is not None:
        _sub(area, "BODID", bod_id)


def _criteria(
    verb: Element, order_number: str, action: str, to_state: str | None, reason: str | None
) -> None:
    """One ``ResponseCriteria``: what became of one request, and why."""
    criteria = _sub(verb, "ResponseCriteria")
    _sub(
        criteria,
        "ResponseExpression",
        f"/OperationsSchedule/OperationsRequest[ID='{order_number}']",
        actionCode=action,
        expressionLanguage="XPath",
    )
    status = _sub(criteria, "ChangeStatus")
    _sub(status, "Code", action)
    if reason:
        _sub(status, "Description", reason)
        _sub(status, "Reason", reason)
    if to_state is not None:
        _sub(_sub(status, "StateChange"), "ToStateCode", to_state)


def _echo_schedules(
    data_area: Element,
    requests: Sequence[ScheduleRequest],
    states: dict[str, str],
    reasons: dict[str, str],
) -> None:
    """The noun: each original schedule with its requests as the MES now holds them."""
    schedules: dict[str, list[ScheduleRequest]] = {}
    for request in requests:
        schedules.setdefault(request.schedule_id, []).append(request)
    for schedule_id, members in schedules.items():
        schedule = _sub(data_area, "OperationsSchedule")
        _sub(schedule, "ID", schedule_id)
        _sub(schedule, "OperationsType", "Production")
        for request in members:
            number = request.order_number
            _echo_request(schedule, request, states.get(number), reasons.get(number))


def _echo_request(
    schedule: Element, request: ScheduleRequest, state: str | None, reason: str | None
) -> None:
    element = _sub(schedule, "OperationsRequest")
    _sub(element, "ID", request.order_number)
    if reason:
        _sub(element, "Description", reason)
    if request.start is not None:
        _sub(element, "StartTime", _echo_timestamp(request.start))
    if request.due is not None:
        _sub(element, "EndTime", _echo_timestamp(request.due))
    _sub(element, "OperationsType", "Production")
    if request.priority is not None:
        _sub(element, "Priority", str(request.priority))
    if state is not None:
        _sub(element, "RequestState", state)
    if request.routing is not None:
        _sub(element, "OperationsDefinitionID", request.routing)
    for segment in request.segments:
        _echo_segment(element, segment)


def _echo_segment(request: Element, segment: SegmentRequest) -> None:
    # V0701 requires at least one SegmentRequirement, with these four ids, on every request.
    element = _sub(request, "SegmentRequirement")
    _sub(element, "ID", segment.id)
    _sub(element, "ProcessSegmentID", segment.process_segment_id)
    _sub(element, "OperationsDefinitionID", segment.operations_definition_id)
    _sub(element, "OperationsSegmentID", segment.operations_segment_id)


def _finish(root: Element) -> bytes:
    errors = validation_errors(root)
    if errors:
        raise RuntimeError("built a B2MML document the XSD refuses: " + "; ".join(errors))
    data: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    return data


def _known(original: Iterable[str], given: Iterable[str], what: str) -> None:
    unknown = sorted(set(given) - set(original))
    if unknown:
        raise ValueError(f"{what} not in the original message: {', '.join(unknown)}")


def _check_state(state: str, where: str) -> None:
    if state not in _REQUEST_STATES:
        raise ValueError(f"{where}: {state!r} is not an ISA-95 request state")


# --- answers ----------------------------------------------------------------------------------


def acknowledge_operations_schedule(
    original: ProcessOperationsSchedule,
    accepted: Sequence[tuple[str, str]],
    sender: str,
    *,
    rejected: Sequence[tuple[str, str]] = (),
    bod_id: str | None = None,
) -> bytes:
    """``AcknowledgeOperationsSchedule`` for a ``ProcessOperationsSchedule``.

    ``accepted`` lists (order number, request state such as "Released") of the orders the
    MES took; ``rejected`` (order number, reason) those it refused. Every request of the
    original is echoed, an accepted one with its ``RequestState``.
    """
    numbers = [r.order_number for r in original.requests]
    _known(numbers, [n for n, _ in [*accepted, *rejected]], "order numbers")
    for number, state in accepted:
        _check_state(state, f"order {number}")
    root = _root("AcknowledgeOperationsSchedule", sender, bod_id)
    data_area = _sub(root, "DataArea")
    verb = _sub(data_area, "Acknowledge")
    _original_area(verb, original.bod_id, original.sender, original.created)
    for number, state in accepted:
        _criteria(verb, number, "Accepted", state, None)
    for number, reason in rejected:
        _criteria(verb, number, "Rejected", None, reason)
    _echo_schedules(data_area, original.requests, dict(accepted), dict(rejected))
    return _finish(root)


def respond_operations_schedule(
    original: ChangeOperationsSchedule,
    results: Sequence[tuple[str, bool, str | None]],
    sender: str,
    *,
    bod_id: str | None = None,
) -> bytes:
    """``RespondOperationsSchedule`` for a ``ChangeOperationsSchedule``.

    ``results`` lists (order number, accepted, reason) per changed order: a refused change
    (the order already runs, say) is ``Rejected`` with its reason in
    ``ChangeStatus/Reason`` and in the echoed request's ``Description``.
    """
    numbers = [r.order_number for r in original.requests]
    _known(numbers, [n for n, _, _ in results], "order numbers")
    root = _root("RespondOperationsSchedule", sender, bod_id)
    data_area = _sub(root, "DataArea")
    verb = _sub(data_area, "Respond")
    _original_area(verb, original.bod_id, original.sender, original.created)
    reasons = {}
    for number, accepted, reason in results:
        _criteria(verb, number, "Accepted" if accepted else "Rejected", None, reason)
        if not accepted:
            reasons[number] = reason or "change refused"
    _echo_schedules(data_area, original.requests, {}, reasons)
    return _finish(root)


def confirm_bod(
    original_bod_id: str | None,
    noun: str,
    errors: Sequence[str],
    sender: str,
    *,
    bod_id: str | None = None,
    original_sender: str | None = None,
    original_created: datetime | None = None,
) -> bytes:
    """``ConfirmBOD``: the message ``original_bod_id`` (of type ``noun``, such as
    "ProcessOperationsSchedule") was refused with ``errors``, or accepted when there are none.

    Each error is one ``BOD/Description``. V0701's ConfirmBOD has no ``releaseID``.
    """
    root = _root("ConfirmBOD", sender, bod_id, release=False)
    data_area = _sub(root, "DataArea")
    verb = _sub(data_area, "Confirm")
    _original_area(verb, original_bod_id, original_sender, original_created)
    action = "Rejected" if errors else "Accepted"
    criteria = _sub(verb, "ResponseCriteria")
    _sub(criteria, "ResponseExpression", noun, actionCode=action)
    _sub(_sub(criteria, "ChangeStatus"), "Code", action)
    bod = _sub(data_area, "BOD")
    _original_area(bod, original_bod_id, original_sender, original_created)
    for error in errors or [f"{noun} accepted"]:
        _sub(bod, "Description", error)
    _sub(bod, "Note", noun)
    return _finish(root)


# --- production performance -------------------------------------------------------------------


@dataclass(frozen=True)
class MaterialActualData:
    """Material one step used or made (ISA-95 material actual)."""

    material_definition_id: str
    quantity: Decimal
    unit: str
    #: "Consumed", "Produced", … (ISA-95 MaterialUse)
    use: str
    lot_id: str | None = None


@dataclass(frozen=True)
class SegmentResponseData:
    """What happened in one routing step (ISA-95 segment response)."""

    id: str
    process_segment_id: str
    #: ISA-95 request state of the step: "Waiting", "Running", "Completed", …
    state: str
    actual_start: datetime | None = None
    actual_end: datetime | None = None
    #: The routing step (operations segment) id.
    operations_segment_id: str | None = None
    #: The work unit that ran it.
    equipment_id: str | None = None
    material_actuals: list[MaterialActualData] = field(default_factory=list)
    #: The ERP's SegmentRequirement ID that asked for this step, when it sent one.
    segment_requirement_id: str | None = None
    #: The MES's job response id, once the machine reported.
    job_response_id: str | None = None


@dataclass(frozen=True)
class OperationsPerformanceData:
    """One order's performance: the content of ``SyncOperationsPerformance`` and its JSON."""

    order_number: str
    #: ISA-95 request state of the order: "Released", "Running", "Completed", …
    state: str
    operations_definition_id: str
    actual_start: datetime | None
    actual_end: datetime | None
    #: One per routing step, in routing order.
    segments: list[SegmentResponseData]
    schedule_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON equivalent: the same fields, datetimes as ISO 8601 strings."""

        def when(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "order_number": self.order_number,
            "operations_request_id": self.order_number,
            "state": self.state,
            "operations_definition_id": self.operations_definition_id,
            "schedule_id": self.schedule_id,
            "actual_start": when(self.actual_start),
            "actual_end": when(self.actual_end),
            "segments": [
                {
                    "id": seg.id,
                    "process_segment_id": seg.process_segment_id,
                    "operations_segment_id": seg.operations_segment_id,
                    "segment_requirement_id": seg.segment_requirement_id,
                    "job_response_id": seg.job_response_id,
                    "state": seg.state,
                    "actual_start": when(seg.actual_start),
                    "actual_end": when(seg.actual_end),
                    "equipment_id": seg.equipment_id,
                    "material_actuals": [
                        {
                            "material_definition_id": ma.material_definition_id,
                            "lot_id": ma.lot_id,
                            "quantity": json_number(ma.quantity),
                            "unit": ma.unit,
                            "use": ma.use,
                        }
                        for ma in seg.material_actuals
                    ],
                }
                for seg in self.segments
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OperationsPerformanceData:
        """The inverse of ``to_json`` (for a workflow that keeps the JSON form)."""

        def when(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value)

        return cls(
            order_number=data["order_number"],
            state=data["state"],
            operations_definition_id=data["operations_definition_id"],
            schedule_id=data.get("schedule_id"),
            actual_start=when(data.get("actual_start")),
            actual_end=when(data.get("actual_end")),
            segments=[
                SegmentResponseData(
                    id=seg["id"],
                    process_segment_id=seg["process_segment_id"],
                    operations_segment_id=seg.get("operations_segment_id"),
                    segment_requirement_id=seg.get("segment_requirement_id"),
                    job_response_id=seg.get("job_response_id"),
                    state=seg["state"],
                    actual_start=when(seg.get("actual_start")),
                    actual_end=when(seg.get("actual_end")),
                    equipment_id=seg.get("equipment_id"),
                    material_actuals=[
                        MaterialActualData(**(ma | {"quantity": exact(ma["quantity"])}))
                        for ma in seg["material_actuals"]
                    ],
                )
                for seg in data["segments"]
            ],
        )


def _response_state(parent: Element, name: str, state: str, where: str) -> None:
    if state in _RESPONSE_STATES:
        _sub(parent, name, state)
    elif state in _REQUEST_STATES:
        _sub(parent, name, "Other", OtherValue=state)
    else:
        raise ValueError(f"{where}: {state!r} is not an ISA-95 request or response state")


def sync_operations_performance(perf: OperationsPerformanceData, bod_id: str, sender: str) -> bytes:
    """``SyncOperationsPerformance``: one ``OperationsPerformance`` holding the order's
    ``OperationsResponse``, one ``SegmentResponse`` per step with its ``MaterialActual``s.

    The performance and the response take the order number as ID. V0701 spells the
    performance's end ``Endtime`` (the response's is ``EndTime``). States B2MML has no
    response state for (Released, Cancelled, Forecast) go out as ``Other`` with
    ``OtherValue``. The schema needs at least one segment response.
    """
    where = f"order {perf.order_number}"
    if not perf.segments:
        raise ValueError(f"{where}: B2MML needs at least one segment response")
    root = _root("SyncOperationsPerformance", sender, bod_id)
    data_area = _sub(root, "DataArea")
    _sub(data_area, "Sync")
    performance = _sub(data_area, "OperationsPerformance")
    _sub(performance, "ID", perf.order_number)
    start = None if perf.actual_start is None else _timestamp(perf.actual_start, where)
    end = None if perf.actual_end is None else _timestamp(perf.actual_end, where)
    if start is not None:
        _sub(performance, "StartTime", start)
    if end is not None:
        _sub(performance, "Endtime", end)  # sic: V0701's spelling on OperationsPerformance
    _sub(performance, "OperationsType", "Production")
    if perf.schedule_id is not None:
        _sub(performance, "OperationsScheduleID", perf.schedule_id)
    _response_state(performance, "PerformanceState", perf.state, where)

    response = _sub(performance, "OperationsResponse")
    _sub(response, "ID", perf.order_number)
    if start is not None:
        _sub(response, "StartTime", start)
    if end is not None:
        _sub(response, "EndTime", end)
    _sub(response, "OperationsType", "Production")
    _sub(response, "OperationsRequestID", perf.order_number)
    _sub(response, "OperationsDefinitionID", perf.operations_definition_id)
    _response_state(response, "ResponseState", perf.state, where)
    for seg in perf.segments:
        _segment_response(response, perf, seg)
    return _finish(root)


def _segment_response(
    response: Element, perf: OperationsPerformanceData, seg: SegmentResponseData
) -> None:
    where = f"order {perf.order_number} segment {seg.id}"
    element = _sub(response, "SegmentResponse")
    _sub(element, "ID", seg.id)
    if seg.actual_start is not None:
        _sub(element, "ActualStartTime", _timestamp(seg.actual_start, where))
    if seg.actual_end is not None:
        _sub(element, "ActualEndTime", _timestamp(seg.actual_end, where))
    _sub(element, "OperationsType", "Production")
    _sub(element, "ProcessSegmentID", seg.process_segment_id)
    _sub(element, "OperationsRequestID", perf.order_number)
    if seg.segment_requirement_id is not None:
        _sub(element, "SegmentRequirementID", seg.segment_requirement_id)
    _sub(element, "OperationsDefinitionID", perf.operations_definition_id)
    if seg.operations_segment_id is not None:
        _sub(element, "OperationsSegmentID", seg.operations_segment_id)
    if seg.job_response_id is not None:
        _sub(element, "JobResponseID", seg.job_response_id)
    _response_state(element, "SegmentState", seg.state, where)
    if seg.equipment_id is not None:
        actual = _sub(element, "EquipmentActual")
        _sub(actual, "ID", f"{seg.id}-EA1")
        _sub(actual, "EquipmentID", seg.equipment_id)
    for n, ma in enumerate(seg.material_actuals, start=1):
        ma_where = f"{where} material actual {n}"
        if ma.use not in _MATERIAL_USES:
            raise ValueError(f"{ma_where}: {ma.use!r} is not a B2MML MaterialUse")
        actual = _sub(element, "MaterialActual")
        _sub(actual, "ID", f"{seg.id}-MA{n}")
        _sub(actual, "MaterialDefinitionID", ma.material_definition_id)
        if ma.lot_id is not None:
            _sub(actual, "MaterialLotID", ma.lot_id)
        _sub(actual, "MaterialUse", ma.use)
        quantity = _sub(actual, "Quantity")
        _sub(quantity, "QuantityString", _number(ma.quantity, ma_where))
        _sub(quantity, "DataType", "decimal")
        _sub(quantity, "UnitOfMeasure", ma.unit)
