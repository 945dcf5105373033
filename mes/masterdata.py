"""Plant master data: the plant file, its validation, and its upsert into the ISA-95 tables.

A plant file (YAML or JSON, see ``examples/plant.yaml``) describes one plant: the equipment
hierarchy with the controller endpoint of each work unit, material classes, material
definitions, stock lots, process segments, work masters (recipes with parameters, the work
units that run them and the test specifications on what they measure) and routings
(operations definitions) made of ordered steps with their material specifications.

The flow is ``read_plant_file`` → ``parse_plant`` (schema and cross-references, no
database) → ``load_plant`` (upsert by ISA-95 id). Every problem found is reported as a
``MasterDataError`` whose message names the entry, e.g.
``work_masters[1] (WM-BAKE-LOAF).parameters[0] (OvenTemp): default 300 is outside [180, 250]``.

What loading does and does not do:

- Objects are matched by their ISA-95 id (``external_id``): created when missing, updated
  when different, left alone when equal, so loading the same file twice changes nothing.
- Nothing top-level is deleted for being absent from the file (equipment, materials, lots,
  work masters, routings): orders, job orders and genealogy refer to them.
- Lists owned by one object follow the file: a work master's parameters, work units and test
  specifications, a routing's steps and each step's material specifications. A step or test
  specification that production records already refer to cannot be removed; the loader says
  so instead (give the routing a new id to change it).
- Lots are created when missing, but an existing lot's quantity is never overwritten:
  production consumes lots, so the file's quantity is only the opening stock.

A plant file is complete: everything it refers to is defined in it. A **partial** load
(``partial=True``; B2MML ``Sync…`` messages carry one noun at a time) may also refer to
what the database already holds, and three things differ so that a message about one
noun cannot undo another:

- A top-level equipment entry may name its stored ``parent``; without one it keeps the
  parent it has (a new one becomes a root).
- An equipment entry without an ``endpoint`` key keeps its stored endpoint, and a work
  master without a ``test_specifications`` key keeps its stored test specifications (B2MML
  has no place for either). Given, even empty, they replace what is stored, as in a file.
- Every check still runs before the first write, against the file and the database
  together, and names the entry; ``read_master_data_file`` reads B2MML ``.xml`` files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.sql.base import ExecutableOption

from mes import audit
from mes.models import (
    ControllerEndpoint,
    Equipment,
    EquipmentLevel,
    MaterialClass,
    MaterialDefinition,
    MaterialLot,
    MaterialUse,
    OperationsDefinition,
    OperationsMaterialSpec,
    OperationsSegment,
    ProcessSegment,
    SegmentRequirement,
    TestResult,
    TestSpecification,
    WorkMaster,
    WorkMasterEquipment,
    WorkMasterParameter,
)

__all__ = [
    "LoadReport",
    "MasterDataError",
    "Plant",
    "equipment_tree",
    "list_products",
    "load_plant",
    "load_plant_file",
    "parse_plant",
    "read_master_data_file",
    "read_plant_file",
]


class MasterDataError(ValueError):
    """A plant file (or a load of it) is wrong; ``problems`` lists each one with its entry."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


# --- the plant file schema --------------------------------------------------------------------
# Lengths follow the columns in mes/models.py, so a valid file never fails in the database.

Id = Annotated[str, Field(min_length=1, max_length=100)]
Description = Annotated[str, Field(max_length=500)]
Unit = Annotated[str, Field(min_length=1, max_length=20)]
OptionalUnit = Annotated[str, Field(max_length=20)]


class _Entry(BaseModel):
    # A misspelt key must fail loudly, not be dropped: "defualt: 300" would otherwise load.
    model_config = ConfigDict(extra="forbid")


class EndpointEntry(_Entry):
    """How the MES reaches a work unit's controller."""

    protocol: Literal["opcua", "modbus"]
    url: Annotated[str, Field(min_length=1, max_length=500)]
    #: The machine object on the server (OPC UA) or the unit id (Modbus); default: equipment id.
    machine: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    security: Annotated[str, Field(max_length=50)] = "None"
    settings: dict[str, Any] = {}


