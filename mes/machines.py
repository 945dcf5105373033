"""The machine port: what the MES asks of a work unit's controller, whatever its protocol.

``EquipmentAdapter`` is the one interface the workflow activities call (dispatch, read status,
read result, pause / resume / cancel / abort / clear, capabilities); ``adapters/`` implements
it per protocol (OPC UA job control first) and ``adapters.machines.connect`` picks the
implementation from the work unit's endpoint. The data types mirror OPC 10031-4 (ISA-95 Job
Control) structures closely enough to map 1:1, but are plain dataclasses so Temporal can
serialise them and ``mes`` can use them without a protocol library.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol


class JobState(enum.IntEnum):
    """OPC 10031-4 job order states (the top-level state numbers of the state machine)."""

    NOT_ALLOWED_TO_START = 1
    ALLOWED_TO_START = 2
    RUNNING = 3
    INTERRUPTED = 4
    ENDED = 5
    ABORTED = 6

    @property
    def is_final(self) -> bool:
        return self in (JobState.ENDED, JobState.ABORTED)


class ReturnStatus(enum.IntFlag):
    """OPC 10031-4 ReturnStatus bits returned by every job-control method.

    Annex B.2 (Table 95) numbers bit positions, not values: InvalidRequest is bit 32, so its
    value is 2**32; bits 5-31 are reserved and 33-63 implementation-specific.
    """

    NO_ERROR = 1
    UNKNOWN_JOB_ORDER_ID = 2
    INVALID_JOB_ORDER_STATUS = 8
    UNABLE_TO_ACCEPT_JOB_ORDER = 16
    INVALID_REQUEST = 1 << 32


@dataclass(frozen=True)
class RecipeParameter:
    """One job order parameter (ISA95ParameterDataType): the recipe value sent to the machine."""

    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True)
class MaterialRequirement:
    """One material the job uses or makes (ISA95MaterialDataType).

    ``use`` is the B2MML MaterialUse: "Consumed" or "Produced". For consumed material the
    ``lot_id`` names the lot to take; for produced material it names the lot to make (or is
    empty and the machine chooses).

    ``quantity`` is a float at the port: on the wire it is an OPC UA DecimalString, written
    from the float's shortest repr (``adapters.opcua.model.decimal_string``), and the port's
    types cross Temporal, whose JSON converter has no ``Decimal``. The MES turns it back into
    an exact ``Decimal`` rounded to the stored six places (``mes.quantities.exact``) before
    anything is booked; up to 15 significant digits that is the quantity the MES sent.
    """

    material_definition_id: str
    use: str
    quantity: float
    unit: str
    lot_id: str = ""


@dataclass(frozen=True)
class JobOrderData:
    """What one work unit is told to do (ISA95JobOrderDataType)."""

    job_order_id: str
    work_master_id: str
    description: str = ""
    priority: int = 0
    parameters: list[RecipeParameter] = field(default_factory=list)
    material_requirements: list[MaterialRequirement] = field(default_factory=list)
    equipment_id: str = ""


@dataclass(frozen=True)
class MaterialActualData:
    """One material actual of a job response (ISA95MaterialDataType with use and lot).

    ``quantity`` is the machine's DecimalString read as a float; ``record_job_response``
    books ``mes.quantities.exact(quantity)``: ``0.45`` is ``Decimal("0.45")``, exactly.
    """

    material_definition_id: str
    use: str
    quantity: float
    unit: str
    lot_id: str


@dataclass(frozen=True)
class MeasuredValue:
    """One measured value of a job response (JobResponseData, ISA95ParameterDataType)."""

    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True)
class JobResponseData:
    """What the machine reports for a job (ISA95JobResponseDataType plus PackML counters)."""

    job_order_id: str
    state: JobState
    start_time: datetime | None = None
    end_time: datetime | None = None
    material_actuals: list[MaterialActualData] = field(default_factory=list)
    data: list[MeasuredValue] = field(default_factory=list)
    processed_count: int = 0
    defective_count: int = 0
    packml_state: int = 0


class JobControlError(Exception):
    """A job-control method answered with an error ReturnStatus (or could not be called).

    ``retryable`` tells the caller (a Temporal activity) whether trying again may succeed.
    """

    retryable: bool = False

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class UnknownJobOrderError(JobControlError):
    """The machine does not know this JobOrderID."""


class InvalidJobOrderStatusError(JobControlError):
    """The job is in a state that does not allow the method."""


class UnableToAcceptJobOrderError(JobControlError):
    """The machine cannot take the job now (busy, full list); may succeed later."""

    retryable = True


class InvalidRequestError(JobControlError):
    """The request itself is malformed (bad parameters, unknown work master)."""


class CommandNotSupportedError(InvalidRequestError):
    """The machine has no way to do this (a legacy machine without a pause coil cannot
    pause): the port says what it cannot do instead of pretending."""


class MachineSecurityError(JobControlError):
    """The controller refused the MES's credentials or security settings (an untrusted
    certificate, a wrong user or password, no endpoint with the configured policy), or the
    MES's own certificate, key or password could not be read. A person must fix it."""


