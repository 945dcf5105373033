"""A PLC simulator that speaks OPC 10031-4 (ISA-95 Job Control v2) over OPC UA.

One asyncua server hosts several work units. Each unit is an object ``Objects/<unit>`` with

- ``JobManagement/JobOrderControl``: an ``ISA95JobOrderReceiverObjectType`` whose methods
  (Store, StoreAndStart, Update, Start, RevokeStart, Pause, Resume, Stop, Abort, Cancel,
  Clear) are implemented and whose ``JobOrderList`` shows every job with its state;
- ``JobManagement/JobOrderResults``: an ``ISA95JobResponseProviderObjectType`` answering
  ``RequestJobResponseByJobOrderID`` / ``…ByJobOrderState`` and keeping
  ``JobOrderResponseList`` current;
- ``PackML/Status/StateCurrent``, ``PackML/Status/UnitModeCurrent``,
  ``PackML/Admin/ProdProcessedCount``, ``PackML/Admin/ProdDefectiveCount`` and
  ``PackML/Admin/StopReason`` (set by :meth:`PlcSimulator.fault`).

A unit runs one job at a time: the AllowedToStart job with the highest priority (then the
earliest) starts when the unit is free, runs for ``cycle_time_s`` of Running time and ends
Completed with a job response. Browse names below ``Objects`` are in the simulator's own
namespace (:data:`SIM_NAMESPACE_URI`); everything the nodeset defines keeps its own.

Method results follow OPC 10031-4 Annex B: a call that is carried out answers Good with
ReturnStatus NoError; one that is refused (unknown job, wrong state, no room, invalid
request) answers Uncertain with the ReturnStatus bits in its output (B.2: a Bad StatusCode
would carry no outputs); a call whose arguments do not match the method's InputArguments
answers Bad_ArgumentsMissing, Bad_TooManyArguments or Bad_TypeMismatch (B.1), without
outputs. Each unit's JobOrderList holds at most ``MaxDownloadableJobOrders`` jobs, ended
ones included until they are cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import socket
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from asyncua import ua
from asyncua.common.instantiate_util import instantiate
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from adapters.opcua.model import (
    DEFECTIVE_COUNT,
    JOB_MANAGEMENT,
    JOB_ORDER_CONTROL,
    JOB_ORDER_LIST,
    JOB_ORDER_RESPONSE_LIST,
    JOB_ORDER_RESULTS,
    JOBCONTROL_NS_URI,
    MAX_DOWNLOADABLE_JOB_ORDERS,
    PACKML_EXECUTE,
    PACKML_HELD,
    PACKML_IDLE,
    PACKML_PRODUCE_MODE,
    PROCESSED_COUNT,
    RECEIVER_TYPE_ID,
    RESPONSE_PROVIDER_TYPE_ID,
    STATE_NAMES,
    SUBSTATE_MACHINES,
    SUBSTATE_NUMBERS,
    decimal_string,
    eu_information,
    localized,
    nodeset_path,
    numeric_node_id,
    parse_decimal,
    string_node_id,
    ua_type,
)
from adapters.opcua.security import ServerSecurity, secure_server
from mes.machines import JobState, ReturnStatus

SIM_NAMESPACE_URI = "urn:mes:plc-simulator"

DEFAULT_MEASURED: dict[str, tuple[float, str]] = {
    "Temperature": (65.0, "°C"),
    "Pressure": (2.5, "bar"),
}

_OK = ReturnStatus.NO_ERROR
_UNKNOWN = ReturnStatus.UNKNOWN_JOB_ORDER_ID
_BAD_STATE = ReturnStatus.INVALID_JOB_ORDER_STATUS
_REFUSED = ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER
_INVALID = ReturnStatus.INVALID_REQUEST

_NOT_STARTED = (JobState.NOT_ALLOWED_TO_START, JobState.ALLOWED_TO_START)
_ACTIVE = (JobState.RUNNING, JobState.INTERRUPTED)


@dataclass
class MeasuredFault:
    """How one measured value goes wrong: with ``defect_rate``'s probability a job's value is
    a quarter off its nominal (out of any sensible specification), and it drifts by
    ``drift`` (in the value's unit) for every job the unit measured before."""

    defect_rate: float = 0.0
    drift: float = 0.0


#: Admin.StopReason of a micro-stop (faults use their own reasons).
MICRO_STOP_REASON = 1
PACKML_SUSPENDED = 5


@dataclass
class Stoppages:
    """How a unit stops now and then, drawn per job from the unit's ``seed`` and name (so a
    rerun with the same jobs stops the same way): with ``fault_rate``'s probability a job is
    interrupted by a fault (PackML Held, a StopReason from ``fault_reasons``) for ``fault_s``;
    else with ``micro_stop_rate``'s by a micro-stop (PackML Suspended, StopReason
    ``MICRO_STOP_REASON``) for ``micro_stop_s``. The job's state stays Running meanwhile;
    only its progress waits."""

    micro_stop_rate: float = 0.0
    micro_stop_s: float = 0.5
    fault_rate: float = 0.0
    fault_s: float = 2.0
    fault_reasons: tuple[int, ...] = (101, 102, 103)


@dataclass
class SimUnit:
    """One simulated work unit.

    ``measured`` maps a JobResponseData name to its (nominal value, unit); every job reports
    each one with up to ±2 % noise that depends only on the unit and the JobOrderID, so a
    rerun gives the same numbers. ``defect_rate`` is the share of processed items counted as
    defective; ``max_job_orders`` is the unit's MaxDownloadableJobOrders, the most jobs its
    JobOrderList holds (Store answers UnableToAcceptJobOrder beyond it); None takes the
    simulator's ``max_job_orders``. ``faults`` make measured values go out of specification
    (:class:`MeasuredFault`), drawn from ``seed`` and the unit's name, so a rerun with the
    same jobs in the same order gives the same defects. ``speed`` divides the cycle time (2.0:
    twice as fast); ``stoppages`` make it stop now and then (:class:`Stoppages`).
    """

    name: str
    cycle_time_s: float = 2.0
    speed: float = 1.0
    stoppages: Stoppages = field(default_factory=Stoppages)
    measured: dict[str, tuple[float, str]] = field(default_factory=lambda: dict(DEFAULT_MEASURED))
    defect_rate: float = 0.0
    max_job_orders: int | None = None
    faults: dict[str, MeasuredFault] = field(default_factory=dict)
    seed: int = 0


@dataclass
class _Job:
    order: Any  # ISA95JobOrderDataType, as the client sent it
    arrival: int
    state: JobState
    substate: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    run_s: float = 0.0
    run_since: float | None = None  # loop time the current Running stretch began
    material_actuals: list[Any] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)

    @property
    def job_order_id(self) -> str:
        return str(self.order.JobOrderID)

    @property
    def priority(self) -> int:
        return int(self.order.Priority or 0)

    def elapsed(self, now: float) -> float:
        return self.run_s + (now - self.run_since if self.run_since is not None else 0.0)


