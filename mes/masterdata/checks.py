"""Cross-checks that refuse bad master data, naming each entry and the reason.

``check_plant`` checks a plant against itself (and, for a partial load, against the ids
the database holds, ``Stored``); ``check_against_database`` checks what only the stored
rows can tell, such as a lot changing material or a used step being removed. Both return
the problems; callers raise them together as one ``MasterDataError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import urlsplit

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters.modbus.registers import RegisterMap
from mes import units as unit_vocabulary
from mes.masterdata.schema import (
    OPCUA_SECURITY,
    EndpointEntry,
    EquipmentEntry,
    MaterialEntry,
    OpcUaSettings,
    Plant,
    walk_equipment,
)
from mes.models import (
    ControllerEndpoint,
    Equipment,
    EquipmentLevel,
    MaterialClass,
    MaterialDefinition,
    MaterialLot,
    MaterialUse,
    OperationsDefinition,
    OperationsSegment,
    ProcessSegment,
    SegmentRequirement,
    TestResult,
    TestSpecification,
    WorkMaster,
    WorkMasterEquipment,
)


class MasterDataError(ValueError):
    """A plant file (or a load of it) is wrong; ``problems`` lists each one with its entry."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def conversion_sizes(material: MaterialEntry, unit: str) -> tuple[dict[str, str], list[str]]:
    """A material entry's own units as stored (unit → how many ``unit`` one is, a decimal
    string), and the problems with them: an ``of`` that is not convertible to ``unit``, a
    unit listed twice, or one the standard vocabulary already converts."""
    sizes: dict[str, str] = {}
    problems: list[str] = []
    for j, c in enumerate(material.conversions):
        where = f"conversions[{j}] ({c.unit})"
        size = unit_vocabulary.convert(Decimal(str(c.factor)), c.of or unit, unit)
        if size is None:
            problems.append(f"{where}: {c.of!r} does not convert to the material's unit {unit!r}")
            continue
        if unit_vocabulary.factor(c.unit, unit) is not None:
            problems.append(
                f"{where}: {c.unit!r} already converts to {unit!r}; only units the standard "
                "vocabulary does not know need a conversion"
            )
            continue
        if any(unit_vocabulary.same(c.unit, known) for known in sizes):
            problems.append(f"{where}: listed twice")
            continue
        sizes[c.unit] = format(size.normalize(), "f")
    return sizes, problems


def decimal_sizes(sizes: dict[str, str] | None) -> dict[str, Decimal]:
    """Stored conversions (``MaterialDefinition.unit_conversions``) as ``Decimal``."""
    return {unit: Decimal(str(size)) for unit, size in (sizes or {}).items()}


def _num(x: float) -> str:
    """300.0 → "300", 0.006 → "0.006": numbers as the engineer wrote them."""
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass
class Stored:
    """What the database holds that a partial load may refer to, by ISA-95 id.

    ``deferred`` stands for a database not consulted yet (``parse_plant(partial=True)``):
    an unknown reference is then no problem, and checks that need the referred object skip.
    """

    deferred: bool = False
    material_classes: set[str] = field(default_factory=set)
    #: material id → its unit
    materials: dict[str, str] = field(default_factory=dict)
    #: material id → its own units (``MaterialDefinition.unit_conversions``)
    conversions: dict[str, dict[str, str]] = field(default_factory=dict)
    #: equipment id → (level, has an endpoint, parent id)
    equipment: dict[str, tuple[str, bool, str | None]] = field(default_factory=dict)
    process_segments: set[str] = field(default_factory=set)
    #: work master id → whether any work unit can run it
    work_masters: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def read(cls, session: Session) -> Stored:
        """Every id a partial load may refer to. Ids only, so even a large plant reads fast."""
        rows = session.execute(
            select(
                Equipment.id, Equipment.external_id, Equipment.equipment_level, Equipment.parent_id
            )
        ).all()
        external = {row.id: row.external_id for row in rows}
        with_endpoint = set(session.scalars(select(ControllerEndpoint.equipment_id)))
        equipment = {
            row.external_id: (
                row.equipment_level,
                row.id in with_endpoint,
                external[row.parent_id] if row.parent_id is not None else None,
            )
            for row in rows
        }
        runnable = set(
            session.scalars(
                select(WorkMaster.external_id).join(
                    WorkMasterEquipment, WorkMasterEquipment.work_master_id == WorkMaster.id
                )
            )
        )
        material_rows = session.execute(
            select(
                MaterialDefinition.external_id,
                MaterialDefinition.unit,
                MaterialDefinition.unit_conversions,
            )
        ).all()
        return cls(
            material_classes=set(session.scalars(select(MaterialClass.external_id))),
            materials={row.external_id: row.unit for row in material_rows},
            conversions={
                row.external_id: dict(row.unit_conversions or {}) for row in material_rows
            },
            equipment=equipment,
            process_segments=set(session.scalars(select(ProcessSegment.external_id))),
            work_masters={
                wm: wm in runnable for wm in session.scalars(select(WorkMaster.external_id))
            },
        )