class EquipmentEntry(_Entry):
    """One node of the equipment hierarchy, with its children nested."""

    id: Id
    level: EquipmentLevel
    description: Description = ""
    endpoint: EndpointEntry | None = None
    children: list[EquipmentEntry] = []
    #: Partial loads only, top-level entries only: the stored equipment this one hangs under.
    parent: Id | None = None


class MaterialClassEntry(_Entry):
    id: Id
    description: Description = ""


class MaterialEntry(_Entry):
    """A material definition: raw material, intermediate or product."""

    id: Id
    description: Description = ""
    material_class: Id | None = None
    unit: Unit


class LotEntry(_Entry):
    """A stock lot; ``quantity`` is the opening stock, used only when the lot is created."""

    id: Id
    material: Id
    quantity: Annotated[float, Field(ge=0)]
    unit: Unit | None = None


class ProcessSegmentEntry(_Entry):
    id: Id
    description: Description = ""


class ParameterEntry(_Entry):
    """A recipe parameter: the default sent to the machine and its allowed range."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    default: float
    min: float | None = None
    max: float | None = None
    unit: OptionalUnit = ""


class WorkUnitEntry(_Entry):
    """A work unit able to run the work master, with its ideal time per unit of product."""

    equipment: Id
    ideal_cycle_time_s: Annotated[float, Field(gt=0)]


class TestSpecEntry(_Entry):
    """Limits on a value the machine measures; ``property`` is the measured value's name."""

    __test__ = False  # not a pytest class, despite the name

    id: Id
    property: Annotated[str, Field(min_length=1, max_length=100)]
    low: float
    high: float
    unit: OptionalUnit = ""


class WorkMasterEntry(_Entry):
    """A recipe: what one kind of work unit runs for one segment of one product."""

    id: Id
    description: Description = ""
    process_segment: Id
    parameters: list[ParameterEntry] = []
    work_units: list[WorkUnitEntry] = []
    test_specifications: list[TestSpecEntry] = []


class MaterialSpecEntry(_Entry):
    """Material a step uses or makes, per 1 unit of the routing's product."""

    material: Id
    use: MaterialUse
    quantity: Annotated[float, Field(gt=0)]
    unit: Unit | None = None


class StepEntry(_Entry):
    """One routing step (ISA-95 operations segment); its process segment is its work master's."""

    id: Id
    description: Description = ""
    work_master: Id
    materials: list[MaterialSpecEntry] = []


class RoutingEntry(_Entry):
    """How to make one product (ISA-95 operations definition): steps in the order they run."""

    id: Id
    product: Id
    description: Description = ""
    steps: Annotated[list[StepEntry], Field(min_length=1)]


class Plant(_Entry):
    """A whole plant file."""

    equipment: list[EquipmentEntry] = []
    material_classes: list[MaterialClassEntry] = []
    materials: list[MaterialEntry] = []
    lots: list[LotEntry] = []
    process_segments: list[ProcessSegmentEntry] = []
    work_masters: list[WorkMasterEntry] = []
    routings: list[RoutingEntry] = []


