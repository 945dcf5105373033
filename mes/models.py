"""The ISA-95 (IEC 62264) object model, v1, as SQLAlchemy 2 typed ORM classes.

Names follow ISA-95 / B2MML V0701. Every ISA-95 object keeps its ISA-95 ``ID`` in a unique
``external_id`` column beside a surrogate integer key, so business keys make every write
idempotent: a retried activity hits a unique constraint instead of adding a second row.

Families:
- equipment: ``equipment`` (the role-based hierarchy) and ``controller_endpoint`` (how to
  reach a work unit's PLC: the one non-ISA-95 table);
- material: ``material_class``, ``material_definition``, ``material_lot``,
  ``material_sublot``, ``material_lot_assembly`` (genealogy edges);
- definitions: ``process_segment``, ``operations_definition`` (a product's routing) with
  ordered ``operations_segment`` rows and their ``operations_material_spec``;
  ``work_master`` (the recipe) with ``work_master_parameter`` and ``work_master_equipment``
  (which work units run it, with their ideal cycle time);
- schedule: ``operations_request`` (one ERP production order), ``segment_requirement``
  (one per routing step), ``job_order`` (what one work unit is told; its ``external_id`` is
  the OPC UA JobOrderID);
- performance: ``job_response``, ``material_actual``, ``segment_data``;
- quality: ``test_specification``, ``test_result``, ``nonconformance`` (an out-of-spec lot
  held until a supervisor disposes of it);
- machine data: ``equipment_state_interval`` and ``equipment_count`` (PackML states and
  counters, for OEE);
- ``audit_event``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from mes.quantities import Quantity
from mes.states import FINAL_STATES, RequestState

__all__ = ["FINAL_STATES", "RequestState"]  # re-exported for the model's users

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; the MES stores aware UTC times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


# --- vocabularies (stored as strings; the values are ISA-95 / B2MML names) -----------------


class EquipmentLevel(enum.StrEnum):
    ENTERPRISE = "Enterprise"
    SITE = "Site"
    AREA = "Area"
    PRODUCTION_LINE = "ProductionLine"
    WORK_CENTER = "WorkCenter"
    WORK_CELL = "WorkCell"
    PROCESS_CELL = "ProcessCell"
    PRODUCTION_UNIT = "ProductionUnit"
    UNIT = "Unit"
    WORK_UNIT = "WorkUnit"
    STORAGE_ZONE = "StorageZone"
    STORAGE_UNIT = "StorageUnit"
    EQUIPMENT_MODULE = "EquipmentModule"
    CONTROL_MODULE = "ControlModule"
    OTHER = "Other"


class MaterialUse(enum.StrEnum):
    CONSUMED = "Consumed"
    PRODUCED = "Produced"
    CONSUMABLE = "Consumable"
    BY_PRODUCT_PRODUCED = "By-product Produced"
    CO_PRODUCT_PRODUCED = "Co-product Produced"


class LotDisposition(enum.StrEnum):
    RELEASED = "Released"
    RESTRICTED = "Restricted"
    REJECTED = "Rejected"


# --- equipment ------------------------------------------------------------------------------


class Equipment(Base):
    """A node of the role-based equipment hierarchy (site, line, work unit, …)."""

    __tablename__ = "equipment"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    equipment_level: Mapped[str] = mapped_column(String(40))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("equipment.id"), index=True)
    #: Its work calendar (``mes.masterdata.schema.CalendarEntry`` as JSON): shifts and
    #: planned downtime; None: its parent's, or around the clock.
    calendar: Mapped[dict[str, Any] | None] = mapped_column()

    parent: Mapped[Equipment | None] = relationship(remote_side=[id], back_populates="children")
    children: Mapped[list[Equipment]] = relationship(
        back_populates="parent", order_by="Equipment.external_id"
    )
    endpoint: Mapped[ControllerEndpoint | None] = relationship(
        back_populates="equipment", uselist=False
    )


class ControllerEndpoint(Base):
    """How to reach the controller (PLC) of a work unit: protocol, URL and machine node."""

    __tablename__ = "controller_endpoint"

    id: Mapped[int] = mapped_column(primary_key=True)
    equipment_id: Mapped[int] = mapped_column(ForeignKey("equipment.id"), unique=True)
    protocol: Mapped[str] = mapped_column(String(20))
    url: Mapped[str] = mapped_column(String(500))
    #: The machine object under the server's Objects folder (OPC UA) or unit id (Modbus).
    machine: Mapped[str] = mapped_column(String(200))
    security: Mapped[str] = mapped_column(String(50), default="None")
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)

    equipment: Mapped[Equipment] = relationship(back_populates="endpoint")


class EquipmentStateInterval(Base):
    """A stretch of time one work unit spent in one PackML state (OPC 30050 StateCurrent),
    with the machine's stop reason (``Admin.StopReason``) if it gave one; ``ended_at`` is
    None while the unit is still in it. Written by the collector (``mes.collector``)."""

    __tablename__ = "equipment_state_interval"
    __table_args__ = (Index("ix_equipment_state_interval_equipment", "equipment_id", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    equipment_id: Mapped[int] = mapped_column(ForeignKey("equipment.id"))
    state: Mapped[int] = mapped_column(Integer)
    stop_reason: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()


class EquipmentCount(Base):
    """What one work unit processed (and how much of it was defective) since the previous
    row, from its PackML ``Admin.ProdProcessedCount`` / ``ProdDefectiveCount``; the totals
    are the counters as read, so a restarted collector continues from them."""

    __tablename__ = "equipment_count"
    __table_args__ = (Index("ix_equipment_count_equipment", "equipment_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    equipment_id: Mapped[int] = mapped_column(ForeignKey("equipment.id"))
    at: Mapped[datetime] = mapped_column()
    processed_delta: Mapped[int] = mapped_column(Integer)
    defective_delta: Mapped[int] = mapped_column(Integer)
    processed_total: Mapped[int] = mapped_column(BigInteger)
    defective_total: Mapped[int] = mapped_column(BigInteger)


# --- material -------------------------------------------------------------------------------


class MaterialClass(Base):
    __tablename__ = "material_class"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")


class MaterialDefinition(Base):
    """A kind of material: a product, an intermediate or a raw material."""

    __tablename__ = "material_definition"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    material_class_id: Mapped[int | None] = mapped_column(
        ForeignKey("material_class.id"), index=True
    )
    unit: Mapped[str] = mapped_column(String(20))
    #: The material's own units: unit → how many ``unit`` one of it is, as a decimal string
    #: ({"BAG": "25"}: a bag of this material is 25 kg); see ``mes.units.factor``.
    unit_conversions: Mapped[dict[str, Any]] = mapped_column(default=dict)

    material_class: Mapped[MaterialClass | None] = relationship()


class MaterialLot(Base):
    """An identified amount of one material: the node of the genealogy graph."""

    __tablename__ = "material_lot"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    material_definition_id: Mapped[int] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(30), default="Available")
    disposition: Mapped[str] = mapped_column(String(30), default=LotDisposition.RELEASED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The job order that made the lot (None: stock from outside), for the genealogy.
    job_order_id: Mapped[int | None] = mapped_column(ForeignKey("job_order.id"))

    material_definition: Mapped[MaterialDefinition] = relationship()


class MaterialSublot(Base):
    """A part of a lot (a container, a serial)."""

    __tablename__ = "material_sublot"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    material_lot_id: Mapped[int] = mapped_column(ForeignKey("material_lot.id"), index=True)
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))


class MaterialLotAssembly(Base):
    """A genealogy edge: ``component`` lot went into ``lot`` within one job response.

    The unique (lot, component) and the (component, lot) index serve the walk both ways
    from the index alone (``mes.genealogy``).
    """

    __tablename__ = "material_lot_assembly"
    __table_args__ = (
        UniqueConstraint("material_lot_id", "component_lot_id"),
        Index("ix_material_lot_assembly_component_lot", "component_lot_id", "material_lot_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    material_lot_id: Mapped[int] = mapped_column(ForeignKey("material_lot.id"))
    component_lot_id: Mapped[int] = mapped_column(ForeignKey("material_lot.id"))
    job_response_id: Mapped[int] = mapped_column(ForeignKey("job_response.id"), index=True)
    #: How much of the component the job consumed (its material actual), in ``unit``.
    quantity: Mapped[Decimal | None] = mapped_column(Quantity)
    unit: Mapped[str | None] = mapped_column(String(20))


# --- definitions: routings and recipes ------------------------------------------------------


class ProcessSegment(Base):
    __tablename__ = "process_segment"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")


class WorkMaster(Base):
    """The recipe one kind of work unit runs for a segment, with its parameters."""

    __tablename__ = "work_master"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    #: The recipe's version (ISA-95 WorkMaster Version), as the plant file gives it.
    version: Mapped[str] = mapped_column(String(40), default="1", server_default="1")
    description: Mapped[str] = mapped_column(String(500), default="")
    process_segment_id: Mapped[int | None] = mapped_column(
        ForeignKey("process_segment.id"), index=True
    )

    parameters: Mapped[list[WorkMasterParameter]] = relationship(
        order_by="WorkMasterParameter.name", cascade="all, delete-orphan"
    )
    equipment: Mapped[list[WorkMasterEquipment]] = relationship(
        order_by="WorkMasterEquipment.id", cascade="all, delete-orphan"
    )


class WorkMasterParameter(Base):
    """A recipe parameter: the value sent to the machine and its allowed range."""

    __tablename__ = "work_master_parameter"
    __table_args__ = (UniqueConstraint("work_master_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    work_master_id: Mapped[int] = mapped_column(ForeignKey("work_master.id"))
    name: Mapped[str] = mapped_column(String(100))
    default: Mapped[float] = mapped_column(Float)
    minimum: Mapped[float | None] = mapped_column(Float)
    maximum: Mapped[float | None] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20), default="")


class WorkMasterEquipment(Base):
    """A work unit able to run a work master, with its ideal cycle time (OEE needs it)."""

    __tablename__ = "work_master_equipment"
    __table_args__ = (UniqueConstraint("work_master_id", "equipment_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    work_master_id: Mapped[int] = mapped_column(ForeignKey("work_master.id"))
    equipment_id: Mapped[int] = mapped_column(ForeignKey("equipment.id"), index=True)
    ideal_cycle_time_s: Mapped[float] = mapped_column(Float)

    equipment: Mapped[Equipment] = relationship()


class OperationsDefinition(Base):
    """How to make one product: its routing (ordered operations segments)."""

    __tablename__ = "operations_definition"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    material_definition_id: Mapped[int] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )

    product: Mapped[MaterialDefinition] = relationship()
    segments: Mapped[list[OperationsSegment]] = relationship(
        order_by="OperationsSegment.sequence", cascade="all, delete-orphan"
    )


class OperationsSegment(Base):
    """One step of a routing: which work master runs it and what material it uses/makes."""

    __tablename__ = "operations_segment"
    __table_args__ = (
        UniqueConstraint("operations_definition_id", "sequence"),
        UniqueConstraint("operations_definition_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    operations_definition_id: Mapped[int] = mapped_column(ForeignKey("operations_definition.id"))
    external_id: Mapped[str] = mapped_column(String(100))
    sequence: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(500), default="")
    process_segment_id: Mapped[int | None] = mapped_column(
        ForeignKey("process_segment.id"), index=True
    )
    work_master_id: Mapped[int] = mapped_column(ForeignKey("work_master.id"), index=True)

    work_master: Mapped[WorkMaster] = relationship()
    process_segment: Mapped[ProcessSegment | None] = relationship()
    materials: Mapped[list[OperationsMaterialSpec]] = relationship(
        order_by="OperationsMaterialSpec.id", cascade="all, delete-orphan"
    )


class OperationsMaterialSpec(Base):
    """Material a segment uses or makes, per one unit of the order's product."""

    __tablename__ = "operations_material_spec"
    __table_args__ = (UniqueConstraint("operations_segment_id", "material_definition_id", "use"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operations_segment_id: Mapped[int] = mapped_column(ForeignKey("operations_segment.id"))
    material_definition_id: Mapped[int] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )
    use: Mapped[str] = mapped_column(String(30))
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))

    material_definition: Mapped[MaterialDefinition] = relationship()