def check_plant(plant: Plant, stored: Stored | None = None) -> list[str]:
    """Cross-reference and consistency checks that the schema alone cannot express.

    ``stored`` is given for a partial load: references may then also name stored objects.
    """
    problems: list[str] = []
    partial = stored is not None
    deferred = stored is not None and stored.deferred

    def unique(section: str, ids: list[str]) -> dict[str, int]:
        first: dict[str, int] = {}
        for i, id_ in enumerate(ids):
            if id_ in first:
                problems.append(
                    f"{section}[{i}] ({id_}): duplicate id, first at {section}[{first[id_]}]"
                )
            else:
                first[id_] = i
        return first

    equipment: dict[str, tuple[str, EquipmentEntry]] = {}
    file_parent: dict[str, str | None] = {}
    for path, node, parent, depth in walk_equipment(plant.equipment):
        if node.id in equipment:
            problems.append(f"{path}: duplicate id, first at {equipment[node.id][0]}")
        else:
            equipment[node.id] = (path, node)
            file_parent[node.id] = parent if depth else node.parent
        if node.endpoint is not None and node.level != EquipmentLevel.WORK_UNIT:
            problems.append(
                f"{path}.endpoint: only a WorkUnit has a controller endpoint, "
                f"this is a {node.level.value}"
            )
        if node.endpoint is not None:
            problems.extend(_endpoint_problems(f"{path}.endpoint", node.endpoint))
        if node.parent is not None and depth:
            problems.append(f"{path}.parent: a nested entry's parent is the entry it is in")
        elif node.parent is not None and not partial:
            problems.append(
                f"{path}.parent: only a partial load hangs equipment under stored equipment; "
                "in a plant file, nest it in its parent's children"
            )
    for i, node in enumerate(plant.equipment):
        if not partial or node.parent is None:
            continue
        path = f"equipment[{i}] ({node.id})"
        if node.parent in equipment:
            problems.append(
                f"{path}: parent {node.parent} is in this file too; nest {node.id} in its children"
            )
        elif stored is not None and not deferred and node.parent not in stored.equipment:
            problems.append(f"{path}: unknown parent {node.parent!r}")
    if stored is not None and not deferred:
        # The file's parents over the stored ones: a loop would make the tree endless.
        parents = {ext: parent for ext, (_, _, parent) in stored.equipment.items()}
        for ext, parent in file_parent.items():
            if parent is not None or ext not in stored.equipment:
                parents[ext] = parent
        for ext, (path, _) in equipment.items():
            visited = {ext}
            up = parents.get(ext)
            while up is not None and up not in visited:
                visited.add(up)
                up = parents.get(up)
            if up == ext:
                problems.append(f"{path}: its parent {parents[ext]} lies under it; that is a loop")

    def equipment_info(equipment_id: str) -> tuple[str, bool | None] | None:
        """(level, has an endpoint) of equipment in the file or, for a partial load, stored;
        whether it has an endpoint is None while the database is not consulted yet."""
        found = equipment.get(equipment_id)
        in_db = stored.equipment.get(equipment_id) if stored is not None else None
        if found is None:
            return None if in_db is None else (in_db[0], in_db[1])
        node = found[1]
        if node.endpoint is not None or not partial or "endpoint" in node.model_fields_set:
            return node.level.value, node.endpoint is not None
        # A partial entry without an endpoint key keeps the stored endpoint.
        return node.level.value, None if deferred else (in_db is not None and in_db[1])

    classes = unique("material_classes", [c.id for c in plant.material_classes])
    stored_classes = stored.material_classes if stored is not None else set()
    unique("materials", [m.id for m in plant.materials])
    materials = {m.id: m for m in plant.materials}
    stored_materials = stored.materials if stored is not None else {}
    for i, m in enumerate(plant.materials):
        class_id = m.material_class
        if class_id is None or class_id in classes or class_id in stored_classes or deferred:
            continue
        problems.append(f"materials[{i}] ({m.id}): unknown material_class {class_id!r}")

    for i, m in enumerate(plant.materials):
        path = f"materials[{i}] ({m.id})"
        if m.unit is None and not partial:
            problems.append(f"{path}.unit: Field required")
        elif m.unit is None and not deferred and m.id not in stored_materials:
            problems.append(
                f"{path}: no unit given (no UnitOfMeasure anywhere on it) and no stored "
                f"{m.id} whose unit it could keep"
            )
        unit = m.unit or stored_materials.get(m.id)
        if unit is not None:
            problems.extend(f"{path}.{p}" for p in conversion_sizes(m, unit)[1])

    def material_unit(material_id: str) -> str | None:
        material = materials.get(material_id)
        if material is not None and material.unit is not None:
            return material.unit
        return stored_materials.get(material_id)

    def material_conversions(material_id: str) -> dict[str, Decimal]:
        material = materials.get(material_id)
        unit = material_unit(material_id)
        if (
            material is not None
            and unit is not None
            and (not partial or "conversions" in material.model_fields_set)
        ):
            return decimal_sizes(conversion_sizes(material, unit)[0])
        return decimal_sizes(stored.conversions.get(material_id) if stored is not None else None)

    def check_lot_unit(path: str, material_id: str, unit: str | None) -> None:
        material_unit_ = material_unit(material_id)
        if material_unit_ is None:
            if not deferred and material_id not in materials:  # else: its missing unit is said
                problems.append(f"{path}: unknown material {material_id!r}")
        elif unit is not None and (
            unit_vocabulary.factor(unit, material_unit_, material_conversions(material_id)) is None
        ):
            # Stock is booked in the material's unit: a lot's unit must convert to it.
            problems.append(
                f"{path}: unit {unit!r} does not convert to {material_id}'s unit "
                f"{material_unit_!r} (give the material a conversion for it)"
            )

    def check_unit(path: str, material_id: str, unit: str | None) -> None:
        material_unit_ = material_unit(material_id)
        if material_unit_ is None:
            if not deferred and material_id not in materials:  # else: its missing unit is said
                problems.append(f"{path}: unknown material {material_id!r}")
        elif unit is not None and not unit_vocabulary.same(unit, material_unit_):
            # Stock is booked in the material's unit; KGM is kg, EA is ea (mes.units).
            problems.append(
                f"{path}: unit {unit!r} differs from {material_id}'s unit {material_unit_!r}"
            )

    unique("lots", [lot.id for lot in plant.lots])
    for i, lot in enumerate(plant.lots):
        check_lot_unit(f"lots[{i}] ({lot.id})", lot.material, lot.unit)

    segments = unique("process_segments", [s.id for s in plant.process_segments])
    stored_segments = stored.process_segments if stored is not None else set()

    unique("work_masters", [w.id for w in plant.work_masters])
    work_masters = {w.id: w for w in plant.work_masters}
    test_spec_paths: dict[str, str] = {}
    for i, wm in enumerate(plant.work_masters):
        wm_path = f"work_masters[{i}] ({wm.id})"
        segment = wm.process_segment
        if segment not in segments and segment not in stored_segments and not deferred:
            problems.append(f"{wm_path}: unknown process_segment {wm.process_segment!r}")
        names: set[str] = set()
        for j, par in enumerate(wm.parameters):
            path = f"{wm_path}.parameters[{j}] ({par.name})"
            if par.name in names:
                problems.append(f"{path}: duplicate parameter name")
            names.add(par.name)
            if par.min is not None and par.max is not None and par.min > par.max:
                problems.append(f"{path}: min {_num(par.min)} is above max {_num(par.max)}")
            elif par.min is not None and par.max is not None:
                if not par.min <= par.default <= par.max:
                    problems.append(
                        f"{path}: default {_num(par.default)} is outside "
                        f"[{_num(par.min)}, {_num(par.max)}]"
                    )
            elif par.min is not None and par.default < par.min:
                problems.append(f"{path}: default {_num(par.default)} is below min {_num(par.min)}")
            elif par.max is not None and par.default > par.max:
                problems.append(f"{path}: default {_num(par.default)} is above max {_num(par.max)}")
        units: set[str] = set()
        for j, wu in enumerate(wm.work_units):
            path = f"{wm_path}.work_units[{j}] ({wu.equipment})"
            if wu.equipment in units:
                problems.append(f"{path}: work unit listed twice")
            units.add(wu.equipment)
            info = equipment_info(wu.equipment)
            if info is None:
                if not deferred:
                    problems.append(f"{path}: unknown equipment {wu.equipment!r}")
            elif info[0] != EquipmentLevel.WORK_UNIT:
                problems.append(f"{path}: {wu.equipment} is a {info[0]}, not a WorkUnit")
            elif info[1] is False:
                problems.append(
                    f"{path}: {wu.equipment} has no endpoint, so no job could be sent to it"
                )
        properties: set[str] = set()
        for j, ts in enumerate(wm.test_specifications):
            path = f"{wm_path}.test_specifications[{j}] ({ts.id})"
            # Test specification ids are global in ISA-95, not per work master.
            if ts.id in test_spec_paths:
                problems.append(f"{path}: duplicate id, first at {test_spec_paths[ts.id]}")
            else:
                test_spec_paths[ts.id] = path
            if ts.property in properties:
                problems.append(f"{path}: property {ts.property!r} already has limits here")
            properties.add(ts.property)
            if ts.low > ts.high:
                problems.append(f"{path}: low {_num(ts.low)} is above high {_num(ts.high)}")
            if ts.target is not None and not ts.low <= ts.target <= ts.high:
                problems.append(f"{path}: target {_num(ts.target)} is outside [low, high]")

    unique("routings", [r.id for r in plant.routings])
    routing_of_product: dict[str, str] = {}
    for i, routing in enumerate(plant.routings):
        r_path = f"routings[{i}] ({routing.id})"
        if material_unit(routing.product) is None:
            if not deferred and routing.product not in materials:
                problems.append(f"{r_path}: unknown product {routing.product!r}")
        elif routing.product in routing_of_product:
            # Orders name a product; one routing per product keeps that unambiguous.
            problems.append(
                f"{r_path}: product {routing.product} already has routing "
                f"{routing_of_product[routing.product]}"
            )
        else:
            routing_of_product[routing.product] = routing.id
        step_ids: set[str] = set()
        previous_produced: set[str] | None = None
        for j, step in enumerate(routing.steps):
            s_path = f"{r_path}.steps[{j}] ({step.id})"
            if step.id in step_ids:
                problems.append(f"{s_path}: duplicate step id")
            step_ids.add(step.id)
            wm_entry = work_masters.get(step.work_master)
            runnable: bool | None = None
            if wm_entry is not None:
                runnable = bool(wm_entry.work_units)
            elif stored is not None:
                runnable = stored.work_masters.get(step.work_master)
            if runnable is None:
                if not deferred:
                    problems.append(f"{s_path}: unknown work_master {step.work_master!r}")
            elif not runnable:
                problems.append(f"{s_path}: work master {step.work_master} has no work_units")
            seen: set[tuple[str, str]] = set()
            for k, spec in enumerate(step.materials):
                path = f"{s_path}.materials[{k}] ({spec.material})"
                check_unit(path, spec.material, spec.unit)
                if (spec.material, spec.use.value) in seen:
                    problems.append(f"{path}: {spec.material} is already {spec.use.value} here")
                seen.add((spec.material, spec.use.value))
            produced = {s.material for s in step.materials if s.use == MaterialUse.PRODUCED}
            consumed = {s.material for s in step.materials if s.use == MaterialUse.CONSUMED}
            if previous_produced is not None and not previous_produced & consumed:
                problems.append(
                    f"{s_path}: consumes nothing the step before produces "
                    f"({', '.join(sorted(previous_produced)) or 'nothing'})"
                )
            previous_produced = produced
            if j == len(routing.steps) - 1 and routing.product not in produced:
                problems.append(f"{s_path}: the last step must produce {routing.product}")
    return problems


