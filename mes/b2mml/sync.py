"""Inbound B2MML master data: ``Sync…`` nouns into the plant data of ``mes.masterdata``.

The plant data is checked and written by ``mes.masterdata`` (``parse_plant`` and
``load_plant`` with ``partial=True``), as a plant file would be; this module only maps
elements to keys. Where each key is read, per noun (paths below ``DataArea``):

MaterialClass → ``material_classes``
    ``MaterialClass/ID``, first ``Description``.
MaterialDefinition → ``materials``
    ``ID``, first ``Description``, first ``MaterialClassID``. V0701 has no unit element on a
    material definition (units live in ``ValueType``/``QuantityValueType`` as
    ``UnitOfMeasure``), and the MES books every quantity in the material's unit, so the unit
    is, first found: the ``MaterialDefinitionProperty`` whose ID is UnitOfMeasure (or
    BaseUnitOfMeasure, UOM, BaseUOM): its ``Value/ValueString``, else its
    ``Value/UnitOfMeasure``; else the one unit every other property's
    ``Value/UnitOfMeasure`` gives (children included; conversions and rates left out);
    else none, and the stored definition keeps its unit (a new one is refused). The
    material's own units come from ``MaterialDefinitionProperty`` UnitConversion (or
    AlternativeUnitOfMeasure): one ``Value`` per unit, ``Key`` the unit (BAG),
    ``ValueString`` how many ``UnitOfMeasure`` (default: the material's unit) one is.
MaterialLot → ``lots``
    ``ID``, ``MaterialDefinitionID``, the amount among ``Quantity`` elements (keyed Amount,
    Quantity, … or unkeyed; a rate never; converted to the material's unit on loading),
    ``Disposition`` (else ``Status``) mapped to Released, Restricted or Rejected (see
    ``DISPOSITIONS``). The MES keeps no storage location, sublots or lot properties.
MaterialInformation → ``material_classes``, ``materials``, ``lots``
    Each ``MaterialInformation``'s ``MaterialClass``, ``MaterialDefinition`` and
    ``MaterialLot`` elements, read as above, loaded together (a lot may be of a material
    defined beside it).
ProcessSegment → ``process_segments``
    ``ID``, first ``Description``.
Equipment → ``equipment``
    ``ID``, first ``Description``, ``EquipmentLevel``, children from ``EquipmentChild``.
    A top-level element's parent is the innermost ``HierarchyScope`` equipment other than
    itself; one that is another top-level element of the message nests it there. The
    controller endpoint of a work unit, which B2MML does not model, may come from
    ``EquipmentProperty`` IDs ControllerProtocol, ControllerURL, ControllerMachine and
    ControllerSecurity (``Value/ValueString``), and its settings from ControllerCertificate,
    ControllerPrivateKey, ControllerServerCertificate, ControllerUser, ControllerPasswordEnv
    and ControllerPasswordFile (where the password is; a ControllerPassword is refused); a
    Modbus endpoint's register map is ControllerRegisterMap, a JSON object (``Value/
    ValueString``, the plant file's ``settings``); without them the stored endpoint stays.
OperationsDefinition → ``routings``
    ``ID``, first ``Description``; steps from each ``OperationsSegment`` in order: ``ID``,
    first ``Description``, work master from the first ``WorkMasterSourceID``, materials from
    ``MaterialSpecification`` (``MaterialDefinitionID``, ``MaterialUse``,
    ``Quantity/QuantityString``, ``Quantity/UnitOfMeasure``). V0701 gives no product on an
    operations definition: it is the one material the last segment specifies as Produced.
WorkMaster → ``work_masters``
    ``ID``, first ``Description``, first ``ProcessSegmentID``; parameters from
    ``ParameterSpecification``: ``ID`` is the name, ``Value`` elements keyed (``Key``)
    Default (or no key), Min and Max, or ``ParameterChild`` elements with those IDs; the unit
    is the default value's ``UnitOfMeasure``. Work units from ``EquipmentSpecification``:
    each ``EquipmentID``, with the ideal cycle time from the ``EquipmentSpecificationProperty``
    IdealCycleTime (``Value`` or ``Quantity``; s, ms, min or h; seconds when no unit). Test
    specifications have no place in a work master, so the stored ones stay.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, cast

from mes import units
from mes.b2mml.parsing import (
    AMOUNT_KEYS,
    B2MMLError,
    Element,
    QuantityData,
    child,
    children,
    decimal_of,
    quantities_of,
    quantity_of,
    text,
    texts,
)

__all__ = ["SYNC_NOUNS", "plant_of"]

#: The nouns a ``Sync…`` message may carry, with the plant section each one fills.
SYNC_NOUNS: dict[str, str] = {
    "MaterialClass": "material_classes",
    "MaterialDefinition": "materials",
    "ProcessSegment": "process_segments",
    "Equipment": "equipment",
    "OperationsDefinition": "routings",
    "WorkMaster": "work_masters",
    "MaterialLot": "lots",
    "MaterialInformation": "materials",
}

#: ``Disposition``/``Status`` of a lot (case, blanks, dashes and underscores ignored) →
#: the MES's ``LotDisposition``. V0701's DispositionType: Planned, In-Process, Restricted,
#: UnRestricted, Closed; the rest are common ERP statuses.
DISPOSITIONS: dict[str, str] = dict.fromkeys(
    ("unrestricted", "released", "available", "approved", "accepted", "free", "unrestricteduse"),
    "Released",
)
DISPOSITIONS |= dict.fromkeys(
    ("restricted", "planned", "inprocess", "quarantine", "qualityinspection", "inspection",
     "onhold", "hold", "held", "blocked", "pending"),
    "Restricted",
)  # fmt: skip
DISPOSITIONS |= dict.fromkeys(("rejected", "closed", "scrapped", "scrap"), "Rejected")

_UNIT_PROPERTIES = {"unitofmeasure", "baseunitofmeasure", "uom", "baseuom"}
_CONVERSION_PROPERTIES = {"unitconversion", "unitconversions", "alternativeunitofmeasure"}
_CONVERSION_PROPERTIES |= {"alternativeunit", "alternativeuom"}
_ENDPOINT_PROPERTIES = {
    "controllerprotocol": "protocol",
    "controllerurl": "url",
    "controllermachine": "machine",
    "controllersecurity": "security",
}
_ENDPOINT_SETTINGS = {
    "controllercertificate": "certificate",
    "controllerprivatekey": "private_key",
    "controllerservercertificate": "server_certificate",
    "controlleruser": "user",
    "controllerpasswordenv": "password_env",
    "controllerpasswordfile": "password_file",
    # Read only to be refused by name: master data never holds a password.
    "controllerpassword": "password",
}
_PARAMETER_KEYS = {"default": "default", "min": "min", "minimum": "min"}
_PARAMETER_KEYS |= {"max": "max", "maximum": "max"}
_SECONDS: dict[str, Decimal] = {"ms": Decimal("0.001")}
_SECONDS |= dict.fromkeys(("s", "sec", "second", "seconds"), Decimal(1))
_SECONDS |= dict.fromkeys(("min", "minute", "minutes"), Decimal(60))
_SECONDS |= dict.fromkeys(("h", "hour", "hours"), Decimal(3600))


def plant_of(noun: str, data_area: Element) -> dict[str, Any]:
    """The plant data of one ``Sync…`` message's ``DataArea``; ``B2MMLError`` lists every
    element the MES cannot map, naming it by noun and ID."""
    if noun == "MaterialInformation":
        return _material_information(data_area)
    elements = children(data_area, noun)
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    for element in elements:
        try:
            entries.append(_READERS[noun](element))
        except B2MMLError as exc:
            problems.extend(exc.reasons)
    if problems:
        raise B2MMLError(problems)
    if noun == "Equipment":
        entries = _nest_top_level(entries)
    return {SYNC_NOUNS[noun]: entries}


def _id(element: Element) -> str:
    return cast(str, text(element, "ID"))  # ID is required on every noun


def _described(element: Element) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": _id(element)}
    description = text(element, "Description")
    if description is not None:
        entry["description"] = description
    return entry


def _value_string(value: Element) -> str | None:
    return text(value, "ValueString")


def _properties(element: Element, name: str) -> dict[str, Element]:
    """Property elements by lower-cased ID (ERPs differ in case)."""
    return {cast(str, text(p, "ID")).lower(): p for p in children(element, name)}


# --- one reader per noun ----------------------------------------------------------------------


def _material_class(element: Element) -> dict[str, Any]:
    return _described(element)


def _process_segment(element: Element) -> dict[str, Any]:
    return _described(element)


def _material_definition(element: Element) -> dict[str, Any]:
    entry = _described(element)
    where = f"MaterialDefinition {entry['id']}"
    classes = texts(element, "MaterialClassID")
    if classes:
        entry["material_class"] = classes[0]
    unit = None
    conversions: list[dict[str, Any]] = []
    problems: list[str] = []
    others: list[Element] = []
    for key, prop in _properties(element, "MaterialDefinitionProperty").items():
        value = child(prop, "Value")
        if key in _UNIT_PROPERTIES and value is not None:
            unit = _value_string(value) or text(value, "UnitOfMeasure")
        elif key in _CONVERSION_PROPERTIES:
            for v in children(prop, "Value"):
                try:
                    conversions.append(_conversion(v, f"{where}.{text(prop, 'ID')}"))
                except B2MMLError as exc:
                    problems.extend(exc.reasons)
        else:
            others.append(prop)
    if problems:
        raise B2MMLError(problems)
    if unit is None:
        found = {units.canonical(u): u for u in _value_units(others) if not units.is_rate(u)}
        if len(found) == 1:
            unit = next(iter(found.values()))
    if unit is not None:
        entry["unit"] = unit
    if conversions:
        entry["conversions"] = conversions
    return entry


def _value_units(properties: list[Element]) -> list[str]:
    """Every ``Value/UnitOfMeasure`` of these properties and their children."""
    found = []
    for prop in properties:
        for value in children(prop, "Value"):
            u = text(value, "UnitOfMeasure")
            if u is not None:
                found.append(u)
        found += _value_units(children(prop, "MaterialDefinitionPropertyChild"))
    return found


def _conversion(value: Element, where: str) -> dict[str, Any]:
    unit = text(value, "Key")
    number = _value_string(value)
    if unit is None or number is None:
        raise B2MMLError(
            f"{where}: a unit conversion needs Key (the unit, such as BAG) and ValueString "
            "(how many of the material's unit, or of UnitOfMeasure, one is)"
        )
    size = decimal_of(number, f"{where}.{unit}")
    if size <= 0:
        raise B2MMLError(f"{where}.{unit}: {number} is not a positive factor")
    entry: dict[str, Any] = {"unit": unit, "factor": float(size)}
    of = text(value, "UnitOfMeasure")
    if of is not None:
        entry["of"] = of
    return entry


def _material_lot(element: Element) -> dict[str, Any]:
    lot_id = _id(element)
    where = f"MaterialLot {lot_id}"
    problems = []
    entry: dict[str, Any] = {"id": lot_id}
    material = text(element, "MaterialDefinitionID")
    if material is None:
        problems.append(f"{where}: no MaterialDefinitionID (the material it is a lot of)")
    else:
        entry["material"] = material
    try:
        amount = _lot_amount(quantities_of(element, where), where)
    except B2MMLError as exc:
        problems.extend(exc.reasons)
    else:
        entry["quantity"] = amount.value
        if amount.unit is not None:
            entry["unit"] = amount.unit
    for name in ("Disposition", "Status"):
        given = text(element, name)
        if given is None:
            continue
        mapped = DISPOSITIONS.get("".join(c for c in given.lower() if c.isalnum()))
        if mapped is None:
            problems.append(
                f"{where}: {name} {given!r} is not a disposition the MES knows "
                "(Released: UnRestricted, Released, Available, …; Restricted: Restricted, "
                "Quarantine, Blocked, …; Rejected: Rejected, Closed, Scrapped)"
            )
        else:
            entry["disposition"] = mapped
        break
    if problems:
        raise B2MMLError(problems)
    return entry


def _lot_amount(quantities: list[QuantityData], where: str) -> QuantityData:
    """The lot's amount: keyed as the amount, else unkeyed; never a rate; one value."""
    keyed = [q for q in quantities if q.key and q.key.strip().lower() in AMOUNT_KEYS]
    pool = [q for q in keyed or [q for q in quantities if not q.key] if not _rate(q)]
    if not pool:
        found = ", ".join(q.describe() for q in quantities) or "none"
        raise B2MMLError(f"{where}: no Quantity that is the lot's amount (found {found})")
    amount = pool[0]
    if amount.value < 0:
        raise B2MMLError(f"{where}: quantity {amount.describe()} is negative")
    return amount


