"""Loading a checked plant into the ISA-95 tables: an idempotent upsert by ISA-95 id, audited.

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
  production consumes lots, so the file's quantity is only the opening stock. A lot's
  quantity is converted to its material's unit (``mes.units``, with the material's own
  ``conversions``: 1 BAG of FLOUR = 25 kg).

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
- A material without a ``unit`` keeps its stored one, and without a ``conversions`` key
  its stored conversions.
- Lots are the ERP's stock (``SyncMaterialLot``): a stored lot takes the message's
  quantity and, when given, disposition (its status follows: Available, or Consumed at 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.sql.base import ExecutableOption

from mes import audit, units
from mes.masterdata.checks import (
    MasterDataError,
    Stored,
    check_against_database,
    check_plant,
    conversion_sizes,
    decimal_sizes,
)
from mes.masterdata.reading import read_master_data_file
from mes.masterdata.schema import Plant, StepEntry, walk_equipment
from mes.models import (
    ControllerEndpoint,
    Equipment,
    MaterialClass,
    MaterialDefinition,
    MaterialLot,
    OperationsDefinition,
    OperationsMaterialSpec,
    OperationsSegment,
    ProcessSegment,
    TestSpecification,
    WorkMaster,
    WorkMasterEquipment,
    WorkMasterParameter,
)


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
    stored = Stored.read(session) if partial else None
    problems = check_plant(plant, stored) or check_against_database(session, plant, partial)
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
            values: dict[str, Any] = {"description": m.description, "material_class_id": class_id}
            # Checked: a material without a unit is a stored one (partial), which keeps its own.
            unit = m.unit if m.unit is not None else materials[m.id].unit
            values["unit"] = unit
            if not self.partial or "conversions" in m.model_fields_set:
                values["unit_conversions"] = conversion_sizes(m, unit)[0]
            self.upsert(MaterialDefinition, materials, m.id, values)
        s.flush()

        lots = _existing(s, MaterialLot, [lot.id for lot in plant.lots])
        for lot in plant.lots:
            if lot.id in lots and not self.partial:
                # Production consumes lots: the file's quantity is opening stock only.
                self.report.unchanged += 1
                continue
            material = materials[lot.material]
            quantity = units.convert(
                Decimal(str(lot.quantity)),
                lot.unit or material.unit,
                material.unit,
                decimal_sizes(material.unit_conversions),
            )
            if quantity is None:  # checked before: cannot happen
                raise MasterDataError(f"lot {lot.id}: unit {lot.unit!r} does not convert")
            values = {
                "material_definition_id": material.id,
                "quantity": quantity,
                "unit": material.unit,
                "status": "Available" if quantity > 0 else "Consumed",
            }
            if lot.disposition is not None:
                values["disposition"] = lot.disposition.value
            self.upsert(MaterialLot, lots, lot.id, values)

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
        walked = list(walk_equipment(plant.equipment))
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
                if not (self.partial and "calendar" not in node.model_fields_set):
                    calendar = node.calendar
                    values["calendar"] = calendar.model_dump(mode="json") if calendar else None
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
                "version": w.version,
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
                    "target": t.target,
                    "unit": t.unit,
                    "sample_size": t.sample_size,
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