def check_against_database(session: Session, plant: Plant, partial: bool = False) -> list[str]:
    """Checks that need what is already stored; they read only, so a failure writes nothing."""
    problems: list[str] = []

    # A work unit losing its endpoint while stored work masters the load leaves alone still
    # run on it: their jobs could no longer be sent (those in the load are checked already).
    dropped = {
        node.id: path
        for path, node, _, _ in walk_equipment(plant.equipment)
        if node.endpoint is None and (not partial or "endpoint" in node.model_fields_set)
    }
    if dropped:
        users: dict[str, list[str]] = {}
        for equipment_id, wm_id in session.execute(
            select(Equipment.external_id, WorkMaster.external_id)
            .join(WorkMasterEquipment, WorkMasterEquipment.equipment_id == Equipment.id)
            .join(WorkMaster, WorkMaster.id == WorkMasterEquipment.work_master_id)
            .where(
                Equipment.external_id.in_(list(dropped)),
                WorkMaster.external_id.not_in([w.id for w in plant.work_masters]),
            )
            .order_by(WorkMaster.external_id)
        ):
            users.setdefault(equipment_id, []).append(wm_id)
        for equipment_id, wm_ids in users.items():
            problems.append(
                f"{dropped[equipment_id]}: has no endpoint, but stored work master(s) "
                f"{', '.join(wm_ids)} run on it"
            )

    lot_ids = [lot.id for lot in plant.lots]
    stored_lots = {
        lot_id: (material, unit)
        for lot_id, material, unit in session.execute(
            select(MaterialLot.external_id, MaterialDefinition.external_id, MaterialLot.unit)
            .join(MaterialLot.material_definition)
            .where(MaterialLot.external_id.in_(lot_ids))
        )
    }
    for i, lot in enumerate(plant.lots):
        stored = stored_lots.get(lot.id)
        if stored is not None and stored[0] != lot.material:
            problems.append(
                f"lots[{i}] ({lot.id}): exists as a lot of {stored[0]}; a lot cannot change "
                "material"
            )

    units = {m.id: m.unit for m in plant.materials if m.unit is not None}
    mislabelled = session.execute(
        select(MaterialDefinition.external_id, MaterialLot.unit, func.count())
        .join(MaterialLot, MaterialLot.material_definition_id == MaterialDefinition.id)
        .where(MaterialDefinition.external_id.in_(list(units)))
        .group_by(MaterialDefinition.external_id, MaterialLot.unit)
    )
    index = {m.id: i for i, m in enumerate(plant.materials)}
    for material_id, lot_unit, count in mislabelled:
        if lot_unit != units[material_id]:
            problems.append(
                f"materials[{index[material_id]}] ({material_id}): unit {units[material_id]!r} "
                f"would mislabel {count} stored lot(s) counted in {lot_unit!r}"
            )

    routing_ids = [r.id for r in plant.routings]
    stored_routings = session.execute(
        select(OperationsDefinition.external_id, MaterialDefinition.external_id).join(
            OperationsDefinition.product
        )
    ).all()
    product_of = dict(stored_routings)
    for i, r in enumerate(plant.routings):
        r_path = f"routings[{i}] ({r.id})"
        if r.id in product_of and product_of[r.id] != r.product:
            problems.append(
                f"{r_path}: makes {product_of[r.id]} in the database; a routing cannot change "
                "product (give it a new id)"
            )
        others = sorted(
            od for od, product in stored_routings if product == r.product and od not in routing_ids
        )
        if others:
            problems.append(
                f"{r_path}: product {r.product} already has routing {', '.join(others)} in the "
                "database"
            )

    # Removing a step or a test specification that production records refer to would
    # break those records (and the foreign keys): report it instead.
    step_ids = {(r.id, step.id) for r in plant.routings for step in r.steps}
    routing_index = {r.id: i for i, r in enumerate(plant.routings)}
    used_steps = session.execute(
        select(OperationsDefinition.external_id, OperationsSegment.external_id, func.count())
        .join(
            OperationsSegment, OperationsSegment.operations_definition_id == OperationsDefinition.id
        )
        .join(SegmentRequirement, SegmentRequirement.operations_segment_id == OperationsSegment.id)
        .where(OperationsDefinition.external_id.in_(routing_ids))
        .group_by(OperationsDefinition.external_id, OperationsSegment.external_id)
    )
    for routing_id, step_id, count in used_steps:
        if (routing_id, step_id) not in step_ids:
            problems.append(
                f"routings[{routing_index[routing_id]}] ({routing_id}).steps: step {step_id} is "
                f"used by {count} order step(s) and cannot be removed; give the changed routing "
                "a new id"
            )

    spec_ids = {t.id for w in plant.work_masters for t in w.test_specifications}
    wm_index = {w.id: i for i, w in enumerate(plant.work_masters)}
    used_specs = session.execute(
        select(WorkMaster.external_id, TestSpecification.external_id, func.count())
        .join(TestSpecification, TestSpecification.work_master_id == WorkMaster.id)
        .join(TestResult, TestResult.test_specification_id == TestSpecification.id)
        .where(WorkMaster.external_id.in_(list(wm_index)))
        .group_by(WorkMaster.external_id, TestSpecification.external_id)
    )
    for wm_id, spec_id, count in used_specs:
        if spec_id not in spec_ids:
            problems.append(
                f"work_masters[{wm_index[wm_id]}] ({wm_id}).test_specifications: {spec_id} has "
                f"{count} test result(s) and cannot be removed"
            )
    return problems