def _rate(q: QuantityData) -> bool:
    return q.unit is not None and units.is_rate(q.unit)


def _material_information(data_area: Element) -> dict[str, Any]:
    problems: list[str] = []
    plant: dict[str, list[dict[str, Any]]] = {"material_classes": [], "materials": [], "lots": []}
    readers = (
        ("MaterialClass", "material_classes", _material_class),
        ("MaterialDefinition", "materials", _material_definition),
        ("MaterialLot", "lots", _material_lot),
    )
    for info in children(data_area, "MaterialInformation"):
        for name, section, reader in readers:
            for element in children(info, name):
                try:
                    plant[section].append(reader(element))
                except B2MMLError as exc:
                    problems.extend(exc.reasons)
    if problems:
        raise B2MMLError(problems)
    return {section: entries for section, entries in plant.items() if entries}


def _equipment(element: Element) -> dict[str, Any]:
    entry = _described(element)
    where = f"Equipment {entry['id']}"
    problems = []
    level = text(element, "EquipmentLevel")
    if level is None:
        problems.append(f"{where}: no EquipmentLevel")
    else:
        entry["level"] = level
    endpoint: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, prop in _properties(element, "EquipmentProperty").items():
        value = child(prop, "Value")
        setting = _value_string(value) if value is not None else None
        if setting is None:
            continue
        if key == "controllerregistermap":
            try:
                registers = json.loads(setting)
            except ValueError as exc:
                registers = exc
            if not isinstance(registers, dict):
                problems.append(f"{where}: ControllerRegisterMap is not a JSON object")
            else:
                settings.update(registers)
        elif key in _ENDPOINT_PROPERTIES:
            endpoint[_ENDPOINT_PROPERTIES[key]] = setting
        elif key in _ENDPOINT_SETTINGS:
            settings[_ENDPOINT_SETTINGS[key]] = setting
    if settings:
        endpoint["settings"] = settings
    if endpoint:
        entry["endpoint"] = endpoint
    kids = []
    for sub in children(element, "EquipmentChild"):
        try:
            kids.append(_equipment(sub))
        except B2MMLError as exc:
            problems.extend(exc.reasons)
    if problems:
        raise B2MMLError(problems)
    if kids:
        entry["children"] = kids
    parent = _scope_parent(child(element, "HierarchyScope"), entry["id"])
    if parent is not None:
        entry["parent"] = parent
    return entry