@dataclass
class _UnitNodes:
    job_order_list: Node
    response_list: Node
    state_current: Node
    unit_mode: Node
    processed: Node
    defective: Node
    stop_reason: Node


_Handler = Callable[..., Awaitable[ua.CallMethodResult]]

DEFAULT_MAX_JOB_ORDERS = 100
_UINT16_MAX = 65535

# Variant types that stand for a DataType NodeId of namespace 0 (the built-in types).
_BUILTIN_TYPES: dict[int, ua.VariantType] = {t.value: t for t in ua.VariantType if t.value > 0}
_BASE_DATA_TYPE = ObjectIds.BaseDataType


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _method_result(outputs: list[ua.Variant], status: ReturnStatus) -> ua.CallMethodResult:
    """Good with NoError, otherwise Uncertain; the outputs (ReturnStatus last) either way."""
    code = StatusCodes.Good if status & _OK else StatusCodes.Uncertain
    return ua.CallMethodResult(StatusCode=_status(code), OutputArguments=outputs)


def _argument_fits(argument: ua.Argument, given: ua.Variant) -> bool:
    """Whether a Variant matches a method argument's DataType and ValueRank.

    A null Variant stands for an empty array (never for a scalar); structures must be
    the class asyncua registered for the argument's DataType (or a null ExtensionObject).
    """
    # ValueRank -1 is a scalar, 0 and above an array, -2 and -3 either (OPC 10000-3 5.6.2).
    scalar_only, array_only = argument.ValueRank == -1, argument.ValueRank >= 0
    if given.VariantType == ua.VariantType.Null:
        return not scalar_only
    is_list = isinstance(given.Value, list)
    if (scalar_only and is_list) or (array_only and not is_list):
        return False
    data_type = argument.DataType
    if data_type.NamespaceIndex == 0 and data_type.Identifier == _BASE_DATA_TYPE:
        return True
    if data_type.NamespaceIndex == 0 and data_type.Identifier in _BUILTIN_TYPES:
        return given.VariantType == _BUILTIN_TYPES[data_type.Identifier]
    if given.VariantType != ua.VariantType.ExtensionObject:
        return False
    expected = ua.uatypes.extension_objects_by_datatype.get(data_type)
    values = given.Value if isinstance(given.Value, list) else [given.Value]
    return all(v is None or (expected is not None and isinstance(v, expected)) for v in values)


