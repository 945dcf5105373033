"""The plant file schema: the pydantic models of one plant file, entry by entry.

Validating against these models checks shapes, types and lengths only; whether the entries
agree with each other and with the database is ``mes.masterdata.checks``'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import time
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from mes.models import EquipmentLevel, LotDisposition, MaterialUse
from mes.quantities import QuantityLax

# Lengths follow the columns in mes/models.py, so a valid file never fails in the database.

Id = Annotated[str, Field(min_length=1, max_length=100)]
Description = Annotated[str, Field(max_length=500)]
Unit = Annotated[str, Field(min_length=1, max_length=20)]
OptionalUnit = Annotated[str, Field(max_length=20)]


class _Entry(BaseModel):
    # A misspelt key must fail loudly, not be dropped: "defualt: 300" would otherwise load.
    model_config = ConfigDict(extra="forbid")


#: The OPC UA security an endpoint may name: the policy and the message security mode.
OPCUA_SECURITY = ("None", "Basic256Sha256-Sign", "Basic256Sha256-SignAndEncrypt")

Reference = Annotated[str, Field(min_length=1, max_length=500)]


class OpcUaSettings(_Entry):
    """The ``settings`` of an OPC UA endpoint: where its secrets are, never a secret itself.

    Paths are read on the worker that opens the session, relative to its working directory.
    A secured endpoint (``security`` other than None) needs the MES's ``certificate`` (its
    application URI becomes the client's) and ``private_key``, and the ``server_certificate``
    the MES expects, so a server is authenticated, not merely asked for its certificate.
    ``user`` logs in with the password held in the environment variable ``password_env`` or
    the file ``password_file``: master data names where the password is and never holds it,
    so no API answer, audit event or workflow history can show it.
    """

    certificate: Reference | None = None
    private_key: Reference | None = None
    server_certificate: Reference | None = None
    user: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    password_env: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    password_file: Reference | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "password: master data does not hold passwords; name the environment "
                "variable (password_env) or the file (password_file) that holds it"
            )
        return data

    @model_validator(mode="after")
    def _one_password(self) -> OpcUaSettings:
        given = [k for k in ("password_env", "password_file") if getattr(self, k) is not None]
        if self.user is not None and len(given) != 1:
            raise ValueError("user: needs exactly one of password_env and password_file")
        if self.user is None and given:
            raise ValueError(f"{given[0]}: a password needs a user")
        return self


class EndpointEntry(_Entry):
    """How the MES reaches a work unit's controller.

    ``security`` is, for OPC UA, one of ``OPCUA_SECURITY`` and ``settings`` an
    ``OpcUaSettings`` (certificates and login); for Modbus ``settings`` is the machine's
    register map (``adapters.modbus.registers.RegisterMap``, its device id included).
    """

    protocol: Literal["opcua", "modbus"]
    url: Annotated[str, Field(min_length=1, max_length=500)]
    #: The machine object on the server (OPC UA) or its name (Modbus); default: equipment id.
    machine: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    security: Annotated[str, Field(max_length=50)] = "None"
    settings: dict[str, Any] = {}


class ShiftEntry(_Entry):
    """A shift worked every day, in UTC; an ``end`` at or before ``start`` ends the next day."""

    name: Annotated[str, Field(min_length=1, max_length=50)]
    start: time
    end: time


class PlannedDowntimeEntry(_Entry):
    """A stretch of time the equipment is not planned to run (maintenance, a holiday)."""

    start: AwareDatetime
    end: AwareDatetime
    reason: Description = ""

    @model_validator(mode="after")
    def _ordered(self) -> PlannedDowntimeEntry:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class CalendarEntry(_Entry):
    """When equipment is planned to run (OEE's planned busy time): its shifts (none: around
    the clock) minus its planned downtime. Equipment without one takes its parent's."""

    shifts: list[ShiftEntry] = []
    planned_downtime: list[PlannedDowntimeEntry] = []


class EquipmentEntry(_Entry):
    """One node of the equipment hierarchy, with its children nested."""

    id: Id
    level: EquipmentLevel
    description: Description = ""
    endpoint: EndpointEntry | None = None
    #: When it is planned to run (its work units too, unless they have their own).
    calendar: CalendarEntry | None = None
    children: list[EquipmentEntry] = []
    #: Partial loads only, top-level entries only: the stored equipment this one hangs under.
    parent: Id | None = None


class MaterialClassEntry(_Entry):
    id: Id
    description: Description = ""


class ConversionEntry(_Entry):
    """One of a material's own units: 1 ``unit`` is ``factor`` ``of`` (default: the
    material's unit). ``{unit: BAG, factor: 25, of: kg}``: a bag of it is 25 kg."""

    unit: Unit
    factor: Annotated[float, Field(gt=0)]
    of: Unit | None = None


class MaterialEntry(_Entry):
    """A material definition: raw material, intermediate or product.

    ``unit`` is required in a plant file; a partial load (B2MML) may leave it out for a
    stored material, which keeps its unit.
    """

    id: Id
    description: Description = ""
    material_class: Id | None = None
    unit: Unit | None = None
    #: The material's own units (BAG, DRUM, …) where the standard vocabulary has none.
    conversions: list[ConversionEntry] = []


class LotEntry(_Entry):
    """A stock lot, in ``unit`` (converted to the material's unit; default: that unit).

    A plant file's ``quantity`` is the opening stock, used only when the lot is created; a
    partial load (B2MML ``SyncMaterialLot``: the ERP holds the stock) also updates a stored
    lot's quantity and disposition.
    """

    id: Id
    material: Id
    quantity: Annotated[QuantityLax, Field(ge=0)]
    unit: Unit | None = None
    disposition: LotDisposition | None = None


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
    target: float | None = None
    unit: OptionalUnit = ""
    #: How many items one measured value stands for.
    sample_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1


class WorkMasterEntry(_Entry):
    """A recipe: what one kind of work unit runs for one segment of one product."""

    id: Id
    #: The recipe's version; a produced lot shows the version it was made with.
    version: Annotated[str, Field(min_length=1, max_length=40)] = "1"
    description: Description = ""
    process_segment: Id
    parameters: list[ParameterEntry] = []
    work_units: list[WorkUnitEntry] = []
    test_specifications: list[TestSpecEntry] = []


class MaterialSpecEntry(_Entry):
    """Material a step uses or makes, per 1 unit of the routing's product."""

    material: Id
    use: MaterialUse
    quantity: Annotated[QuantityLax, Field(gt=0)]
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


def walk_equipment(
    nodes: list[EquipmentEntry], prefix: str = "equipment", parent: str | None = None
) -> Iterator[tuple[str, EquipmentEntry, str | None, int]]:
    """Every equipment entry with its path, its parent's id and its depth, parents first."""
    for i, node in enumerate(nodes):
        path = f"{prefix}[{i}] ({node.id})"
        yield path, node, parent, 0
        for sub_path, sub, sub_parent, depth in walk_equipment(
            node.children, f"{path}.children", node.id
        ):
            yield sub_path, sub, sub_parent, depth + 1