# --- schedule: what is asked ----------------------------------------------------------------


class OperationsRequest(Base):
    """One production order from the ERP (B2MML OperationsRequest, OperationsType Production)."""

    __tablename__ = "operations_request"
    # What the lists filter and sort by, each ending in the id that makes the order total
    # (keyset pagination, ``mes.paging``): by state or ERP client newest first, by due.
    __table_args__ = (
        Index("ix_operations_request_state_id", "state", "id"),
        Index("ix_operations_request_source_id", "source", "id"),
        Index("ix_operations_request_due_id", "due", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: The ERP order number (B2MML OperationsRequest ID).
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    operations_definition_id: Mapped[int] = mapped_column(
        ForeignKey("operations_definition.id"), index=True
    )
    material_definition_id: Mapped[int] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    due: Mapped[datetime] = mapped_column()
    customer_order: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Hash of the request as the ERP sent it: the same number with another body is a conflict.
    request_hash: Mapped[str] = mapped_column(String(64))
    workflow_id: Mapped[str] = mapped_column(String(120), unique=True)
    #: The API token (ERP client) that sent the order; its callbacks go to that client.
    source: Mapped[str | None] = mapped_column(String(100))
    #: The ERP's OperationsSchedule ID the order came in (B2MML), for the report back.
    erp_schedule_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    #: When the order's workflow was known to be started (None: not yet; the relay,
    #: ``mes.relay``, starts it).
    workflow_started_at: Mapped[datetime | None] = mapped_column(index=True)

    product: Mapped[MaterialDefinition] = relationship()
    operations_definition: Mapped[OperationsDefinition] = relationship()
    segment_requirements: Mapped[list[SegmentRequirement]] = relationship(
        order_by="SegmentRequirement.sequence", back_populates="operations_request"
    )


class SegmentRequirement(Base):
    """One routing step of one order."""

    __tablename__ = "segment_requirement"
    __table_args__ = (UniqueConstraint("operations_request_id", "sequence"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operations_request_id: Mapped[int] = mapped_column(ForeignKey("operations_request.id"))
    operations_segment_id: Mapped[int] = mapped_column(
        ForeignKey("operations_segment.id"), index=True
    )
    sequence: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    #: The ERP's SegmentRequirement ID that asked for this step (B2MML), if any.
    erp_id: Mapped[str | None] = mapped_column(String(100))
    #: The ERP's window for the step (SegmentRequirement EarliestStartTime / LatestEndTime).
    earliest_start: Mapped[datetime | None] = mapped_column()
    latest_end: Mapped[datetime | None] = mapped_column()
    #: The work unit the ERP chose for the step; planning puts the job there.
    equipment_id: Mapped[int | None] = mapped_column(ForeignKey("equipment.id"), index=True)
    #: Lots the ERP chose for the step: [{material, lot, quantity}], consumed by the step.
    material_lots: Mapped[list[Any] | None] = mapped_column()

    operations_request: Mapped[OperationsRequest] = relationship(
        back_populates="segment_requirements"
    )
    operations_segment: Mapped[OperationsSegment] = relationship()
    #: The step's first job order (a rework adds more job orders on the same step; each
    #: names the one it reworks in ``rework_of_id``).
    job_order: Mapped[JobOrder | None] = relationship(
        primaryjoin="and_(SegmentRequirement.id == JobOrder.segment_requirement_id, "
        "JobOrder.rework_of_id.is_(None))",
        viewonly=True,
        uselist=False,
    )


class JobOrder(Base):
    """What one work unit is told to do; ``external_id`` is the OPC UA JobOrderID."""

    __tablename__ = "job_order"
    # The work order list by priority (alone or within a state) and the dispatch list
    # (a work unit's jobs in the open states).
    __table_args__ = (
        Index("ix_job_order_priority_id", "priority", "id"),
        Index("ix_job_order_state_priority_id", "state", "priority", "id"),
        Index("ix_job_order_equipment_state", "equipment_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(120), unique=True)
    segment_requirement_id: Mapped[int] = mapped_column(
        ForeignKey("segment_requirement.id"), index=True
    )
    #: The job order whose nonconforming lot this one reworks (None: the step's first pass).
    rework_of_id: Mapped[int | None] = mapped_column(ForeignKey("job_order.id"), index=True)
    work_master_id: Mapped[int] = mapped_column(ForeignKey("work_master.id"), index=True)
    equipment_id: Mapped[int] = mapped_column(ForeignKey("equipment.id"))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20))
    #: The recipe and material requirements as sent to the PLC, fixed at the first dispatch.
    parameters: Mapped[list[Any]] = mapped_column(default=list)
    material_requirements: Mapped[list[Any] | None] = mapped_column()
    #: SHA-256 of the recipe parameters sent to the machine (``mes.genealogy.parameters_hash``)
    #: and the work master's version, both recorded with the job response.
    parameters_hash: Mapped[str | None] = mapped_column(String(64))
    work_master_version: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()

    segment_requirement: Mapped[SegmentRequirement] = relationship()
    work_master: Mapped[WorkMaster] = relationship()
    equipment: Mapped[Equipment] = relationship()
    job_response: Mapped[JobResponse | None] = relationship(
        back_populates="job_order", uselist=False
    )


# --- performance: what happened -------------------------------------------------------------


class JobResponse(Base):
    """What the machine reported for one job order."""

    __tablename__ = "job_response"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(120), unique=True)
    job_order_id: Mapped[int] = mapped_column(ForeignKey("job_order.id"), unique=True)
    state: Mapped[str] = mapped_column(String(20))
    start_time: Mapped[datetime | None] = mapped_column()
    end_time: Mapped[datetime | None] = mapped_column()
    processed_count: Mapped[int] = mapped_column(Integer, default=0)
    defective_count: Mapped[int] = mapped_column(Integer, default=0)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    job_order: Mapped[JobOrder] = relationship(back_populates="job_response")
    material_actuals: Mapped[list[MaterialActual]] = relationship(order_by="MaterialActual.id")
    data: Mapped[list[SegmentData]] = relationship(order_by="SegmentData.name")


class MaterialActual(Base):
    """A lot (and quantity) a job consumed or produced: genealogy hangs on these."""

    __tablename__ = "material_actual"
    __table_args__ = (UniqueConstraint("job_response_id", "material_lot_id", "use"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_response_id: Mapped[int] = mapped_column(ForeignKey("job_response.id"))
    material_definition_id: Mapped[int] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )
    material_lot_id: Mapped[int] = mapped_column(ForeignKey("material_lot.id"), index=True)
    use: Mapped[str] = mapped_column(String(30))
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit: Mapped[str] = mapped_column(String(20))

    material_lot: Mapped[MaterialLot] = relationship()
    material_definition: Mapped[MaterialDefinition] = relationship()


class SegmentData(Base):
    """A value measured during a job (JobResponseData)."""

    __tablename__ = "segment_data"
    __table_args__ = (UniqueConstraint("job_response_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_response_id: Mapped[int] = mapped_column(ForeignKey("job_response.id"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20), default="")


# --- quality --------------------------------------------------------------------------------


class TestSpecification(Base):
    """What to test, on the output of a work master or on any lot of a material, with its
    limits (ISA-95 QualityTestSpecification); exactly one of the two owners is set."""

    __tablename__ = "test_specification"
    __test__ = False  # not a pytest class, despite the name

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(100), unique=True)
    work_master_id: Mapped[int | None] = mapped_column(ForeignKey("work_master.id"), index=True)
    material_definition_id: Mapped[int | None] = mapped_column(
        ForeignKey("material_definition.id"), index=True
    )
    #: The name of the measured value (JobResponseData) the test reads.
    property_name: Mapped[str] = mapped_column(String(100))
    low: Mapped[float | None] = mapped_column(Float)
    high: Mapped[float | None] = mapped_column(Float)
    target: Mapped[float | None] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20), default="")
    #: How many items one result stands for (the sample the value is measured on).
    sample_size: Mapped[int] = mapped_column(Integer, default=1)

    def passes(self, value: float) -> bool:
        """Whether a measured value is within the limits (both inclusive)."""
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


class TestResult(Base):
    """The outcome of one test specification on one lot: from the machine's job response
    (``source`` "machine") or entered by hand (``source`` "manual", ``recorded_by`` the
    token's name); who, what and when."""

    __tablename__ = "test_result"
    __table_args__ = (UniqueConstraint("test_specification_id", "job_response_id"),)
    __test__ = False

    id: Mapped[int] = mapped_column(primary_key=True)
    test_specification_id: Mapped[int] = mapped_column(ForeignKey("test_specification.id"))
    #: The job response that reported it (None for a result entered by hand).
    job_response_id: Mapped[int | None] = mapped_column(ForeignKey("job_response.id"), index=True)
    material_lot_id: Mapped[int | None] = mapped_column(ForeignKey("material_lot.id"), index=True)
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20), default="")
    passed: Mapped[bool] = mapped_column(Boolean)
    tested_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(String(20), default="machine")
    recorded_by: Mapped[str] = mapped_column(String(100), default="system")
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The nonconformance a failed result opened or joined.
    nonconformance_id: Mapped[int | None] = mapped_column(
        ForeignKey("nonconformance.id"), index=True
    )

    test_specification: Mapped[TestSpecification] = relationship()


class NonconformanceState(enum.StrEnum):
    OPEN = "Open"
    CLOSED = "Closed"


class Disposition(enum.StrEnum):
    """A supervisor's decision on a nonconforming lot."""

    RELEASE = "release"
    REWORK = "rework"
    SCRAP = "scrap"


class Nonconformance(Base):
    """A lot found out of specification: Restricted, its work order held, until a supervisor
    disposes of it (release, rework or scrap) with a reason."""

    __tablename__ = "nonconformance"
    # The list, newest first, alone or within a state.
    __table_args__ = (
        Index("ix_nonconformance_opened_at_id", "opened_at", "id"),
        Index("ix_nonconformance_state_opened_at_id", "state", "opened_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(120), unique=True)
    state: Mapped[str] = mapped_column(String(20))
    material_lot_id: Mapped[int] = mapped_column(ForeignKey("material_lot.id"), index=True)
    #: The work order that made the lot (None for a stock lot).
    job_order_id: Mapped[int | None] = mapped_column(ForeignKey("job_order.id"), index=True)
    #: What was out of specification.
    reason: Mapped[str] = mapped_column(Text)
    opened_by: Mapped[str] = mapped_column(String(100))
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    disposition: Mapped[str | None] = mapped_column(String(20))
    disposition_reason: Mapped[str | None] = mapped_column(Text)
    disposed_by: Mapped[str | None] = mapped_column(String(100))
    disposed_at: Mapped[datetime | None] = mapped_column()
    #: The new job order a rework disposition made.
    rework_job_order_id: Mapped[int | None] = mapped_column(ForeignKey("job_order.id"))

    material_lot: Mapped[MaterialLot] = relationship()
    job_order: Mapped[JobOrder | None] = relationship(foreign_keys=[job_order_id])
    rework_job_order: Mapped[JobOrder | None] = relationship(foreign_keys=[rework_job_order_id])
    results: Mapped[list[TestResult]] = relationship(order_by="TestResult.id")


# --- audit ----------------------------------------------------------------------------------


class AuditEvent(Base):
    """Who or what changed which object, from what to what, and why.

    Append-only and hash-chained: ``hash`` covers the event and ``prev_hash`` (the hash of
    event ``seq - 1``), so changing or removing any event breaks every later link. On
    PostgreSQL and SQLite a trigger refuses UPDATE and DELETE.
    """

    __tablename__ = "audit_event"
    __table_args__ = (
        # One object's events in chain order; events of actors whose name starts with a
        # prefix (LIKE 'x%': pattern ops, as the database's collation may not be C).
        Index("ix_audit_event_object_seq", "object_type", "object_id", "seq"),
        Index(
            "ix_audit_event_actor_prefix",
            "actor",
            postgresql_ops={"actor": "varchar_pattern_ops"},
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    object_type: Mapped[str] = mapped_column(String(50))
    object_id: Mapped[str] = mapped_column(String(120))
    before: Mapped[dict[str, Any] | None] = mapped_column()
    after: Mapped[dict[str, Any] | None] = mapped_column()
    reason: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The one row that holds the chain's last position; locking it orders the appends."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))


# --- access ---------------------------------------------------------------------------------


class Role(enum.StrEnum):
    """API roles; a token has exactly one."""

    ERP = "erp"
    SUPERVISOR = "supervisor"
    AUDITOR = "auditor"
    ADMIN = "admin"


class ApiToken(Base):
    """A bearer token of the API: stored as its SHA-256 only, shown once at creation."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    #: After this the token is refused as a revoked one is; None: it does not expire.
    expires_at: Mapped[datetime | None] = mapped_column()


# --- ERP integration ------------------------------------------------------------------------


class ErpClient(Base):
    """Where and how an ERP wants its callbacks; ``name`` is its API token's name."""

    __tablename__ = "erp_client"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    callback_url: Mapped[str] = mapped_column(String(500))
    #: "json" or "b2mml"
    format: Mapped[str] = mapped_column(String(10))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The HMAC key that signs its callbacks (``mes.callbacks``). Kept as it is, not hashed:
    #: the MES must sign with it. Shown to the admin once, when set or rotated.
    signing_secret: Mapped[str] = mapped_column(String(64))


class ErpMessage(Base):
    """One report to the ERP (an outbox row), written with the state change it reports.

    Delivered in ``seq`` order per order; ``message_id`` (the B2MML BODID) lets the ERP drop
    a duplicate after a delivery whose answer was lost.
    """

    __tablename__ = "erp_message"
    __table_args__ = (UniqueConstraint("operations_request_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operations_request_id: Mapped[int] = mapped_column(ForeignKey("operations_request.id"))
    seq: Mapped[int] = mapped_column(Integer)
    message_id: Mapped[str] = mapped_column(String(150), unique=True)
    erp_client: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20))
    content_type: Mapped[str] = mapped_column(String(50))
    #: The order's performance when the state changed (``OperationsPerformanceData``'s JSON
    #: form); the document is rendered from it at the first delivery.
    performance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The document as sent, in the client's format (None until first delivered).
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(index=True)
    #: Set when the ERP refused the message for good (a 4xx): it is skipped, not retried.
    rejected_at: Mapped[datetime | None] = mapped_column()

    operations_request: Mapped[OperationsRequest] = relationship()


class B2mmlMessage(Base):
    """A B2MML message received, by client and BODID: the same client sending the same BODID
    again gets the same answer (another client's BODID is its own, and its answer too)."""

    __tablename__ = "b2mml_message"
    __table_args__ = (UniqueConstraint("client", "bod_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: The API token's name that sent it.
    client: Mapped[str] = mapped_column(String(100))
    bod_id: Mapped[str] = mapped_column(String(150))
    noun: Mapped[str] = mapped_column(String(60))
    sender: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[int] = mapped_column(Integer)
    response: Mapped[str] = mapped_column(Text)