class MachineUnreachableError(JobControlError):
    """The controller could not be reached or the session broke; retry later."""

    retryable = True


class JobCapacity(NamedTuple):
    """Room in a machine's JobOrderList: ``(max_job_orders, job_orders)``.

    ``max_job_orders`` is the receiver's MaxDownloadableJobOrders, None when the server does
    not expose it; ``job_orders`` counts every job in JobOrderList, ended and aborted ones
    included (they take room until cleared).
    """

    max_job_orders: int | None
    job_orders: int

    @property
    def free(self) -> int | None:
        """How many more jobs the machine takes now (None: no limit published)."""
        if self.max_job_orders is None:
            return None
        return max(0, self.max_job_orders - self.job_orders)


class EquipmentAdapter(Protocol):
    """A session with one work unit's controller: the machine port.

    Every call raises a ``JobControlError`` subclass on failure; its ``retryable`` says
    whether trying again may help. Storing is idempotent on JobOrderID.
    """

    async def store_and_start(self, order: JobOrderData) -> None:
        """Send a job order and allow it to start (a retry finds it stored)."""
        ...

    async def update(self, order: JobOrderData) -> None:
        """Change a stored job order (e.g. its priority)."""
        ...

    async def start(self, job_order_id: str) -> None: ...

    async def revoke_start(self, job_order_id: str) -> None: ...

    async def pause(self, job_order_id: str) -> None: ...

    async def resume(self, job_order_id: str) -> None: ...

    async def cancel(self, job_order_id: str) -> None:
        """Remove a job that has not started."""
        ...

    async def abort(self, job_order_id: str) -> None:
        """Stop a started job for good."""
        ...

    async def clear(self, job_order_id: str) -> None:
        """Remove an ended or aborted job from the controller."""
        ...

    async def job_state(self, job_order_id: str) -> JobState:
        """The job's state now; UnknownJobOrderError if the controller does not hold it."""
        ...

    async def wait_for_change(
        self,
        job_order_id: str,
        known: JobState,
        on_tick: Callable[[JobState], None] | None = None,
        tick_s: float = 5.0,
        publish_ms: int = 100,
    ) -> JobState:
        """Wait until the job's state differs from ``known``; ``on_tick`` sees the state
        every ``tick_s`` seconds meanwhile (an activity heartbeats there)."""
        ...

    async def job_response(
        self, job_order_id: str, order: JobOrderData | None = None
    ) -> JobResponseData:
        """What the machine reports it made, from what, and how well.

        ``order`` is the job as dispatched: a machine that only counts (Modbus) has the MES
        build the material actuals from its requirements; one that reports them ignores it.
        """
        ...

    async def capacity(self) -> JobCapacity:
        """How many job orders the controller takes and holds now."""
        ...


@dataclass(frozen=True)
class Endpoint:
    """How to reach a work unit's controller: protocol, URL, machine and how to secure it.

    ``security`` and ``settings`` are the protocol's (for OPC UA see
    ``mes.masterdata.schema.OpcUaSettings``); ``settings`` name where secrets are (files,
    environment variables), never a secret, so an endpoint may travel in workflow history.
    """

    protocol: str
    url: str
    machine: str
    security: str = "None"
    settings: dict[str, Any] = field(default_factory=dict)


#: Opens a session with the controller of ``endpoint``.
MachineConnector = Callable[[Endpoint], AbstractAsyncContextManager[EquipmentAdapter]]
