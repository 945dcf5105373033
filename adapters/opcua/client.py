"""Job control of one machine over OPC UA (OPC 10031-4, ISA-95 Job Control v2).

A machine is addressed by the server URL and the browse name of its object under
``Objects`` (``"Line1/Filler1"`` for a nested one). Below it the client expects the
OPC 40001-3 layout ``JobManagement/JobOrderControl`` and ``JobManagement/JobOrderResults``,
matched by name in whatever namespace the vendor put them; the methods and variables inside
are matched in the job-control namespace, found by its URI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from adapters.opcua.model import (
    DEFECTIVE_COUNT,
    JOB_MANAGEMENT,
    JOB_ORDER_CONTROL,
    JOB_ORDER_LIST,
    JOB_ORDER_RESULTS,
    JOBCONTROL_NS_URI,
    MAX_DOWNLOADABLE_JOB_ORDERS,
    PROCESSED_COUNT,
    decimal_string,
    empty_comment,
    eu_information,
    eu_text,
    localized,
    parse_decimal,
    ua_type,
)
from adapters.opcua.security import pinned_certificate_differs, refusal, secure_client
from mes.machines import (
    InvalidJobOrderStatusError,
    InvalidRequestError,
    JobCapacity,
    JobControlError,
    JobOrderData,
    JobResponseData,
    JobState,
    MachineSecurityError,
    MachineUnreachableError,
    MaterialActualData,
    MeasuredValue,
    ReturnStatus,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)
from mes.metrics import PLC_CALL_SECONDS, PLC_CALLS, PLC_ERRORS

# Errors are tested in this order when a ReturnStatus carries several bits.
_STATUS_ERRORS: tuple[tuple[ReturnStatus, type[JobControlError]], ...] = (
    (ReturnStatus.UNKNOWN_JOB_ORDER_ID, UnknownJobOrderError),
    (ReturnStatus.INVALID_JOB_ORDER_STATUS, InvalidJobOrderStatusError),
    (ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER, UnableToAcceptJobOrderError),
    (ReturnStatus.INVALID_REQUEST, InvalidRequestError),
)

# Service results that mean the link or the server is gone rather than the request is wrong.
_UNREACHABLE_CODES = frozenset(
    {
        StatusCodes.BadTimeout,
        StatusCodes.BadRequestTimeout,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadConnectionClosed,
        StatusCodes.BadConnectionRejected,
        StatusCodes.BadDisconnect,
        StatusCodes.BadNotConnected,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadSecureChannelClosed,
        StatusCodes.BadSecureChannelIdInvalid,
        StatusCodes.BadSessionClosed,
        StatusCodes.BadSessionIdInvalid,
        StatusCodes.BadServerHalted,
        StatusCodes.BadShutdown,
        StatusCodes.BadTooManySessions,
        StatusCodes.BadResourceUnavailable,
    }
)

_INT16_MIN, _INT16_MAX = -32768, 32767

# The severity and sub-code of a StatusCode; the low 16 bits are info bits (OPC 10000-4 7.39).
_STATUS_CODE_MASK = 0xFFFF0000


def _status_name(code: ua.StatusCode) -> str:
    """The StatusCode's symbolic name, e.g. ``BadTypeMismatch`` (info bits ignored)."""
    return ua.StatusCode(ua.UInt32(code.value & _STATUS_CODE_MASK)).name


# Without subscriptions wait_for_change re-reads the job list at most this often.
_FALLBACK_POLL_S = 0.5

logger = logging.getLogger(__name__)


def raise_for_status(status: int, what: str = "job control call") -> None:
    """Raise the typed error for an OPC 10031-4 ReturnStatus; return if bit 0 (NoError) is set."""
    if status & ReturnStatus.NO_ERROR:
        return
    for bit, error in _STATUS_ERRORS:
        if status & bit:
            raise error(f"{what}: {bit.name} (ReturnStatus {status:#x})", status)
    raise JobControlError(f"{what}: unrecognised ReturnStatus {status:#x}", status)