def _checked(arguments: list[ua.Argument], handler: _Handler) -> _Handler:
    """Answer Bad_ArgumentsMissing / Bad_TooManyArguments / Bad_TypeMismatch before ``handler``.

    asyncua's server passes whatever Variants the client sent, so the method's declared
    InputArguments (from the nodeset) are enforced here, as OPC 10000-4 Call requires.
    """

    async def call(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        if len(args) < len(arguments):
            return ua.CallMethodResult(StatusCode=_status(StatusCodes.BadArgumentsMissing))
        if len(args) > len(arguments):
            return ua.CallMethodResult(StatusCode=_status(StatusCodes.BadTooManyArguments))
        fits = [_argument_fits(a, v) for a, v in zip(arguments, args, strict=True)]
        if not all(fits):
            return ua.CallMethodResult(
                StatusCode=_status(StatusCodes.BadTypeMismatch),
                InputArgumentResults=[
                    _status(StatusCodes.Good if ok else StatusCodes.BadTypeMismatch) for ok in fits
                ],
            )
        return await handler(parent, *args)

    return call


class _UnitRuntime:
    """The job list, the machine loop and the method implementations of one unit."""

    def __init__(self, spec: SimUnit, nodes: _UnitNodes, jc_ns: int, max_job_orders: int) -> None:
        self.spec = spec
        self.max_job_orders = max_job_orders
        self.nodes = nodes
        self.jc_ns = jc_ns
        self.jobs: dict[str, _Job] = {}
        self.processed_total = 0
        self.defective_total = 0
        #: PackML Admin.StopReason: why the unit stands (0: it does not), see fault().
        self.stop_reason = 0
        self._arrivals = itertools.count()
        self._measured_jobs = 0
        self._faults = random.Random(f"{spec.seed}|{spec.name}")
        # A stream of its own, so stoppages do not shift the measured values' draws.
        self._stops = random.Random(f"{spec.seed}|{spec.name}|stops")
        #: The PackML state while the unit stands in a stoppage (None: it does not).
        self._standing: int | None = None
        self._changed = asyncio.Event()

    # -- machine behaviour -------------------------------------------------------------

    async def run(self) -> None:
        """Start AllowedToStart jobs one at a time, forever (until cancelled)."""
        while True:
            self._changed.clear()
            job = self._next_job()
            if job is None:
                await self._changed.wait()
                continue
            await self._execute(job)

    def _next_job(self) -> _Job | None:
        waiting = [j for j in self.jobs.values() if j.state is JobState.ALLOWED_TO_START]
        if not waiting or any(j.state in _ACTIVE for j in self.jobs.values()):
            return None
        return min(waiting, key=lambda j: (-j.priority, j.arrival))

    @property
    def run_time_s(self) -> float:
        """The Running time a job takes: the cycle time at the unit's speed."""
        return self.spec.cycle_time_s / self.spec.speed

    def _draw_stop(self) -> tuple[float, float, int, int] | None:
        """This job's stoppage, if any: (after how much run time, for how long, StopReason,
        PackML state). Three draws per job whatever comes out, so the stream stays aligned."""
        plan = self.spec.stoppages
        u, at, pick = self._stops.random(), self._stops.uniform(0.2, 0.8), self._stops.random()
        if u < plan.fault_rate and plan.fault_reasons:
            reason = plan.fault_reasons[int(pick * len(plan.fault_reasons))]
            return at * self.run_time_s, plan.fault_s, reason, PACKML_HELD
        if u < plan.fault_rate + plan.micro_stop_rate:
            return at * self.run_time_s, plan.micro_stop_s, MICRO_STOP_REASON, PACKML_SUSPENDED
        return None

    async def _execute(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.state = JobState.RUNNING
        job.start_time = datetime.now(UTC)
        job.run_since = loop.time()
        stop = self._draw_stop()
        await self.publish()
        # Pause, Resume, Stop and Abort change the job from method calls; they set the event
        # so this loop re-reads the state instead of sleeping through the change.
        while job.state in _ACTIVE and self.jobs.get(job.job_order_id) is job:
            self._changed.clear()
            if job.state is JobState.INTERRUPTED:
                await self._changed.wait()
                continue
            elapsed = job.elapsed(loop.time())
            if stop is not None and elapsed >= stop[0]:
                await self._stand(job, *stop[1:])
                stop = None
                continue
            remaining = (stop[0] if stop is not None else self.run_time_s) - elapsed
            if stop is None and remaining <= 0:
                self._finish(job, JobState.ENDED)
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        await self.publish()

    async def _stand(self, job: _Job, seconds: float, reason: int, packml_state: int) -> None:
        """A stoppage: the running job makes no progress for ``seconds`` (unless a method
        call ends or pauses it first), the unit shows ``packml_state`` and ``reason``."""
        loop = asyncio.get_running_loop()
        job.run_s, job.run_since = job.elapsed(loop.time()), None
        self._standing, self.stop_reason = packml_state, reason
        await self.publish()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while job.state is JobState.RUNNING and self.jobs.get(job.job_order_id) is job:
                    self._changed.clear()
                    await self._changed.wait()
        self._standing, self.stop_reason = None, 0
        if job.state is JobState.RUNNING and job.run_since is None:
            job.run_since = loop.time()
        await self.publish()

    def _finish(self, job: _Job, state: JobState) -> None:
        """End or abort a job and record its actuals, pro rata for the time it ran."""
        now = asyncio.get_running_loop().time()
        job.run_s = job.elapsed(now)
        job.run_since = None
        job.state = state
        job.substate = "Completed" if state is JobState.ENDED else ""
        job.end_time = datetime.now(UTC)
        cycle = self.run_time_s
        progress = 1.0 if cycle <= 0 else min(1.0, job.run_s / cycle)
        if job.start_time is not None:
            self._record_actuals(job, progress)

    def _record_actuals(self, job: _Job, progress: float) -> None:
        material = ua_type("ISA95MaterialDataType")
        parameter = ua_type("ISA95ParameterDataType")
        requirements = list(job.order.MaterialRequirements or [])
        actuals = [
            material(
                MaterialDefinitionID=req.MaterialDefinitionID,
                MaterialLotID=req.MaterialLotID,
                MaterialUse=req.MaterialUse,
                Quantity=decimal_string(_pro_rata(parse_decimal(req.Quantity), progress)),
                EngineeringUnits=req.EngineeringUnits,
            )
            for req in requirements
            if str(req.MaterialUse or "").lower() == "consumed"
        ]
        # Without a Produced requirement the unit makes one item of nothing in particular.
        produced_req = next(
            (r for r in requirements if str(r.MaterialUse or "").lower() == "produced"),
            material(),
        )
        made = _pro_rata(parse_decimal(produced_req.Quantity) or 1.0, progress)
        processed = round(made)
        if job.state is JobState.ENDED:
            actuals.append(
                material(
                    MaterialDefinitionID=produced_req.MaterialDefinitionID,
                    MaterialLotID=produced_req.MaterialLotID or f"{job.job_order_id}-OUT",
                    MaterialUse="Produced",
                    Quantity=decimal_string(made),
                    EngineeringUnits=produced_req.EngineeringUnits,
                )
            )
            defective = round(processed * self.spec.defect_rate)
        else:
            # An aborted job's work in progress is scrap.
            defective = processed
        self.processed_total += processed
        self.defective_total += defective
        rng = random.Random(zlib.crc32(f"{self.spec.name}|{job.job_order_id}".encode()))
        data = [
            parameter(
                ID=name,
                Value=ua.Variant(self._measure(name, nominal, rng), ua.VariantType.Double),
                EngineeringUnits=eu_information(unit),
            )
            for name, (nominal, unit) in self.spec.measured.items()
        ]
        self._measured_jobs += 1
        data.append(
            parameter(ID=PROCESSED_COUNT, Value=ua.Variant(processed, ua.VariantType.Int32))
        )
        data.append(
            parameter(ID=DEFECTIVE_COUNT, Value=ua.Variant(defective, ua.VariantType.Int32))
        )
        job.material_actuals = actuals
        job.data = data

    def _measure(self, name: str, nominal: float, noise: random.Random) -> float:
        """One measured value: the nominal with up to ±2 % noise, plus the value's drift
        and, now and then, a defect (``SimUnit.faults``)."""
        value = nominal * (1 + noise.uniform(-0.02, 0.02))
        fault = self.spec.faults.get(name)
        if fault is not None:
            value += fault.drift * self._measured_jobs
            if self._faults.random() < fault.defect_rate:
                value += abs(nominal) * 0.25 * self._faults.choice((-1, 1))
        return round(value, 3)

    # -- address space -----------------------------------------------------------------

    @property
    def packml_state(self) -> int:
        """PackML StateCurrent: Execute while a job runs, Held while paused or in a fault,
        Suspended in a micro-stop, else Idle."""
        states = {j.state for j in self.jobs.values()}
        if JobState.RUNNING in states and self._standing is not None:
            return self._standing
        if JobState.RUNNING in states:
            return PACKML_EXECUTE
        if JobState.INTERRUPTED in states:
            return PACKML_HELD
        return PACKML_IDLE

    async def publish(self) -> None:
        """Write the job list, the responses and the PackML tags to the address space."""
        jobs = sorted(self.jobs.values(), key=lambda j: j.arrival)
        order_and_state = ua_type("ISA95JobOrderAndStateDataType")
        await self.nodes.job_order_list.write_value(
            ua.Variant(
                [order_and_state(JobOrder=j.order, State=self._states(j)) for j in jobs],
                ua.VariantType.ExtensionObject,
            )
        )
        await self.nodes.response_list.write_value(
            ua.Variant([self._response(j) for j in jobs], ua.VariantType.ExtensionObject)
        )
        await self.nodes.state_current.write_value(
            ua.Variant(self.packml_state, ua.VariantType.Int32)
        )
        await self.nodes.processed.write_value(
            ua.Variant(self.processed_total, ua.VariantType.Int32)
        )
        await self.nodes.defective.write_value(
            ua.Variant(self.defective_total, ua.VariantType.Int32)
        )
        await self.nodes.stop_reason.write_value(ua.Variant(self.stop_reason, ua.VariantType.Int32))

    async def fault(self, reason: int) -> None:
        """A machine fault: the running job is held (PackML Held) with ``reason`` as
        Admin.StopReason until :meth:`clear_fault`."""
        self.stop_reason = reason
        for job in list(self.jobs.values()):
            if job.state is JobState.RUNNING:
                self._pause(job)
        self._changed.set()
        await self.publish()

    async def clear_fault(self) -> None:
        """The fault is fixed: the held job runs on and StopReason is 0 again."""
        self.stop_reason = 0
        for job in list(self.jobs.values()):
            if job.state is JobState.INTERRUPTED:
                self._resume(job)
        self._changed.set()
        await self.publish()

    def _states(self, job: _Job) -> list[Any]:
        state_type = ua_type("ISA95StateDataType")
        # The first entry is the top-level state with a null BrowsePath (OPC 10031-4 7.3.3).
        states = [
            state_type(
                BrowsePath=ua.RelativePath(),
                StateText=localized(STATE_NAMES[job.state]),
                StateNumber=ua.UInt32(job.state.value),
            )
        ]
        machine = SUBSTATE_MACHINES.get(job.state)
        if job.substate and machine:
            # A dict, because asyncua annotates the flags with its Boolean marker class.
            element: dict[str, Any] = {
                "ReferenceTypeId": numeric_node_id(0, ObjectIds.HasComponent),
                "IsInverse": False,
                "IncludeSubtypes": True,
                "TargetName": ua.QualifiedName(machine, self.jc_ns),
            }
            path = ua.RelativePath(Elements=[ua.RelativePathElement(**element)])
            states.append(
                state_type(
                    BrowsePath=path,
                    StateText=localized(job.substate),
                    StateNumber=ua.UInt32(SUBSTATE_NUMBERS[job.substate]),
                )
            )
        return states

    def _response(self, job: _Job) -> Any:
        equipment = ua_type("ISA95EquipmentDataType")
        return ua_type("ISA95JobResponseDataType")(
            JobResponseID=f"{job.job_order_id}-R",
            JobOrderID=job.job_order_id,
            StartTime=job.start_time,
            EndTime=job.end_time,
            JobState=self._states(job),
            JobResponseData=job.data,
            EquipmentActuals=[equipment(ID=self.spec.name, EquipmentUse="Used")]
            if job.start_time is not None
            else [],
            MaterialActuals=job.material_actuals,
        )

    # -- methods -----------------------------------------------------------------------

    def handlers(self) -> dict[str, _Handler]:
        """Method implementations by browse name, ready for ``Server.link_method``."""
        by_order: dict[str, Callable[[Any], ReturnStatus]] = {
            "Store": lambda o: self._store(o, start=False),
            "StoreAndStart": lambda o: self._store(o, start=True),
            "Update": self._update,
        }
        by_id: dict[str, Callable[[_Job], ReturnStatus]] = {
            "Start": self._start,
            "RevokeStart": self._revoke_start,
            "Pause": self._pause,
            "Resume": self._resume,
            "Stop": self._stop,
            "Abort": self._abort,
            "Cancel": self._cancel,
            "Clear": self._clear,
        }
        handlers: dict[str, _Handler] = {n: self._command(f) for n, f in by_order.items()}
        handlers.update({n: self._command(self._with_job(f)) for n, f in by_id.items()})
        return handlers

    def _command(self, apply: Callable[[Any], ReturnStatus]) -> _Handler:
        async def call(_parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            # _checked has matched the arguments to the method's InputArguments already.
            status = apply(args[0].Value)
            self._changed.set()
            await self.publish()
            return _method_result([ua.Variant(int(status), ua.VariantType.UInt64)], status)

        return call

    def _with_job(self, apply: Callable[[_Job], ReturnStatus]) -> Callable[[Any], ReturnStatus]:
        def by_id(job_order_id: Any) -> ReturnStatus:
            if not isinstance(job_order_id, str) or not job_order_id:
                return _INVALID
            job = self.jobs.get(job_order_id)
            return _UNKNOWN if job is None else apply(job)

        return by_id

    def _store(self, order: Any, *, start: bool) -> ReturnStatus:
        job_order_id = getattr(order, "JobOrderID", None)
        if not isinstance(job_order_id, str) or not job_order_id:
            return _INVALID
        # A JobOrderID names one job for its whole life; a second Store of it (a retry, or
        # a clash) must not create a twin, and the spec's bit for "cannot be accepted" is
        # the one that says so.
        if job_order_id in self.jobs or len(self.jobs) >= self.max_job_orders:
            return _REFUSED
        state = JobState.ALLOWED_TO_START if start else JobState.NOT_ALLOWED_TO_START
        self.jobs[job_order_id] = _Job(order=order, arrival=next(self._arrivals), state=state)
        return _OK

    def _update(self, order: Any) -> ReturnStatus:
        job_order_id = getattr(order, "JobOrderID", None)
        if not isinstance(job_order_id, str) or not job_order_id:
            return _INVALID
        job = self.jobs.get(job_order_id)
        if job is None:
            return _UNKNOWN
        if job.state not in _NOT_STARTED:
            return _BAD_STATE
        job.order = order
        return _OK

    @staticmethod
    def _start(job: _Job) -> ReturnStatus:
        if job.state is not JobState.NOT_ALLOWED_TO_START:
            return _BAD_STATE
        job.state = JobState.ALLOWED_TO_START
        return _OK

    @staticmethod
    def _revoke_start(job: _Job) -> ReturnStatus:
        if job.state is not JobState.ALLOWED_TO_START:
            return _BAD_STATE
        job.state = JobState.NOT_ALLOWED_TO_START
        return _OK

    def _pause(self, job: _Job) -> ReturnStatus:
        if job.state is not JobState.RUNNING:
            return _BAD_STATE
        job.run_s = job.elapsed(asyncio.get_running_loop().time())
        job.run_since = None
        job.state = JobState.INTERRUPTED
        # Held matches the PackML Held state the unit shows while paused.
        job.substate = "Held"
        return _OK

    def _resume(self, job: _Job) -> ReturnStatus:
        if job.state is not JobState.INTERRUPTED:
            return _BAD_STATE
        job.run_since = asyncio.get_running_loop().time()
        job.state = JobState.RUNNING
        job.substate = ""
        return _OK

    def _stop(self, job: _Job) -> ReturnStatus:
        if job.state not in _ACTIVE:
            return _BAD_STATE
        self._finish(job, JobState.ENDED)
        return _OK

    def _abort(self, job: _Job) -> ReturnStatus:
        if job.state.is_final:
            return _BAD_STATE
        self._finish(job, JobState.ABORTED)
        return _OK

    def _cancel(self, job: _Job) -> ReturnStatus:
        if job.state not in _NOT_STARTED:
            return _BAD_STATE
        del self.jobs[job.job_order_id]
        return _OK

    def _clear(self, job: _Job) -> ReturnStatus:
        if not job.state.is_final:
            return _BAD_STATE
        del self.jobs[job.job_order_id]
        return _OK

    async def request_by_id(self, _parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        """RequestJobResponseByJobOrderID: the job's response so far, and a ReturnStatus."""
        job_order_id = args[0].Value
        job = self.jobs.get(job_order_id) if job_order_id else None
        if job is None:
            status = _UNKNOWN if job_order_id else _INVALID
            outputs = [
                ua.Variant(None, ua.VariantType.ExtensionObject),
                ua.Variant(int(status), ua.VariantType.UInt64),
            ]
            return _method_result(outputs, status)
        outputs = [
            ua.Variant(self._response(job), ua.VariantType.ExtensionObject),
            ua.Variant(int(_OK), ua.VariantType.UInt64),
        ]
        return _method_result(outputs, _OK)

    async def request_by_state(self, _parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        """RequestJobResponseByJobOrderState: responses of jobs in the given top-level state."""
        wanted = args[0].Value
        first = wanted[0] if isinstance(wanted, list) and wanted else None
        number = getattr(first, "StateNumber", None)
        if number is None:
            outputs = [
                ua.Variant([], ua.VariantType.ExtensionObject),
                ua.Variant(int(_INVALID), ua.VariantType.UInt64),
            ]
            return _method_result(outputs, _INVALID)
        responses = [self._response(j) for j in self.jobs.values() if j.state.value == number]
        outputs = [
            ua.Variant(responses, ua.VariantType.ExtensionObject),
            ua.Variant(int(_OK), ua.VariantType.UInt64),
        ]
        return _method_result(outputs, _OK)


def _pro_rata(quantity: float, progress: float) -> float:
    """The share of ``quantity`` done after ``progress``; whole items stay whole."""
    if progress >= 1.0:
        return quantity
    if float(quantity).is_integer():
        return float(math.floor(quantity * progress))
    return round(quantity * progress, 3)


def _free_port(host: str) -> int:
    # The server needs its real port before it starts, to advertise it in its endpoints.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class PlcSimulator:
    """An OPC UA server simulating work units that take ISA-95 job orders.

    Use ``async with PlcSimulator([SimUnit("Filler1")]) as sim:`` and connect to ``sim.url``;
    each unit's job control is at ``Objects/<unit>/JobManagement/JobOrderControl``.
    With ``security`` it offers only those secured endpoints to trusted clients (and users).
    """

    def __init__(
        self,
        units: Sequence[SimUnit],
        host: str = "127.0.0.1",
        port: int = 0,
        max_job_orders: int = DEFAULT_MAX_JOB_ORDERS,
        security: ServerSecurity | None = None,
    ) -> None:
        names = [u.name for u in units]
        if not names:
            raise ValueError("a simulator needs at least one unit")
        if len(set(names)) != len(names):
            raise ValueError(f"unit names must be unique: {names}")
        for limit in [max_job_orders, *(u.max_job_orders for u in units)]:
            # MaxDownloadableJobOrders is a UInt16; a unit that takes no job is no unit.
            if limit is not None and not 1 <= limit <= _UINT16_MAX:
                raise ValueError(f"max_job_orders must be 1..{_UINT16_MAX}, not {limit}")
        self._specs = list(units)
        self._max_job_orders = max_job_orders
        self._host = host
        self._port = port
        self._security = security
        self._server: Server | None = None
        self._units: list[_UnitRuntime] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        """The endpoint URL, e.g. ``opc.tcp://127.0.0.1:4840/`` (known once started)."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        return f"opc.tcp://{self._host}:{self._port}/"

    @property
    def unit_names(self) -> list[str]:
        """The names of the simulated units, as browse names under ``Objects``."""
        return [u.name for u in self._specs]

    @property
    def sessions(self) -> int:
        """How many client sessions the server holds now (0 when stopped)."""
        if self._server is None:
            return 0
        # asyncua keeps no public count; its registry of client sessions is this dict.
        return len(self._server.iserver._external_sessions)

    async def start(self) -> None:
        """Build the address space and listen; each unit's machine loop starts running."""
        if self._server is not None:
            return
        server = Server()
        await server.init()
        if self._port == 0:
            self._port = _free_port(self._host)
        server.set_endpoint(f"opc.tcp://{self._host}:{self._port}/")
        server.set_server_name("MES PLC simulator (OPC 10031-4)")
        if self._security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await secure_server(server, self._security)
        with nodeset_path() as path:
            await server.import_xml(str(path), auto_load_definitions=False)
        await server.load_data_type_definitions()
        jc_ns = await server.get_namespace_index(JOBCONTROL_NS_URI)
        own_ns = await server.register_namespace(SIM_NAMESPACE_URI)
        self._units = [
            await _build_unit(server, spec, own_ns, jc_ns, self._max_job_orders)
            for spec in self._specs
        ]
        await server.start()
        self._server = server
        self._tasks = [
            asyncio.create_task(unit.run(), name=f"plc-sim:{unit.spec.name}")
            for unit in self._units
        ]

    async def stop(self) -> None:
        """Stop the machine loops and the server."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    def _unit(self, name: str) -> _UnitRuntime:
        for unit in self._units:
            if unit.spec.name == name:
                return unit
        raise KeyError(f"no simulated unit {name!r}")

    async def fault(self, unit: str, reason: int) -> None:
        """Stop ``unit`` with a fault: its running job is held, StopReason is ``reason``."""
        await self._unit(unit).fault(reason)

    async def clear_fault(self, unit: str) -> None:
        """Clear ``unit``'s fault: its held job runs on."""
        await self._unit(unit).clear_fault()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _build_unit(
    server: Server, spec: SimUnit, ns: int, jc_ns: int, default_max_job_orders: int
) -> _UnitRuntime:
    """Create ``Objects/<unit>`` with its job management and PackML nodes, linked to code."""

    async def child_object(parent: Node, path: list[str]) -> Node:
        # String NodeIds spelled like the browse path keep the address space readable.
        node_id = string_node_id(ns, ".".join([spec.name, *path]))
        return await parent.add_object(node_id, ua.QualifiedName(path[-1], ns))

    async def instance(parent: Node, type_id: int, name: str) -> Node:
        # instantiate() gives the children of a string-id instance "<id>.<child>" ids.
        created = await instantiate(
            parent,
            server.get_node(numeric_node_id(jc_ns, type_id)),
            nodeid=string_node_id(ns, f"{spec.name}.{JOB_MANAGEMENT}.{name}"),
            bname=ua.QualifiedName(name, ns),
        )
        node: Node = created[0]
        return node

    async def int32(parent: Node, path: list[str], value: int) -> Node:
        node_id = string_node_id(ns, ".".join([spec.name, "PackML", *path]))
        return await parent.add_variable(
            node_id, ua.QualifiedName(path[-1], ns), ua.Variant(value, ua.VariantType.Int32)
        )

    def in_jc(name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, jc_ns)

    unit = await server.nodes.objects.add_object(
        string_node_id(ns, spec.name), ua.QualifiedName(spec.name, ns)
    )
    job_management = await child_object(unit, [JOB_MANAGEMENT])
    control = await instance(job_management, RECEIVER_TYPE_ID, JOB_ORDER_CONTROL)
    results = await instance(job_management, RESPONSE_PROVIDER_TYPE_ID, JOB_ORDER_RESULTS)
    packml = await child_object(unit, ["PackML"])
    status = await child_object(packml, ["PackML", "Status"])
    admin = await child_object(packml, ["PackML", "Admin"])
    nodes = _UnitNodes(
        job_order_list=await control.get_child(in_jc(JOB_ORDER_LIST)),
        response_list=await results.get_child(in_jc(JOB_ORDER_RESPONSE_LIST)),
        state_current=await int32(status, ["Status", "StateCurrent"], PACKML_IDLE),
        unit_mode=await int32(status, ["Status", "UnitModeCurrent"], PACKML_PRODUCE_MODE),
        processed=await int32(admin, ["Admin", "ProdProcessedCount"], 0),
        defective=await int32(admin, ["Admin", "ProdDefectiveCount"], 0),
        stop_reason=await int32(admin, ["Admin", "StopReason"], 0),
    )
    limit = spec.max_job_orders if spec.max_job_orders is not None else default_max_job_orders
    max_orders = await control.get_child(in_jc(MAX_DOWNLOADABLE_JOB_ORDERS))
    await max_orders.write_value(ua.Variant(limit, ua.VariantType.UInt16))

    async def link(parent: Node, name: str, handler: _Handler) -> None:
        method = await parent.get_child(in_jc(name))
        declared = await method.get_child(ua.QualifiedName("InputArguments", 0))
        arguments: list[ua.Argument] = list(await declared.read_value() or [])
        server.link_method(method, _checked(arguments, handler))

    runtime = _UnitRuntime(spec, nodes, jc_ns, limit)
    for name, handler in runtime.handlers().items():
        await link(control, name, handler)
    await link(results, "RequestJobResponseByJobOrderID", runtime.request_by_id)
    await link(results, "RequestJobResponseByJobOrderState", runtime.request_by_state)
    await runtime.publish()
    return runtime


__all__ = [
    "DEFAULT_MAX_JOB_ORDERS",
    "DEFAULT_MEASURED",
    "SIM_NAMESPACE_URI",
    "PlcSimulator",
    "SimUnit",
    "Stoppages",
]