# --- reading and validating -------------------------------------------------------------------


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a copied line must fail instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_plant_file(path: str | Path) -> Plant:
    """Read and validate a plant file: YAML (``.yaml``/``.yml``) or JSON (``.json``).

    Raises ``MasterDataError`` for syntax, schema and cross-reference errors; ``OSError``
    when the file cannot be read.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    data: Any
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_NoDuplicateKeysLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise MasterDataError(f"{p.name}: not valid YAML: {exc}") from exc
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MasterDataError(f"{p.name}: not valid JSON: {exc}") from exc
    elif suffix == ".xml":
        raise MasterDataError(
            f"{p.name}: a B2MML file holds part of a plant; read it with read_master_data_file"
        )
    else:
        raise MasterDataError(f"{p.name}: unknown plant file type; use .yaml, .yml or .json")
    return parse_plant(data)


def read_master_data_file(path: str | Path) -> tuple[Plant, bool]:
    """Read a plant file or a B2MML master data message; return it and whether it is partial.

    ``.yaml``/``.yml``/``.json`` are plant files (complete, see ``read_plant_file``);
    ``.xml`` holds one B2MML ``Sync…`` message (MaterialClass, MaterialDefinition,
    Equipment, ProcessSegment, OperationsDefinition, WorkMaster), which is partial. Raises
    ``MasterDataError`` for anything wrong with the file, its XML or its content.
    """
    p = Path(path)
    if p.suffix.lower() != ".xml":
        return read_plant_file(p), False
    # Imported here: mes.b2mml is a layer above this module and imports it for its types.
    from mes.b2mml import B2MMLError, SyncMasterData, decode

    try:
        message = decode(p.read_bytes())
    except B2MMLError as exc:
        raise MasterDataError([f"{p.name}: {reason}" for reason in exc.reasons]) from exc
    if not isinstance(message, SyncMasterData):
        raise MasterDataError(
            f"{p.name}: holds a {type(message).__name__}, not a B2MML Sync master data message"
        )
    return parse_plant(message.plant, partial=True), True


def parse_plant(data: dict[str, Any], partial: bool = False) -> Plant:
    """Validate plant data (as read from YAML/JSON) and check its cross-references.

    With ``partial`` a reference to something the data does not define is left for
    ``load_plant(..., partial=True)`` to resolve against the database. Raises
    ``MasterDataError`` listing every problem, each prefixed by the entry's path.
    """
    if not isinstance(data, dict):
        raise MasterDataError(
            f"plant file: the top level must be a mapping of sections, not {type(data).__name__}"
        )
    try:
        plant = Plant.model_validate(data)
    except ValidationError as exc:
        raise MasterDataError(_schema_problems(data, exc)) from exc
    problems = _check_plant(plant, _Stored(deferred=True) if partial else None)
    if problems:
        raise MasterDataError(problems)
    return plant


_LABEL_KEYS = ("id", "name", "material", "equipment")


def _label(node: Any) -> str | None:
    """The id-like value that names a list entry in messages, when the entry has one."""
    if isinstance(node, dict):
        for key in _LABEL_KEYS:
            value = node.get(key)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)
    return None


def _schema_problems(data: Any, exc: ValidationError) -> list[str]:
    """Turn pydantic's locations into plant-file paths that name entries by their ids."""
    problems = []
    for err in exc.errors(include_url=False):
        parts: list[str] = []
        node: Any = data
        for key in err["loc"]:
            if isinstance(key, int):
                node = node[key] if isinstance(node, list) and 0 <= key < len(node) else None
                label = _label(node)
                entry = f"[{key}]" + (f" ({label})" if label is not None else "")
                if parts:
                    parts[-1] += entry
                else:
                    parts.append(entry)
            else:
                parts.append(key)
                node = node.get(key) if isinstance(node, dict) else None
        message = err["msg"]
        given = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and (
            given is None or isinstance(given, str | int | float | bool)
        ):
            message += f" (got {given!r})"
        problems.append(f"{'.'.join(parts) or 'plant file'}: {message}")
    return problems


def _num(x: float) -> str:
    """300.0 → "300", 0.006 → "0.006": numbers as the engineer wrote them."""
    return str(int(x)) if x.is_integer() else repr(x)


def _walk_equipment(
    nodes: list[EquipmentEntry], prefix: str = "equipment", parent: str | None = None
) -> Iterator[tuple[str, EquipmentEntry, str | None, int]]:
    """Every equipment entry with its path, its parent's id and its depth, parents first."""
    for i, node in enumerate(nodes):
        path = f"{prefix}[{i}] ({node.id})"
        yield path, node, parent, 0
        for sub_path, sub, sub_parent, depth in _walk_equipment(
            node.children, f"{path}.children", node.id
        ):
            yield sub_path, sub, sub_parent, depth + 1