def _scope_parent(scope: Element | None, own_id: str) -> str | None:
    """The innermost equipment of a ``HierarchyScope`` chain other than ``own_id``."""
    chain = []
    while scope is not None:
        chain.append(cast(str, text(scope, "EquipmentID")))
        scope = child(scope, "HierarchyScopeChild")
    while chain and chain[-1] == own_id:
        chain.pop()
    return chain[-1] if chain else None


def _nest_top_level(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put a top-level entry whose parent is another top-level entry into its children."""
    by_id = {e["id"]: e for e in entries}
    roots = []
    for entry in entries:
        parent = by_id.get(entry.get("parent", ""))
        if parent is None or parent is entry:
            roots.append(entry)
            continue
        del entry["parent"]
        parent.setdefault("children", []).append(entry)
    return roots


def _operations_definition(element: Element) -> dict[str, Any]:
    entry = _described(element)
    where = f"OperationsDefinition {entry['id']}"
    problems = []
    steps = []
    for segment in children(element, "OperationsSegment"):
        step = _described(segment)
        s_where = f"{where}.OperationsSegment {step['id']}"
        if children(segment, "OperationsSegmentChild"):
            problems.append(f"{s_where}: nested OperationsSegmentChild is not supported")
        work_masters = texts(segment, "WorkMasterSourceID")
        if not work_masters:
            problems.append(f"{s_where}: no WorkMasterSourceID (the work master that runs it)")
        else:
            step["work_master"] = work_masters[0]
        materials = []
        for spec in children(segment, "MaterialSpecification"):
            try:
                materials.append(_material_spec(spec, s_where))
            except B2MMLError as exc:
                problems.extend(exc.reasons)
        step["materials"] = materials
        steps.append(step)
    if not steps:
        problems.append(f"{where}: no OperationsSegment (routing step)")
    elif not problems:  # a broken specification could be the product: no guess then
        produced = [m["material"] for m in steps[-1]["materials"] if m["use"] == "Produced"]
        if len(produced) != 1:
            problems.append(
                f"{where}: its last OperationsSegment must specify exactly one Produced "
                f"material, the product (found {len(produced)})"
            )
        else:
            entry["product"] = produced[0]
    if problems:
        raise B2MMLError(problems)
    entry["steps"] = steps
    return entry


def _material_spec(spec: Element, where: str) -> dict[str, Any]:
    s_where = f"{where}.MaterialSpecification {text(spec, 'ID')}"
    problems = []
    materials = texts(spec, "MaterialDefinitionID")
    use = text(spec, "MaterialUse")
    amount = quantity_of(spec, s_where)
    if not materials:
        problems.append(f"{s_where}: no MaterialDefinitionID")
    if use is None:
        problems.append(f"{s_where}: no MaterialUse")
    if amount is None:
        problems.append(f"{s_where}: no Quantity")
    if problems:
        raise B2MMLError(problems)
    assert amount is not None  # for mypy: checked just above
    entry: dict[str, Any] = {"material": materials[0], "use": use, "quantity": amount[0]}
    if amount[1] is not None:
        entry["unit"] = amount[1]
    return entry


def _work_master(element: Element) -> dict[str, Any]:
    entry = _described(element)
    where = f"WorkMaster {entry['id']}"
    problems = []
    if children(element, "WorkMasterChild"):
        problems.append(f"{where}: nested WorkMasterChild is not supported")
    segments = texts(element, "ProcessSegmentID")
    if not segments:
        problems.append(f"{where}: no ProcessSegmentID")
    else:
        entry["process_segment"] = segments[0]
    parameters = []
    for spec in children(element, "ParameterSpecification"):
        try:
            parameters.append(_parameter(spec, where))
        except B2MMLError as exc:
            problems.extend(exc.reasons)
    work_units = []
    for spec in children(element, "EquipmentSpecification"):
        try:
            work_units.extend(_work_units(spec, where))
        except B2MMLError as exc:
            problems.extend(exc.reasons)
    if problems:
        raise B2MMLError(problems)
    entry["parameters"] = parameters
    entry["work_units"] = work_units
    return entry


def _parameter(spec: Element, where: str) -> dict[str, Any]:
    name = cast(str, text(spec, "ID"))
    p_where = f"{where}.ParameterSpecification {name}"
    keyed: dict[str, Element] = {}
    for value in children(spec, "Value"):
        key = _PARAMETER_KEYS.get((text(value, "Key") or "default").lower())
        if key is not None:
            keyed.setdefault(key, value)
    for sub in children(spec, "ParameterChild"):
        key = _PARAMETER_KEYS.get(cast(str, text(sub, "ID")).lower())
        value = child(sub, "Value")
        if key is not None and value is not None:
            keyed.setdefault(key, value)
    entry: dict[str, Any] = {"name": name}
    problems = []
    for key in ("default", "min", "max"):
        number = _value_string(keyed[key]) if key in keyed else None
        if number is None:
            if key == "default":
                problems.append(f"{p_where}: no default Value")
            continue
        try:
            entry[key] = float(decimal_of(number, f"{p_where}.{key}"))
        except B2MMLError as exc:
            problems.extend(exc.reasons)
    if problems:
        raise B2MMLError(problems)
    unit = text(keyed["default"], "UnitOfMeasure")
    if unit is not None:
        entry["unit"] = unit
    return entry


def _work_units(spec: Element, where: str) -> list[dict[str, Any]]:
    e_where = f"{where}.EquipmentSpecification {text(spec, 'ID')}"
    equipment = texts(spec, "EquipmentID")
    if not equipment:
        raise B2MMLError(f"{e_where}: no EquipmentID (equipment classes are not supported)")
    prop = _properties(spec, "EquipmentSpecificationProperty").get("idealcycletime")
    if prop is None:
        raise B2MMLError(f"{e_where}: no EquipmentSpecificationProperty IdealCycleTime")
    seconds = _seconds(prop, f"{e_where}.IdealCycleTime")
    return [{"equipment": e, "ideal_cycle_time_s": seconds} for e in equipment]


def _seconds(prop: Element, where: str) -> float:
    value = child(prop, "Value")
    number: Decimal | None = None
    unit: str | None = None
    if value is not None and _value_string(value) is not None:
        number = decimal_of(cast(str, _value_string(value)), where)
        unit = text(value, "UnitOfMeasure")
    else:
        amount = quantity_of(prop, where)
        if amount is not None:
            number, unit = amount
    if number is None:
        raise B2MMLError(f"{where}: no Value")
    factor = _SECONDS.get((unit or "s").lower())
    if factor is None:
        raise B2MMLError(f"{where}: unit {unit!r} is not a time unit (s, ms, min, h)")
    return float(number * factor)


_READERS = {
    "MaterialClass": _material_class,
    "MaterialDefinition": _material_definition,
    "ProcessSegment": _process_segment,
    "Equipment": _equipment,
    "OperationsDefinition": _operations_definition,
    "WorkMaster": _work_master,
    "MaterialLot": _material_lot,
}