def _validation_problems(where: str, exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        # A model-level message starts with the setting it is about ("user: ...").
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}.{loc}: {message}" if loc else f"{where}.{message}")
    return problems


def _modbus_problems(where: str, endpoint: EndpointEntry) -> list[str]:
    """A Modbus endpoint: a modbus://host:port URL, no security, its register map."""
    problems = []
    url = urlsplit(endpoint.url)
    if url.scheme != "modbus" or not url.hostname:
        problems.append(f"{where}.url: {endpoint.url!r} is not a modbus://host:port URL")
    if endpoint.security != "None":
        problems.append(f"{where}.security: Modbus has no security; it must be None")
    try:
        registers = RegisterMap.model_validate(endpoint.settings)
    except ValidationError as exc:
        return problems + _validation_problems(f"{where}.settings", exc)
    return problems + [f"{where}.settings.{p}" for p in registers.problems()]


def _endpoint_problems(where: str, endpoint: EndpointEntry) -> list[str]:
    """An OPC UA endpoint's security and settings (``OpcUaSettings``); a Modbus endpoint's
    register map (``adapters.modbus.registers.RegisterMap``)."""
    if endpoint.protocol == "modbus":
        return _modbus_problems(where, endpoint)
    problems = []
    if endpoint.security not in OPCUA_SECURITY:
        problems.append(
            f"{where}.security: {endpoint.security!r} is not one of {', '.join(OPCUA_SECURITY)}"
        )
    try:
        settings = OpcUaSettings.model_validate(endpoint.settings)
    except ValidationError as exc:
        return problems + _validation_problems(f"{where}.settings", exc)
    if endpoint.security != "None":
        needed = ("certificate", "private_key", "server_certificate")
        missing = [name for name in needed if getattr(settings, name) is None]
        if missing:
            problems.append(f"{where}.settings: {endpoint.security} needs {', '.join(missing)}")
    return problems