@dataclass
class _Stored:
    """What the database holds that a partial load may refer to, by ISA-95 id.

    ``deferred`` stands for a database not consulted yet (``parse_plant(partial=True)``):
    an unknown reference is then no problem, and checks that need the referred object skip.
    """

    deferred: bool = False
    material_classes: set[str] = field(default_factory=set)
    #: material id → its unit
    materials: dict[str, str] = field(default_factory=dict)
    #: equipment id → (level, has an endpoint, parent id)
    equipment: dict[str, tuple[str, bool, str | None]] = field(default_factory=dict)
    process_segments: set[str] = field(default_factory=set)
    #: work master id → whether any work unit can run it
    work_masters: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def read(cls, session: Session) -> _Stored:
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
        return cls(
            material_classes=set(session.scalars(select(MaterialClass.external_id))),
            materials={
                row.external_id: row.unit
                for row in session.execute(
                    select(MaterialDefinition.external_id, MaterialDefinition.unit)
                )
            },
            equipment=equipment,
            process_segments=set(session.scalars(select(ProcessSegment.external_id))),
            work_masters={
                wm: wm in runnable for wm in session.scalars(select(WorkMaster.external_id))
            },
        )


def _check_plant(plant: Plant, stored: _Stored | None = None) -> list[str]:
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
    for path, node, parent, depth in _walk_equipment(plant.equipment):
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
    for i, m in enumerate(plant.materials):
        class_id = m.material_class
        if class_id is None or class_id in classes or class_id in stored_classes or deferred:
            continue
        problems.append(f"materials[{i}] ({m.id}): unknown material_class {class_id!r}")

    def material_unit(material_id: str) -> str | None:
        material = materials.get(material_id)
        if material is not None:
            return material.unit
        return stored.materials.get(material_id) if stored is not None else None

    def check_unit(path: str, material_id: str, unit: str | None) -> None:
        material_unit_ = material_unit(material_id)
        if material_unit_ is None:
            if not deferred:
                problems.append(f"{path}: unknown material {material_id!r}")
        elif unit is not None and unit != material_unit_:
            # The MES converts no units: stock is booked in the material's unit.
            problems.append(
                f"{path}: unit {unit!r} differs from {material_id}'s unit {material_unit_!r}"
            )

    unique("lots", [lot.id for lot in plant.lots])
    for i, lot in enumerate(plant.lots):
        check_unit(f"lots[{i}] ({lot.id})", lot.material, lot.unit)

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

    unique("routings", [r.id for r in plant.routings])
    routing_of_product: dict[str, str] = {}
    for i, routing in enumerate(plant.routings):
        r_path = f"routings[{i}] ({routing.id})"
        if material_unit(routing.product) is None:
            if not deferred:
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


# --- loading into the database ----------------------------------------------------------------


