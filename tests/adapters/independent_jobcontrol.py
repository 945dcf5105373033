"""A minimal OPC 10031-4 job-control server written for tests, independent of our simulator.

It is built only from the official nodeset and asyncua: nothing from ``adapters.opcua`` is
imported, so a mistake shared by our simulator and our client cannot hide here. The layout
is the one OPC 40001-3 gives a machine, under a plant folder and with numeric NodeIds in
the server's own namespace (our simulator uses string ids and no folder)::

    Objects/<folder>/<machine>/JobManagement/JobOrderControl   ISA95JobOrderReceiverObjectType
    Objects/<folder>/<machine>/JobManagement/JobOrderResults   ISA95JobResponseProviderObjectType

No PackML. Jobs do not run by themselves unless ``run_s`` is given: a test moves them with
:meth:`IndependentJobControlServer.run` and :meth:`IndependentJobControlServer.end`. With
``run_s`` the server starts AllowedToStart jobs one at a time (highest priority first) and
ends each after ``run_s`` seconds with every requirement reported as actual, so end-to-end
tests can run orders against it. ``secure`` sets up the server's security (asyncua's API,
called before the server starts); without it the server is open (security None).

Method results follow OPC 10031-4 Annex B: Good with ReturnStatus 1 (NoError) when done,
Uncertain with the ReturnStatus bits when refused; wrong argument counts or types answer
Bad_ArgumentsMissing / Bad_TooManyArguments / Bad_TypeMismatch without outputs. With
``legacy_status=True`` a refusal answers Good with the error bits instead (what servers
written before the v2 note in B.2 do).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes

NODESET = (
    Path(__file__).resolve().parents[2]
    / "adapters"
    / "opcua"
    / "nodeset"
    / "opc.ua.isa95-jobcontrol.nodeset2.xml"
)
JOBCONTROL_URI = "http://opcfoundation.org/UA/ISA95-JOBCONTROL_V2/"
OWN_URI = "urn:tests:independent-jobcontrol"

# ReturnStatus bit positions of OPC 10031-4 Table 95.
NO_ERROR = 1 << 0
UNKNOWN_JOB_ORDER_ID = 1 << 1
INVALID_JOB_ORDER_STATUS = 1 << 3
UNABLE_TO_ACCEPT_JOB_ORDER = 1 << 4
INVALID_REQUEST = 1 << 32

# Numeric ids in the nodeset's own namespace (opc.ua.isa95-jobcontrol.nodeids.csv).
_RECEIVER_TYPE = 1002
_PROVIDER_TYPE = 1003
_STATE_DATA_TYPE = 3006
_JOB_ORDER_DATA_TYPE = 3008
_MATERIAL_DATA_TYPE = 3010
_JOB_RESPONSE_DATA_TYPE = 3013
_JOB_ORDER_AND_STATE_DATA_TYPE = 3015

STATES = ("NotAllowedToStart", "AllowedToStart", "Running", "Interrupted", "Ended", "Aborted")


def _code(value: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(value))


@dataclass
class Job:
    """One job order as the server holds it."""

    order: Any  # the ISA95JobOrderDataType the client sent
    state: str
    arrival: int
    start_time: datetime | None = None
    end_time: datetime | None = None
    actuals: list[Any] = field(default_factory=list)


class IndependentJobControlServer:
    """One machine's job control on its own asyncua server (``async with`` starts it)."""

    def __init__(
        self,
        folder: str = "Plant",
        machine: str = "Filler",
        max_job_orders: int = 1,
        run_s: float | None = None,
        legacy_status: bool = False,
        secure: Callable[[Server], Awaitable[None]] | None = None,
    ) -> None:
        self.folder = folder
        self.machine_name = machine
        self.max_job_orders = max_job_orders
        self.run_s = run_s
        self.legacy_status = legacy_status
        self.secure = secure
        self.jobs: dict[str, Job] = {}
        self.calls: list[tuple[str, int]] = []  # (method, StatusCode value) as answered
        self._server: Server | None = None
        self._port = 0
        self._jc = 0
        self._numbers: dict[str, int] = {}
        self._arrivals = 0
        self._job_order_list: Node | None = None
        self._response_list: Node | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self._port}/"

    @property
    def machine(self) -> str:
        """The machine's browse path below Objects, as JobControlClient takes it."""
        return f"{self.folder}/{self.machine_name}"

    # -- test controls -----------------------------------------------------------------

    async def run(self, job_order_id: str) -> None:
        """Start a job (AllowedToStart → Running), as the machine would."""
        job = self.jobs[job_order_id]
        job.state = "Running"
        job.start_time = datetime.now(UTC)
        await self._publish()

    async def end(self, job_order_id: str, state: str = "Ended") -> None:
        """Finish a job (Ended or Aborted); an Ended job reports every requirement as done."""
        job = self.jobs[job_order_id]
        if job.start_time is None:
            job.start_time = datetime.now(UTC)
        job.state = state
        job.end_time = datetime.now(UTC)
        if state == "Ended":
            material = self._struct(_MATERIAL_DATA_TYPE)
            job.actuals = [
                material(
                    MaterialDefinitionID=m.MaterialDefinitionID,
                    MaterialLotID=m.MaterialLotID or f"{job_order_id}-LOT",
                    MaterialUse=m.MaterialUse,
                    Quantity=m.Quantity,
                    EngineeringUnits=m.EngineeringUnits,
                )
                for m in job.order.MaterialRequirements or []
            ]
        await self._publish()
        self._wake.set()

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        server = Server()
        await server.init()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self._port = probe.getsockname()[1]
        server.set_endpoint(self.url)
        server.set_server_name("independent OPC 10031-4 test server")
        if self.secure is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await self.secure(server)
        await server.import_xml(str(NODESET))
        await server.load_data_type_definitions()
        self._jc = await server.get_namespace_index(JOBCONTROL_URI)
        own = await server.register_namespace(OWN_URI)

        receiver_type = server.get_node(ua.NodeId(ua.Int32(_RECEIVER_TYPE), ua.Int16(self._jc)))
        for name in STATES:
            number = await receiver_type.get_child([f"{self._jc}:{name}", "0:StateNumber"])
            self._numbers[name] = int(await number.read_value())

        folder = await server.nodes.objects.add_folder(own, self.folder)
        machine = await folder.add_object(own, self.machine_name)
        management = await machine.add_folder(own, "JobManagement")
        control = await management.add_object(
            own,
            "JobOrderControl",
            objecttype=ua.NodeId(ua.Int32(_RECEIVER_TYPE), ua.Int16(self._jc)),
        )
        results = await management.add_object(
            own,
            "JobOrderResults",
            objecttype=ua.NodeId(ua.Int32(_PROVIDER_TYPE), ua.Int16(self._jc)),
        )
        limit = await control.get_child(f"{self._jc}:MaxDownloadableJobOrders")
        await limit.write_value(ua.Variant(self.max_job_orders, ua.VariantType.UInt16))
        self._job_order_list = await control.get_child(f"{self._jc}:JobOrderList")
        self._response_list = await results.get_child(f"{self._jc}:JobOrderResponseList")

        for name in (
            "Store",
            "StoreAndStart",
            "Update",
            "Start",
            "RevokeStart",
            "Pause",
            "Resume",
            "Stop",
            "Abort",
            "Cancel",
            "Clear",
        ):
            server.link_method(await control.get_child(f"{self._jc}:{name}"), self._method(name))
        for name in ("RequestJobResponseByJobOrderID", "RequestJobResponseByJobOrderState"):
            server.link_method(await results.get_child(f"{self._jc}:{name}"), self._method(name))

        await self._publish()
        await server.start()
        self._server = server
        if self.run_s is not None:
            self._runner = asyncio.create_task(self._run_jobs(self.run_s))

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

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

    # -- methods -------------------------------------------------------------------------

    def _method(self, name: str) -> Any:
        async def call(_parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            result = await self._answer(name, list(args))
            self.calls.append((name, result.StatusCode.value))
            return result

        return call

    async def _answer(self, name: str, args: list[ua.Variant]) -> ua.CallMethodResult:
        expected = 1 if name.startswith("RequestJobResponse") else 2
        if len(args) < expected:
            return ua.CallMethodResult(StatusCode=_code(StatusCodes.BadArgumentsMissing))
        if len(args) > expected:
            return ua.CallMethodResult(StatusCode=_code(StatusCodes.BadTooManyArguments))
        first = args[0]
        if name in ("Store", "StoreAndStart", "Update"):
            fits = isinstance(first.Value, self._struct(_JOB_ORDER_DATA_TYPE))
        elif name == "RequestJobResponseByJobOrderState":
            fits = isinstance(first.Value, list)
        else:
            fits = first.VariantType == ua.VariantType.String
        if expected == 2 and args[1].VariantType not in (
            ua.VariantType.LocalizedText,
            ua.VariantType.Null,
        ):
            fits = False
        if not fits:
            return ua.CallMethodResult(StatusCode=_code(StatusCodes.BadTypeMismatch))

        if name == "RequestJobResponseByJobOrderID":
            job = self.jobs.get(first.Value or "")
            response = self._response(first.Value, job) if job is not None else None
            status = NO_ERROR if job is not None else UNKNOWN_JOB_ORDER_ID
            return self._result(status, ua.Variant(response, ua.VariantType.ExtensionObject))
        if name == "RequestJobResponseByJobOrderState":
            numbers = {int(s.StateNumber) for s in first.Value or []}
            responses = [
                self._response(i, j)
                for i, j in self.jobs.items()
                if self._numbers[j.state] in numbers
            ]
            return self._result(NO_ERROR, ua.Variant(responses, ua.VariantType.ExtensionObject))
        if name in ("Store", "StoreAndStart", "Update"):
            status = self._store_or_update(name, first.Value)
        else:
            status = self._command(name, str(first.Value or ""))
        await self._publish()
        self._wake.set()
        return self._result(status)

    def _store_or_update(self, name: str, order: Any) -> int:
        job_order_id = str(order.JobOrderID or "")
        if not job_order_id:
            return INVALID_REQUEST
        job = self.jobs.get(job_order_id)
        if name == "Update":
            if job is None:
                return UNKNOWN_JOB_ORDER_ID
            if job.state not in ("NotAllowedToStart", "AllowedToStart"):
                return INVALID_JOB_ORDER_STATUS
            job.order = order
            return NO_ERROR
        if job is not None or len(self.jobs) >= self.max_job_orders:
            return UNABLE_TO_ACCEPT_JOB_ORDER
        state = "AllowedToStart" if name == "StoreAndStart" else "NotAllowedToStart"
        self._arrivals += 1
        self.jobs[job_order_id] = Job(order=order, state=state, arrival=self._arrivals)
        return NO_ERROR

    def _command(self, name: str, job_order_id: str) -> int:
        if not job_order_id:
            return INVALID_REQUEST
        job = self.jobs.get(job_order_id)
        if job is None:
            return UNKNOWN_JOB_ORDER_ID
        # (states the command is allowed in, state it leads to; None removes the job)
        transitions: dict[str, tuple[tuple[str, ...], str | None]] = {
            "Start": (("NotAllowedToStart",), "AllowedToStart"),
            "RevokeStart": (("AllowedToStart",), "NotAllowedToStart"),
            "Pause": (("Running",), "Interrupted"),
            "Resume": (("Interrupted",), "Running"),
            "Stop": (("Running", "Interrupted"), "Ended"),
            "Abort": (("NotAllowedToStart", "AllowedToStart", "Running", "Interrupted"), "Aborted"),
            "Cancel": (("NotAllowedToStart", "AllowedToStart"), None),
            "Clear": (("Ended", "Aborted"), None),
        }
        allowed, target = transitions[name]
        if job.state not in allowed:
            return INVALID_JOB_ORDER_STATUS
        if target is None:
            del self.jobs[job_order_id]
        else:
            job.state = target
            if target in ("Ended", "Aborted"):
                job.end_time = datetime.now(UTC)
        return NO_ERROR

    def _result(self, status: int, *outputs: ua.Variant) -> ua.CallMethodResult:
        ok = bool(status & NO_ERROR) or self.legacy_status
        return ua.CallMethodResult(
            StatusCode=_code(StatusCodes.Good if ok else StatusCodes.Uncertain),
            OutputArguments=[*outputs, ua.Variant(status, ua.VariantType.UInt64)],
        )

    # -- address space -------------------------------------------------------------------

    def _struct(self, data_type: int) -> Any:
        """The class asyncua generated for one of the nodeset's structures, by DataType id."""
        return ua.uatypes.extension_objects_by_datatype[
            ua.NodeId(ua.Int32(data_type), ua.Int16(self._jc))
        ]

    def _state(self, job: Job) -> list[Any]:
        state = self._struct(_STATE_DATA_TYPE)
        return [
            state(
                BrowsePath=ua.RelativePath(),
                StateText=ua.LocalizedText(job.state, "en"),
                StateNumber=ua.UInt32(self._numbers[job.state]),
            )
        ]

    def _response(self, job_order_id: str, job: Job) -> Any:
        return self._struct(_JOB_RESPONSE_DATA_TYPE)(
            JobResponseID=f"{job_order_id}-RESPONSE",
            JobOrderID=job_order_id,
            StartTime=job.start_time,
            EndTime=job.end_time,
            JobState=self._state(job),
            MaterialActuals=job.actuals,
        )

    async def _publish(self) -> None:
        assert self._job_order_list is not None
        assert self._response_list is not None
        entry = self._struct(_JOB_ORDER_AND_STATE_DATA_TYPE)
        jobs = sorted(self.jobs.items(), key=lambda item: item[1].arrival)
        await self._job_order_list.write_value(
            ua.Variant(
                [entry(JobOrder=j.order, State=self._state(j)) for _, j in jobs],
                ua.VariantType.ExtensionObject,
            )
        )
        await self._response_list.write_value(
            ua.Variant([self._response(i, j) for i, j in jobs], ua.VariantType.ExtensionObject)
        )

    async def _run_jobs(self, run_s: float) -> None:
        """Run AllowedToStart jobs one at a time, each for ``run_s`` seconds."""
        while True:
            self._wake.clear()
            busy = any(j.state in ("Running", "Interrupted") for j in self.jobs.values())
            waiting = [(i, j) for i, j in self.jobs.items() if j.state == "AllowedToStart"]
            if busy or not waiting:
                await self._wake.wait()
                continue
            job_order_id, job = min(
                waiting, key=lambda item: (-int(item[1].order.Priority or 0), item[1].arrival)
            )
            await self.run(job_order_id)
            await asyncio.sleep(run_s)
            # A paused job ends once resumed (pausing does not stop this simple clock).
            while self.jobs.get(job_order_id) is job and job.state == "Interrupted":
                self._wake.clear()
                await self._wake.wait()
            if self.jobs.get(job_order_id) is job and job.state == "Running":
                await self.end(job_order_id)