class _TypesLoaded:
    """The namespace array of the server whose structure types asyncua last generated.

    asyncua registers generated structure classes process-wide, keyed by type ids that carry
    the server's namespace indexes. Generating them costs ~0.1 s of CPU per connection (most
    of a connection's cost), so a connection to a server with the same namespace array as the
    last one reuses them; any other server regenerates them.
    """

    namespaces: tuple[str, ...] | None = None


async def _load_types(client: Client) -> None:
    namespaces = tuple(await client.get_namespace_array())
    if _TypesLoaded.namespaces != namespaces:
        await client.load_data_type_definitions()
        _TypesLoaded.namespaces = namespaces


class JobControlClient:
    """OPC UA client for one machine's ISA-95 job control (``async with`` connects).

    ``security`` and ``settings`` are the endpoint's (``adapters.opcua.security``): a
    secured session signs (and encrypts) with the MES's certificate and logs in with the
    user's password; a server refusing them raises MachineSecurityError, which says why.
    """

    def __init__(
        self,
        url: str,
        machine: str,
        timeout_s: float = 10,
        *,
        security: str = "None",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.machine = machine
        self.timeout_s = timeout_s
        self.security = security
        self.settings = dict(settings or {})
        self._client: Client | None = None
        self._jc_ns = 0
        self._control: Node | None = None
        self._results: Node | None = None
        self._job_order_list: Node | None = None
        self._max_job_orders: Node | None = None
        self._packml_state: Node | None = None
        self._methods: dict[tuple[str, str], ua.NodeId] = {}
        self._owns_session = True
        self._shared_list: _SharedJobList | None = None

    async def __aenter__(self) -> Self:
        client = await self.open_session()
        self._client = client
        try:
            await self._browse()
        except BaseException:
            await self._disconnect()
            raise
        return self

    async def open_session(self, watchdog_s: float = 1.0) -> Client:
        """A new connected, secured session with the server (not bound to this client).

        ``watchdog_s``: how often asyncua probes the server, and how long the probe may
        take before it declares the link lost; a session shared by many requests wants
        more than the default second, or a busy moment passes for a lost link.
        """
        client = Client(self.url, timeout=self.timeout_s, watchdog_intervall=watchdog_s)
        try:
            with self._guard("connect"):
                await secure_client(client, self.security, self.settings)
                async with asyncio.timeout(self.timeout_s):
                    await client.connect()
        except BaseException as exc:
            # A connect cut short by the timeout leaves the socket to us.
            client.disconnect_socket()
            if isinstance(exc, MachineUnreachableError) and self.security != "None":
                await self._explain_silence(exc)
            raise
        return client

    async def attach(self, client: Client) -> None:
        """Use a session that someone else opened and closes (``adapters.opcua.pool``).

        The machine's nodes are found once; waiting jobs then share one subscription to
        its JobOrderList (``wait_for_change``) instead of one each.
        """
        self._client = client
        self._owns_session = False
        self._shared_list = _SharedJobList()
        try:
            await self._browse()
        except BaseException:
            self._client = None
            raise

    async def _browse(self) -> None:
        with self._guard("browse"):
            async with asyncio.timeout(self.timeout_s):
                await self._discover(self._require())

    async def _explain_silence(self, exc: MachineUnreachableError) -> None:
        """A secured connect that got no answer: a server that is not the expected one."""
        if await pinned_certificate_differs(self.url, self.settings, self.timeout_s):
            raise MachineSecurityError(
                f"{self.url} connect: the server's certificate is not the server_certificate "
                "of the endpoint (it could not read the MES's request)"
            ) from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_session:
            await self._disconnect()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # A dead link must not turn the caller's real error into a disconnect error.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout_s):
                await client.disconnect()

    async def _discover(self, client: Client) -> None:
        await _load_types(client)
        try:
            self._jc_ns = await client.get_namespace_index(JOBCONTROL_NS_URI)
        except ValueError:
            raise JobControlError(
                f"{self.url} does not implement OPC 10031-4 (no namespace {JOBCONTROL_NS_URI})"
            ) from None
        node, where = client.nodes.objects, "Objects"
        for name in self.machine.split("/"):
            node, where = await self._child(node, name, where), f"{where}/{name}"
        job_management = await self._child(node, JOB_MANAGEMENT, self.machine)
        self._control = await self._child(job_management, JOB_ORDER_CONTROL, self.machine)
        self._results = await self._child(job_management, JOB_ORDER_RESULTS, self.machine)
        self._job_order_list = await self._control.get_child(
            ua.QualifiedName(JOB_ORDER_LIST, self._jc_ns)
        )
        # Mandatory in ISA95JobOrderReceiverObjectType, but a capacity check must not stop a
        # machine that leaves it out from taking jobs.
        with contextlib.suppress(UaStatusCodeError):
            self._max_job_orders = await self._control.get_child(
                ua.QualifiedName(MAX_DOWNLOADABLE_JOB_ORDERS, self._jc_ns)
            )
        # PackML tags are optional: not every job-control machine is a PackML machine.
        with contextlib.suppress(JobControlError):
            packml = await self._child(node, "PackML", self.machine)
            status = await self._child(packml, "Status", self.machine)
            self._packml_state = await self._child(status, "StateCurrent", self.machine)

    async def _child(self, node: Node, name: str, where: str) -> Node:
        """The child with this browse name, in any namespace."""
        for desc in await node.get_children_descriptions():
            if desc.BrowseName.Name == name:
                return self._require().get_node(desc.NodeId)
        raise JobControlError(f"{self.url}: no {name!r} under {where}")

    def _require(self) -> Client:
        if self._client is None:
            raise RuntimeError("JobControlClient is not connected; use 'async with'")
        return self._client

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Map transport failures to MachineUnreachableError, security refusals to
        MachineSecurityError, other UA faults to JobControlError."""
        try:
            yield
        except JobControlError:
            raise
        except (OSError, TimeoutError) as exc:
            raise MachineUnreachableError(f"{self.url} {what}: {exc!r}") from exc
        except UaError as exc:
            reason = refusal(exc, self.security)
            if reason is not None:
                raise MachineSecurityError(f"{self.url} {what}: {reason} ({exc})") from exc
            if isinstance(exc, UaStatusCodeError) and exc.code in _UNREACHABLE_CODES:
                raise MachineUnreachableError(f"{self.url} {what}: {exc}") from exc
            raise JobControlError(f"{self.url} {what}: {exc}") from exc

    async def _call(self, obj: Node, method: str, *args: Any) -> list[Any]:
        """Call a job-control method and return its output values.

        asyncua's ``call_method`` raises on any status but Good; OPC 10031-4 B.2 has a
        server answer Uncertain together with a ReturnStatus when a call is not carried out
        (older servers answer Good with the error bits), so the call is made here and both
        return the outputs. A Bad result of the call itself (Bad_ArgumentsMissing,
        Bad_TypeMismatch, Bad_MethodInvalid …, Annex B.1) carries no outputs: it is an
        InvalidRequestError naming the code, unless the code says the link is down.
        """
        client = self._require()
        PLC_CALLS.labels(method).inc()
        with (
            PLC_CALL_SECONDS.labels(method).time(),
            PLC_ERRORS.labels(method).count_exceptions(),
            self._guard(method),
        ):
            key = (str(obj.nodeid), method)
            if key not in self._methods:
                child = await obj.get_child(ua.QualifiedName(method, self._jc_ns))
                self._methods[key] = child.nodeid
            request = ua.CallMethodRequest()
            request.ObjectId = obj.nodeid
            request.MethodId = self._methods[key]
            request.InputArguments = [
                a if isinstance(a, ua.Variant) else ua.Variant(a) for a in args
            ]
            result = (await client.uaclient.call([request]))[0]
            if result.StatusCode.is_bad():
                raise self._bad_result(method, result)
            return [v.Value for v in result.OutputArguments or []]

    def _bad_result(self, method: str, result: ua.CallMethodResult) -> JobControlError:
        """The error for a method call the server answered Bad (no outputs, no ReturnStatus)."""
        code = result.StatusCode
        name = _status_name(code)
        if code.value & _STATUS_CODE_MASK in _UNREACHABLE_CODES:
            error: JobControlError = MachineUnreachableError(f"{self.url} {method}: {name}")
        else:
            wrong = [
                f"argument {i + 1}: {_status_name(r)}"
                for i, r in enumerate(result.InputArgumentResults or [])
                if r.is_bad()
            ]
            detail = f" ({', '.join(wrong)})" if wrong else ""
            error = InvalidRequestError(
                f"{self.url} {method}: {name}{detail}", int(ReturnStatus.INVALID_REQUEST)
            )
        return error

    async def _call_for_status(self, obj: Node, method: str, *args: Any) -> tuple[int, list[Any]]:
        """Call a method whose last output is the ReturnStatus; return it and the others."""
        outputs = await self._call(obj, method, *args)
        if not outputs or not isinstance(outputs[-1], int):
            raise JobControlError(f"{self.url} {method}: no ReturnStatus in {outputs!r}")
        return int(outputs[-1]), outputs[:-1]

    async def _command(self, method: str, job_order_id: str) -> None:
        status, _ = await self._call_for_status(
            self._controller(), method, job_order_id, empty_comment()
        )
        raise_for_status(status, f"{method}({job_order_id})")

    def _controller(self) -> Node:
        if self._control is None:
            self._require()
            raise RuntimeError("JobControlClient did not find JobOrderControl")
        return self._control

    # -- job orders --------------------------------------------------------------------

    async def store(self, order: JobOrderData) -> None:
        """Store a job order without allowing it to start (NotAllowedToStart).

        Idempotent on JobOrderID: if the machine already has the job, nothing is sent.
        """
        await self._store(order, start=False)

    async def store_and_start(self, order: JobOrderData) -> None:
        """Store a job order and allow it to start (AllowedToStart).

        Idempotent on JobOrderID, so a retry after a lost reply is safe: if the machine
        already has the job, no second one is created (a job still NotAllowedToStart is
        started instead).
        """
        await self._store(order, start=True)

    async def _store(self, order: JobOrderData, *, start: bool) -> None:
        job_order_id = order.job_order_id
        existing = await self._find_state(job_order_id)
        if existing is None:
            method = "StoreAndStart" if start else "Store"
            encoded = _encode_order(order)
            status, _ = await self._call_for_status(
                self._controller(), method, encoded, empty_comment()
            )
            if status & ReturnStatus.NO_ERROR:
                return
            # A refusal may hide a job that got in after all (a concurrent retry, or a
            # reply lost after our read); only a job that is really absent is an error.
            existing = await self._find_state(job_order_id)
            if existing is None:
                raise_for_status(status, f"{method}({job_order_id})")
                return
        if start and existing is JobState.NOT_ALLOWED_TO_START:
            await self._command("Start", job_order_id)

    async def update(self, order: JobOrderData) -> None:
        """Replace a job order that has not started yet."""
        status, _ = await self._call_for_status(
            self._controller(), "Update", _encode_order(order), empty_comment()
        )
        raise_for_status(status, f"Update({order.job_order_id})")

    async def start(self, job_order_id: str) -> None:
        """Allow a stored job to start (NotAllowedToStart → AllowedToStart)."""
        await self._command("Start", job_order_id)

    async def revoke_start(self, job_order_id: str) -> None:
        """Take back the permission to start (AllowedToStart → NotAllowedToStart)."""
        await self._command("RevokeStart", job_order_id)

    async def pause(self, job_order_id: str) -> None:
        """Pause a running job (Running → Interrupted)."""
        await self._command("Pause", job_order_id)

    async def resume(self, job_order_id: str) -> None:
        """Resume a paused job (Interrupted → Running)."""
        await self._command("Resume", job_order_id)

    async def stop(self, job_order_id: str) -> None:
        """End a running or paused job early (→ Ended, with what was made so far)."""
        await self._command("Stop", job_order_id)

    async def abort(self, job_order_id: str) -> None:
        """Abort a job that has not ended (→ Aborted)."""
        await self._command("Abort", job_order_id)

    async def cancel(self, job_order_id: str) -> None:
        """Remove a job that has not started."""
        await self._command("Cancel", job_order_id)

    async def clear(self, job_order_id: str) -> None:
        """Remove an ended or aborted job from the machine's list."""
        await self._command("Clear", job_order_id)

    async def capacity(self) -> JobCapacity:
        """MaxDownloadableJobOrders and how many jobs JobOrderList holds now.

        A dispatcher waits for ``free`` > 0 (clearing ended jobs makes room) instead of
        having a Store refused with UnableToAcceptJobOrder.
        """
        jobs = await self.list_jobs()
        limit: int | None = None
        if self._max_job_orders is not None:
            with self._guard("read MaxDownloadableJobOrders"):
                value = await self._max_job_orders.read_value()
            limit = int(value) if isinstance(value, int) else None
        return JobCapacity(limit, len(jobs))

    # -- state and results -------------------------------------------------------------

    async def list_jobs(self) -> list[tuple[str, JobState]]:
        """Every job the machine holds (JobOrderList), with its top-level state."""
        node = self._job_list_node()
        with self._guard("read JobOrderList"):
            entries = await node.read_value()
        return _decode_job_list(entries)

    def _job_list_node(self) -> Node:
        if self._job_order_list is None:
            self._require()
            raise RuntimeError("JobControlClient did not find JobOrderList")
        return self._job_order_list

    async def job_state(self, job_order_id: str) -> JobState:
        """The job's top-level state; UnknownJobOrderError if the machine does not have it."""
        state = await self._find_state(job_order_id)
        if state is None:
            raise self._unknown_job(job_order_id)
        return state

    def _unknown_job(self, job_order_id: str) -> UnknownJobOrderError:
        return UnknownJobOrderError(
            f"{self.machine} has no job {job_order_id!r}", ReturnStatus.UNKNOWN_JOB_ORDER_ID
        )

    async def _find_state(self, job_order_id: str) -> JobState | None:
        return dict(await self.list_jobs()).get(job_order_id)

    async def job_response(
        self, job_order_id: str, order: JobOrderData | None = None
    ) -> JobResponseData:
        """The machine's job response (RequestJobResponseByJobOrderID), as plain data; the
        machine reports its material actuals itself, so ``order`` is not needed."""
        if self._results is None:
            self._require()
            raise RuntimeError("JobControlClient did not find JobOrderResults")
        status, outputs = await self._call_for_status(
            self._results, "RequestJobResponseByJobOrderID", job_order_id
        )
        raise_for_status(status, f"RequestJobResponseByJobOrderID({job_order_id})")
        packml_state = 0
        if self._packml_state is not None:
            with self._guard("read PackML StateCurrent"):
                packml_state = int(await self._packml_state.read_value())
        return _decode_response(outputs[0] if outputs else None, packml_state)

    async def wait_until_final(
        self,
        job_order_id: str,
        poll_s: float = 0.5,
        on_poll: Callable[[JobState], None] | None = None,
    ) -> JobState:
        """Poll the job's state until it is Ended or Aborted and return that state.

        ``on_poll`` sees every state read (a Temporal activity heartbeats there).
        """
        while True:
            state = await self.job_state(job_order_id)
            if on_poll is not None:
                on_poll(state)
            if state.is_final:
                return state
            await asyncio.sleep(poll_s)

    async def wait_for_change(
        self,
        job_order_id: str,
        known: JobState,
        on_tick: Callable[[JobState], None] | None = None,
        tick_s: float = 5.0,
        publish_ms: int = 100,
    ) -> JobState:
        """Wait until the job's top-level state differs from ``known`` and return it.

        The machine pushes changes: a data-change subscription on the receiver's
        JobOrderList (publishing interval ``publish_ms``) wakes the wait, so a waiting job
        costs no reads. The state is read once first (a state that already differs returns
        at once) and again every ``tick_s`` seconds, as a safety net against a lost
        notification; ``on_tick`` sees that state (a Temporal activity heartbeats there).
        UnknownJobOrderError when the job leaves the list (cancelled, cleared),
        MachineUnreachableError when the link breaks. A server that refuses subscriptions
        is polled every ``min(tick_s, 0.5)`` seconds instead. The subscription is deleted
        on every way out, cancellation included. A client ``attach``ed to a pooled session
        shares one subscription among all its waits instead (``_wait_shared``).
        """
        if self._shared_list is not None:
            return await self._wait_shared(
                self._shared_list, job_order_id, known, on_tick, tick_s, publish_ms
            )
        state = await self.job_state(job_order_id)
        if state != known:
            return state
        watch = _JobListWatch()
        subscription = await self._subscribe_job_list(watch, publish_ms, tick_s)
        try:
            return await self._wait_for_change(
                job_order_id,
                known,
                watch,
                on_tick,
                tick_s,
                tick_s if subscription is not None else min(tick_s, _FALLBACK_POLL_S),
            )
        finally:
            if subscription is not None:
                await self._delete_subscription(subscription)

    async def _wait_shared(
        self,
        shared: _SharedJobList,
        job_order_id: str,
        known: JobState,
        on_tick: Callable[[JobState], None] | None,
        tick_s: float,
        publish_ms: int,
    ) -> JobState:
        """wait_for_change on the session's one JobOrderList subscription, which stays."""
        watch = _JobListWatch()
        # Registered before the first look, so a change between the two is not missed.
        shared.watches.add(watch)
        try:
            subscribed = await self._share_subscription(shared, publish_ms, tick_s)
            # The last notified list is the first look: a job in ``known`` there costs no
            # read (any later change reaches the watch). A job missing from it, or in
            # another state, is read: that value may predate what the caller knows.
            latest = shared.latest if subscribed else None
            if latest is None or latest.get(job_order_id) != known:
                state = await self.job_state(job_order_id)
                if state != known:
                    return state
            read_s = tick_s if subscribed else min(tick_s, _FALLBACK_POLL_S)
            return await self._wait_for_change(job_order_id, known, watch, on_tick, tick_s, read_s)
        finally:
            shared.watches.discard(watch)

    async def _share_subscription(
        self, shared: _SharedJobList, publish_ms: int, tick_s: float
    ) -> bool:
        """Make sure the shared subscription exists (again, if the server lost it); False
        when the server refuses subscriptions, so the waits poll."""
        async with shared.lock:
            if shared.lost and shared.subscription is not None:
                old, shared.subscription = shared.subscription, None
                shared.latest = None
                await self._delete_subscription(old)
            shared.lost = False
            if shared.subscription is None and not shared.polling:
                shared.subscription = await self._subscribe_job_list(shared, publish_ms, tick_s)
                shared.polling = shared.subscription is None
            return shared.subscription is not None

    async def _wait_for_change(
        self,
        job_order_id: str,
        known: JobState,
        watch: _JobListWatch,
        on_tick: Callable[[JobState], None] | None,
        tick_s: float,
        read_s: float,
    ) -> JobState:
        """The wait of wait_for_change: notified values first, a read when one is due."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + tick_s
        next_read = loop.time() + read_s
        while True:
            # Sleep until a notification or the next read/tick; no polling in between.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(min(next_tick, next_read)):
                    await watch.wake.wait()
            watch.wake.clear()
            values, watch.values = watch.values, []
            # In the order published, so a short-lived state is not skipped.
            for value in values:
                # A shared subscription hands over the list decoded once for every waiter.
                states = value if isinstance(value, dict) else dict(_decode_job_list(value))
                notified = states.get(job_order_id)
                if notified is None:
                    # A list published before the job reached the PLC (a shared subscription
                    # hands its latest list to a new waiter) tells nothing of it: a read decides.
                    watch.recheck = True
                    continue
                if notified != known:
                    return notified
            now = loop.time()
            tick_due = now >= next_tick
            if watch.recheck or tick_due or now >= next_read:
                watch.recheck = False
                state = await self.job_state(job_order_id)
                if state != known:
                    return state
                next_read = loop.time() + read_s
            if tick_due:
                if on_tick is not None:
                    on_tick(state)
                next_tick = loop.time() + tick_s

    async def _subscribe_job_list(
        self, watch: _JobListWatch | _SharedJobList, publish_ms: int, tick_s: float
    ) -> Subscription | None:
        """Subscribe ``watch`` to JobOrderList; None if the server cannot (then poll)."""
        client = self._require()
        node = self._job_list_node()
        # Explicit parameters: asyncua's defaults ask for a keep-alive count servers revise
        # (a warning and a ModifySubscription per wait). A keep-alive about every tick is
        # plenty. The lifetime must be at least three keep-alives (OPC UA Part 4, 5.13.2);
        # a minute at least, so a client too busy to publish for a while keeps it.
        interval_ms = max(publish_ms, 1)
        keep_alive = max(1, math.ceil(tick_s * 1000 / interval_ms))
        lifetime = max(3 * keep_alive, math.ceil(60_000 / interval_ms))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=float(publish_ms),
            RequestedLifetimeCount=lifetime,
            RequestedMaxKeepAliveCount=keep_alive,
            MaxNotificationsPerPublish=0,  # no limit: there is a single monitored item
            PublishingEnabled=True,
            Priority=0,
        )
        subscription: Subscription | None = None
        try:
            with self._guard("subscribe to JobOrderList"):
                subscription = await self._create_subscription(client, params, watch)
                await subscription.subscribe_data_change(node)
        except BaseException as exc:
            if subscription is not None:
                await self._delete_subscription(subscription)
            if isinstance(exc, JobControlError) and not isinstance(exc, MachineUnreachableError):
                # The server answered but will not subscribe (no subscription service, too
                # many subscriptions, ...): polling still works.
                logger.debug("%s: no subscription (%s); polling JobOrderList", self.url, exc)
                return None
            raise
        return subscription

    async def _create_subscription(
        self, client: Client, params: ua.CreateSubscriptionParameters, watch: Any
    ) -> Subscription:
        """Create a subscription. A wait cancelled while the server is creating it still gets
        the subscription back, to delete it, rather than leaving it on the server."""
        creating = asyncio.ensure_future(client.create_subscription(params, watch))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._delete_subscription(await creating)
            raise

    async def _delete_subscription(self, subscription: Subscription) -> None:
        # A failed delete must not replace the caller's result or error; closing the
        # session deletes the subscription on the server anyway.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout_s):
                await subscription.delete()


class _JobListWatch:
    """Subscription handler that hands JobOrderList values over to wait_for_change.

    asyncua calls it from a task of its own and logs what it raises, so it only records
    and wakes the waiter; decoding happens in the waiter, where errors reach the caller.
    """

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.recheck = False  # something happened that a notified value does not show
        self.wake = asyncio.Event()

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        """A new JobOrderList value (or a bad status, which says nothing of the job)."""
        value = data.monitored_item.Value
        status = value.StatusCode if value is not None else None
        if status is not None and not status.is_good():
            self.recheck = True
        else:
            self.values.append(val)
        self.wake.set()

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        """The subscription or the link is in trouble: a read finds out which."""
        self.recheck = True
        self.wake.set()


class _SharedJobList:
    """Subscription handler shared by every wait on one machine over one pooled session:
    each notification goes to the watches of the jobs waiting now.

    A bad status (the server dropped the subscription, the link is going) marks it lost, so
    the next wait makes a new one; the waits themselves re-read to find out.
    """

    def __init__(self) -> None:
        self.watches: set[_JobListWatch] = set()
        self.subscription: Subscription | None = None
        self.polling = False  # the server refuses subscriptions
        self.lost = False
        self.lock = asyncio.Lock()
        #: The last list notified, decoded (None until the first, or after trouble).
        self.latest: dict[str, JobState] | None = None

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        value = data.monitored_item.Value
        status = value.StatusCode if value is not None else None
        try:
            if status is not None and not status.is_good():
                raise JobControlError(f"JobOrderList notified with {status}")
            # Decoded once here rather than once per waiting job.
            self.latest = dict(_decode_job_list(val))
        except JobControlError:
            self.latest = None
            for watch in tuple(self.watches):
                watch.recheck = True
                watch.wake.set()
            return
        for watch in tuple(self.watches):
            watch.values.append(self.latest)
            watch.wake.set()

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        if not status.Status.is_good():
            self.lost = True
            self.latest = None
        for watch in tuple(self.watches):
            watch.status_change_notification(status)


def _decode_job_list(entries: list[Any] | None) -> list[tuple[str, JobState]]:
    """JobOrderList (ISA95JobOrderAndStateDataType[]) → (JobOrderID, top-level state)."""
    return [(str(e.JobOrder.JobOrderID), _top_state(e.State)) for e in entries or []]


def _top_state(states: list[Any] | None) -> JobState:
    # OPC 10031-4 puts the top-level state first; substates follow.
    if not states:
        raise JobControlError("job order without a state")
    try:
        return JobState(int(states[0].StateNumber))
    except ValueError:
        raise JobControlError(f"unknown job order state {states[0].StateNumber}") from None


def _encode_order(order: JobOrderData) -> Any:
    """JobOrderData → ISA95JobOrderDataType."""
    parameter = ua_type("ISA95ParameterDataType")
    material = ua_type("ISA95MaterialDataType")
    return ua_type("ISA95JobOrderDataType")(
        JobOrderID=order.job_order_id,
        Description=[localized(order.description)] if order.description else None,
        WorkMasterID=[ua_type("ISA95WorkMasterDataType")(ID=order.work_master_id)]
        if order.work_master_id
        else None,
        # Priority is an Int16 on the wire.
        Priority=max(_INT16_MIN, min(_INT16_MAX, order.priority)),
        JobOrderParameters=[
            parameter(
                ID=p.name,
                Value=ua.Variant(float(p.value), ua.VariantType.Double),
                EngineeringUnits=eu_information(p.unit),
            )
            for p in order.parameters
        ],
        EquipmentRequirements=[ua_type("ISA95EquipmentDataType")(ID=order.equipment_id)]
        if order.equipment_id
        else None,
        MaterialRequirements=[
            material(
                MaterialDefinitionID=m.material_definition_id,
                MaterialLotID=m.lot_id or None,
                MaterialUse=m.use,
                Quantity=decimal_string(m.quantity),
                EngineeringUnits=eu_information(m.unit),
            )
            for m in order.material_requirements
        ],
    )


def _decode_response(response: Any, packml_state: int) -> JobResponseData:
    """ISA95JobResponseDataType → JobResponseData."""
    if response is None:
        raise JobControlError("RequestJobResponseByJobOrderID returned no JobResponse")
    actuals = [
        MaterialActualData(
            material_definition_id=str(m.MaterialDefinitionID or ""),
            use=str(m.MaterialUse or ""),
            quantity=parse_decimal(m.Quantity),
            unit=eu_text(m.EngineeringUnits),
            lot_id=str(m.MaterialLotID or ""),
        )
        for m in response.MaterialActuals or []
    ]
    counts: dict[str, int] = {}
    data: list[MeasuredValue] = []
    for p in response.JobResponseData or []:
        value = p.Value.Value if isinstance(p.Value, ua.Variant) else p.Value
        if not isinstance(value, int | float):
            continue  # MeasuredValue is numeric; text data has no place there
        if p.ID in (PROCESSED_COUNT, DEFECTIVE_COUNT):
            counts[p.ID] = int(value)
        else:
            data.append(MeasuredValue(str(p.ID), float(value), eu_text(p.EngineeringUnits)))
    produced = sum(a.quantity for a in actuals if a.use.lower() == "produced")
    return JobResponseData(
        job_order_id=str(response.JobOrderID),
        state=_top_state(response.JobState),
        start_time=response.StartTime,
        end_time=response.EndTime,
        material_actuals=actuals,
        data=data,
        # Machines that do not report counts per job get the produced quantity.
        processed_count=counts.get(PROCESSED_COUNT, round(produced)),
        defective_count=counts.get(DEFECTIVE_COUNT, 0),
        packml_state=packml_state,
    )
