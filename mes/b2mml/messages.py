"""Inbound B2MML: validated XML into plain, typed messages.

``decode(data)`` parses and validates (see ``parsing``) and returns one of:

- ``ProcessOperationsSchedule``: new production orders (``OrderRequest``);
- ``ChangeOperationsSchedule``: changed orders (``OrderChange``);
- ``CancelOperationsSchedule``: order numbers to cancel;
- ``SyncOperationsSchedule``: orders to create or change (``OrderRequest``): each request
  the MES does not hold yet is processed as by a Process, each one it holds changed as by
  a Change (``as_process``, ``as_change``);
- ``SyncMasterData``: a ``Sync…`` master data message as plant data (``mes.masterdata``),
  lots (``SyncMaterialLot``, ``SyncMaterialInformation``) included.

Where each field is read (paths below ``DataArea/OperationsSchedule/OperationsRequest``):

============================  ==========================================================
order_number                  ``ID``
routing                       ``OperationsDefinitionID``, else the one every
                              ``SegmentRequirement/OperationsDefinitionID`` names
product, quantity, unit       the last ``MaterialRequirement`` with ``MaterialUse``
                              Produced, in ``SegmentRequirement`` (and nested
                              ``SegmentRequirementChild``) in document order:
                              ``MaterialDefinitionID``, ``Quantity/QuantityString``,
                              ``Quantity/UnitOfMeasure`` (or ``QuantityString/@unitCode``)
due, start                    ``EndTime``, ``StartTime``
priority                      ``Priority`` (a whole number)
description                   the first ``Description``
segments                      each ``SegmentRequirement``: ``ID``, ``ProcessSegmentID``,
                              ``OperationsDefinitionID``, ``OperationsSegmentID`` (the
                              routing step)
============================  ==========================================================

V0701 has no ``MaterialRequirement`` directly on ``OperationsRequest``: only segment
requirements carry them. ``OperationsType`` is read on the request, else on its schedule;
a request with neither is taken as Production (it came to the MES's order route), any
other type is refused. The envelope gives ``bod_id`` (``ApplicationArea/BODID``),
``sender`` (``ApplicationArea/Sender/LogicalID``), ``confirmation_code``
(``ApplicationArea/Sender/ConfirmationCode``: whether to answer with a ``ConfirmBOD``) and
``created`` (``ApplicationArea/CreationDateTime``); the verb may also ask for the noun's
answer: ``Process/@acknowledgeCode``, ``Change/@responseCode`` (Always or OnError).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TypeAlias, cast

from pydantic import ValidationError

from mes import units
from mes.b2mml.parsing import (
    AMOUNT_KEYS,
    DEFAULT_MAX_BYTES,
    B2MMLError,
    Element,
    QuantityData,
    bod_id_of,
    child,
    children,
    datetime_of,
    decimal_of,
    local_name,
    origin_of,
    parse_datetime,
    parse_xml,
    quantities_of,
    text,
    texts,
)
from mes.b2mml.sync import SYNC_NOUNS, plant_of
from mes.erp_segments import ErpLotChoice, ErpOrderData, ErpSegmentData
from mes.production_orders import ErpProductionOrderIn

__all__ = [
    "CancelOperationsSchedule",
    "ChangeOperationsSchedule",
    "ConfirmationCode",
    "Message",
    "OrderChange",
    "OrderRequest",
    "ProcessOperationsSchedule",
    "ScheduleRequest",
    "SegmentRequest",
    "SyncMasterData",
    "SyncOperationsSchedule",
    "decode",
]

ConfirmationCode: TypeAlias = Literal["Always", "OnError", "Never"]
ResponseCode: TypeAlias = Literal["Always", "OnError"]


@dataclass(frozen=True)
class SegmentRequest:
    """One ``SegmentRequirement`` of a request: the routing step it asks for."""

    id: str
    process_segment_id: str
    operations_definition_id: str
    #: The routing step (ISA-95 operations segment) id, as in the plant's routings.
    operations_segment_id: str
    #: The step's Produced quantity (another material than the product), when given.
    quantity: Decimal | None = None
    unit: str | None = None
    earliest_start: datetime | None = None
    latest_end: datetime | None = None
    #: ``EquipmentRequirement/EquipmentID``: the work unit(s) the ERP wants.
    equipment: tuple[str, ...] = ()
    #: Chosen lots: (MaterialRequirement ID, material or None, lot, quantity, unit).
    lots: tuple[tuple[str, str | None, str, Decimal | None, str | None], ...] = ()


@dataclass(frozen=True)
class ScheduleRequest:
    """What a Process and a Change say about one ``OperationsRequest``; None = not given."""

    order_number: str
    schedule_id: str
    routing: str | None
    product: str | None
    quantity: Decimal | None
    unit: str | None
    due: datetime | None
    start: datetime | None
    priority: int | None
    description: str | None
    #: ``RequestState`` as the ERP sent it.
    state: str | None
    segments: list[SegmentRequest]
    #: Every Quantity of the product's Produced MaterialRequirement, for ``amount``.
    quantities: list[QuantityData] = field(default_factory=list)

    @property
    def segment_ids(self) -> list[str]:
        """The routing step (``OperationsSegmentID``) of each segment requirement."""
        return [s.operations_segment_id for s in self.segments]


@dataclass(frozen=True)
class OrderRequest(ScheduleRequest):
    """A new production order: one ``OperationsRequest`` of type Production."""

    def to_order_in(
        self,
        product_unit: str | None = None,
        product_conversions: dict[str, Decimal] | None = None,
    ) -> ErpProductionOrderIn:
        """The order as the JSON route takes it, with the ERP's ids and per-step data;
        ``B2MMLError`` naming the request if unfit.

        ``product_unit`` is the product's unit in master data: the amount to make is the
        quantity in (or converted to) it, see ``choose_amount``; ``product_conversions`` are
        the product's own units (``MaterialDefinition.unit_conversions``).
        """
        where = f"OperationsRequest {self.order_number}"
        problems = []
        quantity, unit = self.quantity, self.unit
        if self.product is None:
            problems.append(
                f"{where}: no MaterialRequirement with MaterialUse Produced names the product"
            )
        elif not self.quantities:
            problems.append(f"{where}: the Produced MaterialRequirement has no Quantity")
        else:
            try:
                amount, unit = choose_amount(
                    self.quantities, product_unit, where, product_conversions
                )
                quantity = amount
            except B2MMLError as exc:
                problems.extend(exc.reasons)
        if self.due is None:
            problems.append(f"{where}: no EndTime (the due date)")
        elif self.due.tzinfo is None:
            problems.append(f"{where}: EndTime {self.due.isoformat()} has no time zone")
        if problems:
            raise B2MMLError(problems)
        try:
            return ErpProductionOrderIn(
                order_number=self.order_number,
                product=cast(str, self.product),
                quantity=cast(Decimal, quantity),
                unit=cast(str, unit),
                due=cast(datetime, self.due),
                priority=0 if self.priority is None else self.priority,
                erp=ErpOrderData(
                    schedule_id=self.schedule_id,
                    segments=[_segment_data(s) for s in self.segments],
                ),
            )
        except ValidationError as exc:
            raise B2MMLError(
                [
                    f"{where}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                    for err in exc.errors(include_url=False)
                ]
            ) from None


def _segment_data(s: SegmentRequest) -> ErpSegmentData:
    return ErpSegmentData(
        id=s.id,
        process_segment_id=s.process_segment_id,
        operations_segment_id=s.operations_segment_id,
        quantity=s.quantity,
        unit=s.unit,
        earliest_start=s.earliest_start,
        latest_end=s.latest_end,
        equipment=list(s.equipment),
        lots=[
            ErpLotChoice(
                requirement_id=rid,
                material=material,
                lot=lot,
                quantity=qty,
                unit=unit,
            )
            for rid, material, lot, qty, unit in s.lots
        ],
    )


def choose_amount(
    quantities: list[QuantityData],
    target_unit: str | None,
    where: str,
    conversions: dict[str, Decimal] | None = None,
) -> tuple[Decimal, str]:
    """The amount to make among a requirement's quantities, by meaning, not by position.

    Quantities keyed as the amount (``Key`` Amount, Quantity, OrderQuantity, …) are taken
    before unkeyed ones; other keys (Rate, Throughput, …) are never the amount, nor is a
    rate such as ``t/h``, nor a quantity without a unit. What is left must be in
    ``target_unit`` (the product's) or convertible to it, and say one amount; none left or
    several different amounts is a refusal naming what was found. Returns (amount, unit):
    in ``target_unit`` when given. ``conversions``: the material's own units, sizes in
    ``target_unit`` (``mes.units.factor``).
    """
    keyed = [q for q in quantities if q.key and q.key.strip().lower() in AMOUNT_KEYS]
    pool = keyed or [q for q in quantities if not q.key]
    found = ", ".join(q.describe() for q in quantities)
    amounts: list[tuple[Decimal, str]] = []
    for q in pool:
        if q.unit is None or units.is_rate(q.unit):
            continue
        to = target_unit or (amounts[0][1] if amounts else q.unit)
        value = units.convert(q.value, q.unit, to, conversions if target_unit else None)
        if value is None:
            if target_unit is None:
                raise B2MMLError(
                    f"{where}: quantities in {amounts[0][1]} and {q.unit} ({found}): "
                    "which one is the amount to make is ambiguous; key it (Key Amount)"
                )
            continue
        amounts.append((value, to))
    distinct = {v.normalize() for v, _ in amounts}
    if pool and all(q.unit is None for q in pool):
        raise B2MMLError(f"{where}: the Produced quantity has no UnitOfMeasure")
    if not amounts:
        wanted = f"in the product's unit {target_unit!r}" if target_unit else "with a unit"
        raise B2MMLError(
            f"{where}: no Quantity {wanted} that is an amount to make (found {found}; "
            "rates and other keyed quantities are not)"
        )
    if len(distinct) > 1:
        raise B2MMLError(
            f"{where}: {len(distinct)} different amounts to make ({found}); which one is "
            "meant is ambiguous; key the amount (Key Amount)"
        )
    return amounts[0]


@dataclass(frozen=True)
class OrderChange(ScheduleRequest):
    """A change to an order: quantity, due (``EndTime``) or priority; None = unchanged.

    V0701 makes every ``OperationsRequest`` carry its segment requirements, so a Change
    repeats them; only the fields above are meant to change.
    """


@dataclass(frozen=True)
class _Envelope:
    #: ``ApplicationArea/BODID``: the message id, for idempotency and the answer.
    bod_id: str | None
    #: ``ApplicationArea/Sender/LogicalID``
    sender: str | None
    #: ``ApplicationArea/Sender/ConfirmationCode``: when to answer with a ``ConfirmBOD``.
    confirmation_code: ConfirmationCode | None
    #: ``ApplicationArea/CreationDateTime`` (naive when the sender gave no time zone).
    created: datetime


@dataclass(frozen=True)
class ProcessOperationsSchedule(_Envelope):
    """New production orders."""

    #: The first ``OperationsSchedule/ID`` (a message may hold several schedules).
    schedule_id: str
    requests: list[OrderRequest]
    #: ``Process/@acknowledgeCode``: when to answer with an ``AcknowledgeOperationsSchedule``.
    acknowledge_code: ResponseCode | None = None


@dataclass(frozen=True)
class ChangeOperationsSchedule(_Envelope):
    """Changes to orders."""

    schedule_id: str
    requests: list[OrderChange]
    #: ``Change/@responseCode``: when to answer with a ``RespondOperationsSchedule``.
    response_code: ResponseCode | None = None


@dataclass(frozen=True)
class CancelOperationsSchedule(_Envelope):
    """Orders to cancel, by order number (``OperationsRequest/ID``)."""

    schedule_id: str
    order_ids: list[str]


@dataclass(frozen=True)
class SyncOperationsSchedule(_Envelope):
    """Orders to create or change, whichever each one needs (the ERP's "this is the
    schedule now")."""

    schedule_id: str
    requests: list[OrderRequest]

    def as_process(self, numbers: set[str]) -> ProcessOperationsSchedule:
        """The requests ``numbers`` (new orders) as a ``ProcessOperationsSchedule``."""
        return ProcessOperationsSchedule(
            bod_id=self.bod_id,
            sender=self.sender,
            confirmation_code=self.confirmation_code,
            created=self.created,
            schedule_id=self.schedule_id,
            requests=[r for r in self.requests if r.order_number in numbers],
        )

    def as_change(self, numbers: set[str]) -> ChangeOperationsSchedule:
        """The requests ``numbers`` (known orders) as a ``ChangeOperationsSchedule``."""
        names = [f.name for f in dataclass_fields(ScheduleRequest)]
        return ChangeOperationsSchedule(
            bod_id=self.bod_id,
            sender=self.sender,
            confirmation_code=self.confirmation_code,
            created=self.created,
            schedule_id=self.schedule_id,
            requests=[
                OrderChange(**{n: getattr(r, n) for n in names})
                for r in self.requests
                if r.order_number in numbers
            ],
        )


@dataclass(frozen=True)
class SyncMasterData(_Envelope):
    """A ``Sync…`` master data message as plant data (the shape of ``mes.masterdata.Plant``).

    Load it with ``mes.masterdata.load_plant(session, parse_plant(plant, partial=True),
    partial=True)``: it holds one noun and may refer to what is already stored.
    """

    #: The noun: MaterialClass, MaterialDefinition, Equipment, ProcessSegment,
    #: OperationsDefinition, WorkMaster, MaterialLot or MaterialInformation.
    noun: str
    plant: dict[str, Any] = field(default_factory=dict)


Message: TypeAlias = (
    ProcessOperationsSchedule
    | ChangeOperationsSchedule
    | CancelOperationsSchedule
    | SyncOperationsSchedule
    | SyncMasterData
)


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse, validate and decode one inbound B2MML message.

    Raises ``B2MMLError`` (with the message's ``bod_id`` when it could be read) for hostile,
    malformed or schema-invalid XML, a message type the MES does not take, or content it
    cannot use; every problem found is listed.
    """
    root = parse_xml(data, max_bytes)
    name = local_name(root)
    try:
        return _decode(root, name)
    except B2MMLError as exc:
        raise B2MMLError(exc.reasons, bod_id_of(root), name, *origin_of(root)) from None


def _decode(root: Element, name: str) -> Message:
    envelope = _envelope(root)
    data_area = child(root, "DataArea")
    if name == "ProcessOperationsSchedule":
        verb = child(data_area, "Process")
        schedules = children(data_area, "OperationsSchedule")
        return ProcessOperationsSchedule(
            **envelope,
            schedule_id=_schedule_id(schedules),
            requests=[OrderRequest(**fields) for fields in _requests(schedules)],
            acknowledge_code=_response_code(verb, "acknowledgeCode"),
        )
    if name == "ChangeOperationsSchedule":
        verb = child(data_area, "Change")
        schedules = children(data_area, "OperationsSchedule")
        return ChangeOperationsSchedule(
            **envelope,
            schedule_id=_schedule_id(schedules),
            requests=[OrderChange(**fields) for fields in _requests(schedules)],
            response_code=_response_code(verb, "responseCode"),
        )
    if name == "CancelOperationsSchedule":
        schedules = children(data_area, "OperationsSchedule")
        ids = [
            cast(str, text(request, "ID"))
            for schedule in schedules
            for request in children(schedule, "OperationsRequest")
        ]
        return CancelOperationsSchedule(
            **envelope, schedule_id=_schedule_id(schedules), order_ids=list(dict.fromkeys(ids))
        )
    if name == "SyncOperationsSchedule":
        schedules = children(data_area, "OperationsSchedule")
        return SyncOperationsSchedule(
            **envelope,
            schedule_id=_schedule_id(schedules),
            requests=[OrderRequest(**fields) for fields in _requests(schedules)],
        )
    noun = name.removeprefix("Sync")
    if name.startswith("Sync") and noun in SYNC_NOUNS:
        return SyncMasterData(**envelope, noun=noun, plant=plant_of(noun, data_area))
    accepted = ", ".join(
        [
            "ProcessOperationsSchedule",
            "ChangeOperationsSchedule",
            "CancelOperationsSchedule",
            "SyncOperationsSchedule",
        ]
        + [f"Sync{n}" for n in SYNC_NOUNS]
    )
    raise B2MMLError(f"{name} is valid B2MML but not a message the MES takes ({accepted})")


def _envelope(root: Element) -> dict[str, Any]:
    area = child(root, "ApplicationArea")
    sender = child(area, "Sender")
    code = text(sender, "ConfirmationCode") if sender is not None else None
    return {
        "bod_id": text(area, "BODID"),
        "sender": text(sender, "LogicalID") if sender is not None else None,
        # The schema allows only Always, Never and OnError here.
        "confirmation_code": cast(ConfirmationCode | None, code),
        "created": parse_datetime(
            cast(str, text(area, "CreationDateTime")), "ApplicationArea.CreationDateTime"
        ),
    }


def _response_code(verb: Element | None, attribute: str) -> ResponseCode | None:
    value = verb.get(attribute) if verb is not None else None
    # The schema allows only Always and OnError here.
    return cast(ResponseCode | None, value.strip() if value else None)


def _schedule_id(schedules: list[Element]) -> str:
    return cast(str, text(schedules[0], "ID"))  # ID is required, as is one schedule


def _requests(schedules: list[Element]) -> list[dict[str, Any]]:
    """The fields of every ``OperationsRequest``, or every problem found in them."""
    problems: list[str] = []
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    for schedule in schedules:
        schedule_id = cast(str, text(schedule, "ID"))
        schedule_type = text(schedule, "OperationsType")
        for request in children(schedule, "OperationsRequest"):
            try:
                fields = _request(request, schedule_id, schedule_type)
            except B2MMLError as exc:
                problems.extend(exc.reasons)
                continue
            if fields["order_number"] in seen:
                problems.append(f"OperationsRequest {fields['order_number']}: listed twice")
            seen.add(fields["order_number"])
            requests.append(fields)
    if problems:
        raise B2MMLError(problems)
    return requests


def _walk_segments(parent: Element, name: str = "SegmentRequirement") -> list[Element]:
    """Segment requirements with their nested ``SegmentRequirementChild``, document order."""
    found = []
    for segment in children(parent, name):
        found.append(segment)
        found.extend(_walk_segments(segment, "SegmentRequirementChild"))
    return found


def _request(request: Element, schedule_id: str, schedule_type: str | None) -> dict[str, Any]:
    order_number = cast(str, text(request, "ID"))
    where = f"OperationsRequest {order_number}"
    problems = []
    operations_type = text(request, "OperationsType") or schedule_type or "Production"
    if operations_type != "Production":
        problems.append(
            f"{where}: OperationsType {operations_type}; only Production requests are orders"
        )

    segments = _walk_segments(request)
    routing = text(request, "OperationsDefinitionID")
    # Required on every segment requirement by the schema.
    named = list(dict.fromkeys(cast(str, text(s, "OperationsDefinitionID")) for s in segments))
    if routing is None and len(named) == 1:
        routing = named[0]
    elif routing is None:
        problems.append(
            f"{where}: no OperationsDefinitionID, and its segment requirements name "
            f"{', '.join(named)}"
        )
    if routing is not None and any(n != routing for n in named):
        problems.append(
            f"{where}: OperationsDefinitionID {routing}, but its segment requirements name "
            f"{', '.join(named)}"
        )

    product = unit = None
    quantity: Decimal | None = None
    quantities: list[QuantityData] = []
    produced = [
        requirement
        for segment in segments
        for requirement in children(segment, "MaterialRequirement")
        if text(requirement, "MaterialUse") == "Produced"
    ]
    product_requirement = None
    if produced:
        # The last one: the routing's last step makes the product, earlier ones intermediates.
        product_requirement = produced[-1]
        product = text(product_requirement, "MaterialDefinitionID")
        req_where = f"{where}.MaterialRequirement {text(product_requirement, 'ID')}"
        amount = None
        try:
            quantities = quantities_of(product_requirement, req_where)
        except B2MMLError as exc:
            problems.extend(exc.reasons)
        # When this is ambiguous, the product's unit may settle it: to_order_in decides.
        with suppress(B2MMLError):
            amount = choose_amount(quantities, None, req_where) if quantities else None
        if amount is not None:
            quantity, unit = amount[0], amount[1]

    segment_requests = []
    for s in segments:
        try:
            segment_requests.append(_segment_request(s, where, product_requirement))
        except B2MMLError as exc:
            problems.extend(exc.reasons)

    priority = None
    priority_text = text(request, "Priority")
    if priority_text is not None:
        try:
            value = decimal_of(priority_text, f"{where}.Priority")
        except B2MMLError as exc:
            problems.extend(exc.reasons)
        else:
            if value != value.to_integral_value():
                problems.append(f"{where}: Priority {priority_text} is not a whole number")
            else:
                priority = int(value)
    try:
        due = datetime_of(request, "EndTime", where)
        start = datetime_of(request, "StartTime", where)
    except B2MMLError as exc:
        problems.extend(exc.reasons)
        due = start = None
    if problems:
        raise B2MMLError(problems)
    return {
        "order_number": order_number,
        "schedule_id": schedule_id,
        "routing": routing,
        "product": product,
        "quantity": quantity,
        "unit": unit,
        "due": due,
        "start": start,
        "priority": priority,
        "description": text(request, "Description"),
        "state": text(request, "RequestState"),
        "segments": segment_requests,
        "quantities": quantities,
    }


def _segment_request(
    segment: Element, where: str, product_requirement: Element | None
) -> SegmentRequest:
    """One segment requirement with what it asks of its step; every problem named."""
    seg_id = cast(str, text(segment, "ID"))
    s_where = f"{where}.SegmentRequirement {seg_id}"
    problems: list[str] = []
    quantity: tuple[Decimal, str] | None = None
    lots: list[tuple[str, str | None, str, Decimal | None, str | None]] = []
    for requirement in children(segment, "MaterialRequirement"):
        r_id = cast(str, text(requirement, "ID"))
        r_where = f"{s_where}.MaterialRequirement {r_id}"
        use = text(requirement, "MaterialUse")
        lot_ids = texts(requirement, "MaterialLotID")
        amount = None
        if requirement is not product_requirement and (use == "Produced" or lot_ids):
            try:
                found = quantities_of(requirement, r_where)
                amount = choose_amount(found, None, r_where) if found else None
            except B2MMLError as exc:
                problems.extend(exc.reasons)
        if use == "Produced":
            if requirement is not product_requirement and amount is not None:
                quantity = amount
            continue
        materials = texts(requirement, "MaterialDefinitionID")
        for lot in lot_ids:
            # A quantity with several lots cannot say how much of each: each covers the need.
            qty = amount if amount is not None and len(lot_ids) == 1 else None
            lots.append(
                (
                    r_id,
                    materials[0] if materials else None,
                    lot,
                    None if qty is None else qty[0],
                    None if qty is None else qty[1],
                )
            )
    try:
        earliest = datetime_of(segment, "EarliestStartTime", s_where)
        latest = datetime_of(segment, "LatestEndTime", s_where)
    except B2MMLError as exc:
        problems.extend(exc.reasons)
        earliest = latest = None
    equipment = tuple(
        e for r in children(segment, "EquipmentRequirement") for e in texts(r, "EquipmentID")
    )
    if problems:
        raise B2MMLError(problems)
    return SegmentRequest(
        id=seg_id,
        process_segment_id=cast(str, text(segment, "ProcessSegmentID")),
        operations_definition_id=cast(str, text(segment, "OperationsDefinitionID")),
        operations_segment_id=cast(str, text(segment, "OperationsSegmentID")),
        quantity=None if quantity is None else quantity[0],
        unit=None if quantity is None else quantity[1],
        earliest_start=earliest,
        latest_end=latest,
        equipment=equipment,
        lots=tuple(lots),
    )