@dataclass
class LoadReport:
    """How many rows a load created, updated, left unchanged and deleted."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def __str__(self) -> str:
        return (
            f"created {self.created}, updated {self.updated}, "
            f"unchanged {self.unchanged}, deleted {self.deleted}"
        )


_Keyed = TypeVar(
    "_Keyed",
    Equipment,
    MaterialClass,
    MaterialDefinition,
    MaterialLot,
    ProcessSegment,
    WorkMaster,
    TestSpecification,
    OperationsDefinition,
)


def _existing(
    session: Session, model: type[_Keyed], ids: Sequence[str], *options: ExecutableOption
) -> dict[str, _Keyed]:
    """The rows of ``model`` with these ISA-95 ids, by id."""
    if not ids:
        return {}
    query = select(model).where(model.external_id.in_(ids)).options(*options)
    return {row.external_id: row for row in session.scalars(query)}


def _assign(row: object, values: dict[str, Any]) -> bool:
    """Set only the attributes that differ, so an unchanged row is not even marked dirty."""
    changed = False
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def load_plant(
    session: Session,
    plant: Plant,
    opcua_url: str | None = None,
    partial: bool = False,
    *,
    actor: str | None = None,
) -> LoadReport:
    """Upsert a plant into the database by ISA-95 id, in the caller's transaction.

    The caller commits. Every check (the file's own and those against the database, such as
    a lot changing material or a step that orders already use being removed) runs before
    the first write, and raises ``MasterDataError``; a database error after that leaves a
    partly flushed transaction that the caller must roll back (``load_plant_file`` does).

    ``opcua_url``, when given, replaces the URL of every ``opcua`` endpoint: the embedded
    demo points all work units at its own simulator. Existing lots keep their quantity.
    ``partial`` loads part of a plant: references may name stored objects, and an omitted
    parent, endpoint or test specification list keeps what is stored (see the module doc).
    Every row it creates, changes or deletes is audited (``mes.audit``), under ``actor``
    when given.
    """
    stored = _Stored.read(session) if partial else None
    problems = _check_plant(plant, stored) or _check_against_database(session, plant, partial)
    if problems:
        raise MasterDataError(problems)
    if actor is not None:
        audit.act_as(session, actor)
    report = LoadReport()
    _Loader(session, report, opcua_url, partial).load(plant)
    return report


class _Loader:
    """One load: the session, the running report and the ids of rows already written."""

    def __init__(
        self, session: Session, report: LoadReport, opcua_url: str | None, partial: bool
    ) -> None:
        self.session = session
        self.report = report
        self.opcua_url = opcua_url
        self.partial = partial

    def upsert(
        self, model: type[_Keyed], rows: dict[str, _Keyed], id_: str, values: dict[str, Any]
    ) -> _Keyed:
        row = rows.get(id_)
        if row is None:
            row = model(external_id=id_, **values)
            self.session.add(row)
            rows[id_] = row
            self.report.created += 1
        else:
            self.tally(_assign(row, values))
        return row

    def tally(self, changed: bool) -> None:
        if changed:
            self.report.updated += 1
        else:
            self.report.unchanged += 1

    def load(self, plant: Plant) -> None:
        s = self.session
        # Each lookup also fetches what the plant refers to, which a partial load may find
        # stored rather than in the plant (a complete plant defines it, so nothing changes).
        class_ids = [c.id for c in plant.material_classes]
        class_ids += [m.material_class for m in plant.materials if m.material_class]
        classes = _existing(s, MaterialClass, class_ids)
        for c in plant.material_classes:
            self.upsert(MaterialClass, classes, c.id, {"description": c.description})
        s.flush()

        material_ids = [m.id for m in plant.materials] + [lot.material for lot in plant.lots]
        material_ids += [r.product for r in plant.routings]
        material_ids += [
            spec.material for r in plant.routings for step in r.steps for spec in step.materials
        ]
        materials = _existing(s, MaterialDefinition, material_ids)
        for m in plant.materials:
            class_id = classes[m.material_class].id if m.material_class else None
            values = {"description": m.description, "material_class_id": class_id, "unit": m.unit}
            self.upsert(MaterialDefinition, materials, m.id, values)
        s.flush()

        lots = _existing(s, MaterialLot, [lot.id for lot in plant.lots])
        for lot in plant.lots:
            if lot.id in lots:
                # Production consumes lots: the file's quantity is opening stock only.
                self.report.unchanged += 1
                continue
            material = materials[lot.material]
            self.upsert(
                MaterialLot,
                lots,
                lot.id,
                {
                    "material_definition_id": material.id,
                    "quantity": lot.quantity,
                    "unit": material.unit,
                },
            )

        segment_ids = [p.id for p in plant.process_segments]
        segment_ids += [w.process_segment for w in plant.work_masters]
        segments = _existing(s, ProcessSegment, segment_ids)
        for p in plant.process_segments:
            self.upsert(ProcessSegment, segments, p.id, {"description": p.description})
        s.flush()

        equipment = self.load_equipment(plant)
        work_masters = self.load_work_masters(plant, segments, equipment)
        self.load_routings(plant, materials, work_masters)
        s.flush()

    def load_equipment(self, plant: Plant) -> dict[str, Equipment]:
        s = self.session
        walked = list(_walk_equipment(plant.equipment))
        ids = [node.id for _, node, _, _ in walked]
        ids += [node.parent for node in plant.equipment if node.parent]
        ids += [wu.equipment for w in plant.work_masters for wu in w.work_units]
        rows = _existing(s, Equipment, ids)
        # Level by level, so every parent has its id before its children point at it.
        for depth in range(max((d for *_, d in walked), default=-1) + 1):
            for _, node, parent, d in walked:
                if d != depth:
                    continue
                values: dict[str, Any] = {
                    "description": node.description,
                    "equipment_level": node.level.value,
                }
                parent = parent or node.parent
                if parent is not None:
                    values["parent_id"] = rows[parent].id
                elif not (self.partial and node.id in rows):
                    # A partial top-level entry without a parent keeps the one it has.
                    values["parent_id"] = None
                self.upsert(Equipment, rows, node.id, values)
            s.flush()

        row_ids = [rows[node.id].id for _, node, _, _ in walked]
        endpoints = {
            e.equipment_id: e
            for e in s.scalars(
                select(ControllerEndpoint).where(ControllerEndpoint.equipment_id.in_(row_ids))
            )
        }
        for _, node, _, _ in walked:
            if self.partial and "endpoint" not in node.model_fields_set:
                continue  # B2MML has no endpoint: the stored one stays
            row = rows[node.id]
            current = endpoints.get(row.id)
            if node.endpoint is None:
                if current is not None:
                    s.delete(current)
                    self.report.deleted += 1
                continue
            ep = node.endpoint
            url = self.opcua_url if self.opcua_url and ep.protocol == "opcua" else ep.url
            values = {
                "protocol": ep.protocol,
                "url": url,
                "machine": ep.machine or node.id,
                "security": ep.security,
                "settings": ep.settings,
            }
            if current is None:
                s.add(ControllerEndpoint(equipment_id=row.id, **values))
                self.report.created += 1
            else:
                self.tally(_assign(current, values))
        s.flush()
        return rows

    def load_work_masters(
        self,
        plant: Plant,
        segments: dict[str, ProcessSegment],
        equipment: dict[str, Equipment],
    ) -> dict[str, WorkMaster]:
        s = self.session
        # With the work masters the routings run, which a partial load may find stored.
        wm_ids = [w.id for w in plant.work_masters]
        wm_ids += [step.work_master for r in plant.routings for step in r.steps]
        rows = _existing(
            s,
            WorkMaster,
            wm_ids,
            selectinload(WorkMaster.parameters),
            selectinload(WorkMaster.equipment),
        )
        for w in plant.work_masters:
            values = {
                "description": w.description,
                "process_segment_id": segments[w.process_segment].id,
            }
            self.upsert(WorkMaster, rows, w.id, values)
        s.flush()

        for w in plant.work_masters:
            wm = rows[w.id]
            params = {p.name: p for p in wm.parameters}
            for par in w.parameters:
                values = {
                    "default": par.default,
                    "minimum": par.min,
                    "maximum": par.max,
                    "unit": par.unit,
                }
                row = params.pop(par.name, None)
                if row is None:
                    wm.parameters.append(WorkMasterParameter(name=par.name, **values))
                    self.report.created += 1
                else:
                    self.tally(_assign(row, values))
            for gone in params.values():
                wm.parameters.remove(gone)  # delete-orphan removes the row
                self.report.deleted += 1

            units = {u.equipment_id: u for u in wm.equipment}
            for wu in w.work_units:
                equipment_id = equipment[wu.equipment].id
                unit_row = units.pop(equipment_id, None)
                if unit_row is None:
                    wm.equipment.append(
                        WorkMasterEquipment(
                            equipment_id=equipment_id, ideal_cycle_time_s=wu.ideal_cycle_time_s
                        )
                    )
                    self.report.created += 1
                else:
                    self.tally(_assign(unit_row, {"ideal_cycle_time_s": wu.ideal_cycle_time_s}))
            for gone_unit in units.values():
                wm.equipment.remove(gone_unit)
                self.report.deleted += 1
        s.flush()

        # Test specifications have global ids; those of a loaded work master that the file no
        # longer lists are removed, or the quality gate would keep applying them. A partial
        # work master without the key (B2MML has no place for them) keeps its own.
        with_specs = [
            w
            for w in plant.work_masters
            if not self.partial or "test_specifications" in w.model_fields_set
        ]
        spec_ids = [t.id for w in with_specs for t in w.test_specifications]
        specs = _existing(s, TestSpecification, spec_ids)
        owner_ids = [rows[w.id].id for w in with_specs]
        if owner_ids:
            for stale in s.scalars(
                select(TestSpecification).where(
                    TestSpecification.work_master_id.in_(owner_ids),
                    TestSpecification.external_id.not_in(spec_ids),
                )
            ):
                s.delete(stale)
                self.report.deleted += 1
        for w in with_specs:
            for t in w.test_specifications:
                values = {
                    "work_master_id": rows[w.id].id,
                    "property_name": t.property,
                    "low": t.low,
                    "high": t.high,
                    "unit": t.unit,
                }
                self.upsert(TestSpecification, specs, t.id, values)
        s.flush()
        return rows

    def load_routings(
        self,
        plant: Plant,
        materials: dict[str, MaterialDefinition],
        work_masters: dict[str, WorkMaster],
    ) -> None:
        s = self.session
        rows = _existing(
            s,
            OperationsDefinition,
            [r.id for r in plant.routings],
            selectinload(OperationsDefinition.segments).selectinload(OperationsSegment.materials),
        )
        for r in plant.routings:
            values = {
                "description": r.description,
                "material_definition_id": materials[r.product].id,
            }
            self.upsert(OperationsDefinition, rows, r.id, values)
        s.flush()

        for r in plant.routings:
            od = rows[r.id]
            current = {seg.external_id: seg for seg in od.segments}
            wanted = {step.id for step in r.steps}
            for seg_id, seg in list(current.items()):
                if seg_id not in wanted:
                    self.report.deleted += 1 + len(seg.materials)
                    od.segments.remove(seg)
                    del current[seg_id]
            moved = [
                (current[step.id], position)
                for position, step in enumerate(r.steps, start=1)
                if step.id in current and current[step.id].sequence != position
            ]
            # (routing, sequence) is unique and checked per statement: park moved steps on
            # negative numbers first, so reordering never collides with a step not yet moved.
            s.flush()
            for seg, position in moved:
                seg.sequence = -position
            s.flush()

            for position, step in enumerate(r.steps, start=1):
                wm = work_masters[step.work_master]
                values = {
                    "sequence": position,
                    "description": step.description,
                    "process_segment_id": wm.process_segment_id,
                    "work_master_id": wm.id,
                }
                found = current.get(step.id)
                if found is None:
                    found = OperationsSegment(external_id=step.id, **values)
                    od.segments.append(found)
                    self.report.created += 1
                else:
                    self.tally(_assign(found, values))
                self.sync_material_specs(found, step, materials)
            s.flush()

    def sync_material_specs(
        self,
        seg: OperationsSegment,
        step: StepEntry,
        materials: dict[str, MaterialDefinition],
    ) -> None:
        specs = {(m.material_definition_id, m.use): m for m in seg.materials}
        for spec in step.materials:
            material = materials[spec.material]
            values = {"quantity": spec.quantity, "unit": material.unit}
            row = specs.pop((material.id, spec.use.value), None)
            if row is None:
                seg.materials.append(
                    OperationsMaterialSpec(
                        material_definition_id=material.id, use=spec.use.value, **values
                    )
                )
                self.report.created += 1
            else:
                self.tally(_assign(row, values))
        for gone in specs.values():
            seg.materials.remove(gone)
            self.report.deleted += 1


def _check_against_database(session: Session, plant: Plant, partial: bool = False) -> list[str]:
    """Checks that need what is already stored; they read only, so a failure writes nothing."""
    problems: list[str] = []

    # A work unit losing its endpoint while stored work masters the load leaves alone still
    # run on it: their jobs could no longer be sent (those in the load are checked already).
    dropped = {
        node.id: path
        for path, node, _, _ in _walk_equipment(plant.equipment)
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

    units = {m.id: m.unit for m in plant.materials}
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


def load_plant_file(
    session_factory: sessionmaker[Session],
    path: str | Path,
    opcua_url: str | None = None,
    actor: str = "system",
) -> LoadReport:
    """Read, validate and load a master data file in one transaction: all of it or nothing.

    A plant file (``.yaml``/``.yml``/``.json``) loads as a complete plant, a B2MML ``Sync…``
    message (``.xml``) as a partial one (see ``read_master_data_file``).
    """
    plant, partial = read_master_data_file(path)
    with session_factory() as session, session.begin():
        return load_plant(session, plant, opcua_url, partial=partial, actor=actor)


# --- read helpers for the API -----------------------------------------------------------------


def list_products(session: Session) -> list[dict[str, Any]]:
    """Products that have a routing, with its steps and the work units able to run each.

    One entry per routing, sorted by product id then routing id::

        {"id", "description", "unit", "routing",
         "steps": [{"sequence", "id", "work_master", "work_units": [ids]}]}
    """
    routings = session.scalars(
        select(OperationsDefinition).options(
            selectinload(OperationsDefinition.product),
            selectinload(OperationsDefinition.segments)
            .selectinload(OperationsSegment.work_master)
            .selectinload(WorkMaster.equipment)
            .selectinload(WorkMasterEquipment.equipment),
        )
    ).all()
    products = [
        {
            "id": od.product.external_id,
            "description": od.product.description,
            "unit": od.product.unit,
            "routing": od.external_id,
            "steps": [
                {
                    "sequence": seg.sequence,
                    "id": seg.external_id,
                    "work_master": seg.work_master.external_id,
                    "work_units": sorted(
                        e.equipment.external_id for e in seg.work_master.equipment
                    ),
                }
                for seg in od.segments
            ],
        }
        for od in routings
    ]
    return sorted(products, key=lambda p: (p["id"], p["routing"]))


def equipment_tree(session: Session) -> list[dict[str, Any]]:
    """The equipment hierarchy from its roots, children sorted by id.

    Each node is ``{"id", "level", "description", "children"}``; work units also carry
    ``"endpoint": {"protocol", "url", "machine"}`` (``None`` when they have none).
    """
    rows = session.scalars(select(Equipment).options(selectinload(Equipment.endpoint))).all()
    # Built in memory from one query: walking ``children`` would query once per node.
    nodes: dict[int, dict[str, Any]] = {}
    for row in rows:
        node: dict[str, Any] = {
            "id": row.external_id,
            "level": row.equipment_level,
            "description": row.description,
            "children": [],
        }
        if row.equipment_level == EquipmentLevel.WORK_UNIT:
            ep = row.endpoint
            node["endpoint"] = (
                None
                if ep is None
                else {"protocol": ep.protocol, "url": ep.url, "machine": ep.machine}
            )
        nodes[row.id] = node
    roots: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: r.external_id):
        parent = nodes.get(row.parent_id) if row.parent_id is not None else None
        (parent["children"] if parent is not None else roots).append(nodes[row.id])
    return roots
