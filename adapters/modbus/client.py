"""Job control of one legacy machine over Modbus TCP, behind the machine port.

A legacy controller knows nothing of job orders: the MES downloads the recipe into holding
registers, commands the machine through coils, follows its state and counters in input
registers and builds the job response itself. What it needs to survive a retry, a lost
connection or its own restart, it keeps on the machine: the job record (``JobRecord``: the
job order id, the counters and the time when the job started) in holding registers, so a
retried dispatch finds the job started and never starts it twice, and the counts of a job
are its counters' deltas (modulo 2**32) since its start, whichever worker reads them.

The machine holds one job at a time: the one in its job record, until ``clear`` resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import ValidationError
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from adapters.modbus.registers import (
    WIDTH,
    RegisterMap,
    decode_text,
    decode_uint32,
    encode,
    encode_text,
    encode_uint32,
)
from mes.machines import (
    CommandNotSupportedError,
    InvalidJobOrderStatusError,
    InvalidRequestError,
    JobCapacity,
    JobControlError,
    JobOrderData,
    JobResponseData,
    JobState,
    MachineUnreachableError,
    MaterialActualData,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)

#: The default Modbus TCP port (``modbus://host`` without one).
MODBUS_PORT = 502
#: The setpoint that gets the job's planned output unless the recipe has a parameter so named.
QUANTITY = "Quantity"
# How long a coil pulse stays on: long enough for a PLC scan to see it.
_PULSE_S = 0.05


def parse_url(url: str) -> tuple[str, int]:
    """``modbus://host:port`` → (host, port); InvalidRequestError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "modbus" or not parts.hostname:
        raise InvalidRequestError(f"{url!r} is not a modbus://host:port URL")
    return parts.hostname, parts.port or MODBUS_PORT


def register_map(settings: Mapping[str, Any]) -> RegisterMap:
    """The endpoint's register map; InvalidRequestError naming the field if it is wrong."""
    try:
        registers = RegisterMap.model_validate(settings)
    except ValidationError as exc:
        raise InvalidRequestError(f"register map: {exc}") from None
    problems = registers.problems()
    if problems:
        raise InvalidRequestError(f"register map: {'; '.join(problems)}")
    return registers


class _Job:
    """The job record as read from the machine."""

    def __init__(self, job_order_id: str, processed: int, defective: int, started: int) -> None:
        self.job_order_id = job_order_id
        self.processed = processed
        self.defective = defective
        self.started = started


class ModbusJobClient:
    """A session with one legacy machine (``async with`` connects): an EquipmentAdapter."""

    def __init__(self, url: str, machine: str, settings: Mapping[str, Any]) -> None:
        self.url = url
        self.machine = machine
        self.map = register_map(settings)
        self._host, self._port = parse_url(url)
        self._client: AsyncModbusTcpClient | None = None

    async def __aenter__(self) -> Self:
        client = AsyncModbusTcpClient(
            self._host, port=self._port, timeout=self.map.timeout_s, retries=0, reconnect_delay=0
        )
        try:
            connected = await client.connect()
        except (OSError, ModbusException) as exc:
            client.close()
            raise MachineUnreachableError(f"{self.url} connect: {exc!r}") from exc
        if not connected:
            client.close()
            raise MachineUnreachableError(f"{self.url}: no connection")
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- the wire ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except JobControlError:
            raise
        except (OSError, TimeoutError, ModbusException) as exc:
            raise MachineUnreachableError(f"{self.url} {what}: {exc!r}") from exc

    async def _request(self, what: str, call: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        if self._client is None:
            raise RuntimeError("ModbusJobClient is not connected; use 'async with'")
        with self._guard(what):
            response = await call()
        if response.isError():
            # An exception response: the request reached a device that refused it.
            raise JobControlError(f"{self.url} {what}: {response}")
        return response

    def _c(self) -> AsyncModbusTcpClient:
        assert self._client is not None
        return self._client

    async def _read_holding(self, address: int, count: int) -> list[int]:
        device = self.map.device_id
        response = await self._request(
            f"read holding registers {address}+{count}",
            lambda: self._c().read_holding_registers(address, count=count, device_id=device),
        )
        return list(response.registers)

    async def _write_holding(self, address: int, values: list[int]) -> None:
        device = self.map.device_id
        await self._request(
            f"write holding registers {address}+{len(values)}",
            lambda: self._c().write_registers(address, values, device_id=device),
        )

    async def _write_coil(self, name: str, address: int, value: bool) -> None:
        device = self.map.device_id
        await self._request(
            f"write coil {name} ({address})",
            lambda: self._c().write_coil(address, value, device_id=device),
        )

    async def _pulse(self, name: str, address: int) -> None:
        await self._write_coil(name, address, True)
        await asyncio.sleep(_PULSE_S)
        await self._write_coil(name, address, False)

    async def _machine(self) -> tuple[int, int, int]:
        """(state code, processed, defective), read in one request."""
        first, count = self.map.input_block()
        device = self.map.device_id
        response = await self._request(
            f"read input registers {first}+{count}",
            lambda: self._c().read_input_registers(first, count=count, device_id=device),
        )
        regs = list(response.registers)
        inputs, order = self.map.inputs, self.map.word_order
        processed = decode_uint32(
            regs[inputs.processed - first : inputs.processed - first + 2], order
        )
        defective = decode_uint32(
            regs[inputs.defective - first : inputs.defective - first + 2], order
        )
        return regs[inputs.state - first], processed, defective

    async def _status(self, name: str) -> bool | None:
        address = self.map.status.get(name)
        if address is None:
            return None
        device = self.map.device_id
        response = await self._request(
            f"read discrete input {name} ({address})",
            lambda: self._c().read_discrete_inputs(address, count=1, device_id=device),
        )
        return bool(response.bits[0])

    async def _job(self) -> _Job:
        job, order = self.map.job, self.map.word_order
        regs = await self._read_holding(job.address, job.length + 6)
        n = job.length
        return _Job(
            decode_text(regs[:n]),
            decode_uint32(regs[n : n + 2], order),
            decode_uint32(regs[n + 2 : n + 4], order),
            decode_uint32(regs[n + 4 : n + 6], order),
        )

    def _state(self, code: int) -> JobState:
        states = self.map.states
        by_code = {
            states.idle: JobState.ALLOWED_TO_START,
            states.running: JobState.RUNNING,
            states.paused: JobState.INTERRUPTED,
            states.complete: JobState.ENDED,
            states.aborted: JobState.ABORTED,
        }
        try:
            return by_code[code]
        except KeyError:
            raise JobControlError(f"{self.machine}: unknown state code {code}") from None

    async def _ours(self, job_order_id: str) -> _Job:
        job = await self._job()
        if job.job_order_id != job_order_id:
            raise UnknownJobOrderError(f"{self.machine} has no job {job_order_id!r}")
        return job

    # -- the machine port --------------------------------------------------------------

    async def store_and_start(self, order: JobOrderData) -> None:
        """Download the recipe and start the job, refusing unless the machine is idle.

        Setpoints go in one write (FC16) and are read back and compared; then the job record,
        RecipeValid and a Start pulse. A retry finds the job record: a job already started is
        not started again; one that had not started is downloaded again.
        """
        job = await self._job()
        code, processed, defective = await self._machine()
        states = self.map.states
        if job.job_order_id == order.job_order_id and code != states.idle:
            return  # started by an earlier attempt
        if job.job_order_id not in ("", order.job_order_id):
            raise UnableToAcceptJobOrderError(
                f"{self.machine} holds job {job.job_order_id!r} until it is cleared"
            )
        if code != states.idle:
            raise UnableToAcceptJobOrderError(f"{self.machine} is not idle (state code {code})")
        if await self._status("ready") is False:
            raise UnableToAcceptJobOrderError(f"{self.machine} is not ready")
        coils = self.map.coils
        await self._write_coil("start", coils.start, False)
        await self._write_coil("recipe_valid", coils.recipe_valid, False)
        await self._download(order)
        order_ = self.map.word_order
        try:
            record = encode_text(order.job_order_id, self.map.job.length)
        except (ValueError, UnicodeEncodeError) as exc:
            raise InvalidRequestError(f"job order id: {exc}") from None
        record += encode_uint32(processed, order_) + encode_uint32(defective, order_)
        record += encode_uint32(int(time.time()), order_)
        await self._write_holding(self.map.job.address, record)
        await self._write_coil("recipe_valid", coils.recipe_valid, True)
        await self._pulse("start", coils.start)

    async def _download(self, order: JobOrderData) -> None:
        """Write every setpoint in one request, read them back and compare."""
        first, count = self.map.setpoint_block()
        if count == 0:
            return
        values = {p.name: p.value for p in order.parameters}
        values.setdefault(QUANTITY, _planned(order))
        block = await self._read_holding(first, count)  # gaps keep what they hold
        for s in self.map.setpoints:
            if s.parameter not in values:
                raise InvalidRequestError(f"setpoint {s.parameter}: not in the job's recipe")
            try:
                regs = encode(values[s.parameter], s.type, self.map.word_order, s.scale)
            except ValueError as exc:
                raise InvalidRequestError(f"setpoint {s.parameter}: {exc}") from None
            block[s.address - first : s.address - first + WIDTH[s.type]] = regs
        await self._write_holding(first, block)
        back = await self._read_holding(first, count)
        for s in self.map.setpoints:
            span = slice(s.address - first, s.address - first + WIDTH[s.type])
            if back[span] != block[span]:
                raise InvalidRequestError(
                    f"setpoint {s.parameter}: wrote {block[span]}, the machine holds {back[span]}"
                )

    async def update(self, order: JobOrderData) -> None:
        raise CommandNotSupportedError(f"{self.machine}: a legacy machine has no job queue")

    async def start(self, job_order_id: str) -> None:
        raise CommandNotSupportedError(f"{self.machine}: a downloaded job starts at once")

    async def revoke_start(self, job_order_id: str) -> None:
        raise CommandNotSupportedError(f"{self.machine}: a downloaded job starts at once")

    async def pause(self, job_order_id: str) -> None:
        await self._command(job_order_id, "pause", JobState.RUNNING)

    async def resume(self, job_order_id: str) -> None:
        # A paused legacy machine resumes on Start, as at its panel.
        if self.map.coils.pause is None:
            raise CommandNotSupportedError(f"{self.machine} has no pause coil")
        await self._command(job_order_id, "start", JobState.INTERRUPTED)

    async def cancel(self, job_order_id: str) -> None:
        raise CommandNotSupportedError(f"{self.machine}: a downloaded job starts at once")

    async def abort(self, job_order_id: str) -> None:
        await self._command(job_order_id, "stop", JobState.RUNNING, JobState.INTERRUPTED)

    async def clear(self, job_order_id: str) -> None:
        """Reset an ended or aborted job's machine to idle and empty its job record."""
        await self._ours(job_order_id)
        state = self._state((await self._machine())[0])
        if not state.is_final:
            raise InvalidJobOrderStatusError(f"{job_order_id} is {state.name}, not ended")
        if self.map.coils.reset is not None:
            await self._pulse("reset", self.map.coils.reset)
        await self._write_holding(self.map.job.address, [0] * (self.map.job.length + 6))

    async def _command(self, job_order_id: str, coil: str, *allowed: JobState) -> None:
        address = getattr(self.map.coils, coil)
        if address is None:
            raise CommandNotSupportedError(f"{self.machine} has no {coil} coil")
        await self._ours(job_order_id)
        state = self._state((await self._machine())[0])
        if state not in allowed:
            raise InvalidJobOrderStatusError(f"{job_order_id} is {state.name}")
        await self._pulse(coil, address)

    async def job_state(self, job_order_id: str) -> JobState:
        await self._ours(job_order_id)
        return self._state((await self._machine())[0])

    async def wait_for_change(
        self,
        job_order_id: str,
        known: JobState,
        on_tick: Callable[[JobState], None] | None = None,
        tick_s: float = 5.0,
        publish_ms: int = 100,
    ) -> JobState:
        """Poll the job's state every ``publish_ms`` until it differs from ``known``."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + tick_s
        while True:
            state = await self.job_state(job_order_id)
            if state != known:
                return state
            if loop.time() >= next_tick:
                if on_tick is not None:
                    on_tick(state)
                next_tick = loop.time() + tick_s
            await asyncio.sleep(publish_ms / 1000)

    async def job_response(
        self, job_order_id: str, order: JobOrderData | None = None
    ) -> JobResponseData:
        """The counts since the job started (deltas modulo 2**32) and, given the job as
        dispatched, its material: consumed lots as required (pro rata for an aborted job),
        the produced lot as planned for an ended one."""
        job = await self._ours(job_order_id)
        code, processed, defective = await self._machine()
        state = self._state(code)
        done = (processed - job.processed) % 2**32
        bad = (defective - job.defective) % 2**32
        actuals = _actuals(order, state, done) if order is not None and state.is_final else []
        return JobResponseData(
            job_order_id=job_order_id,
            state=state,
            start_time=datetime.fromtimestamp(job.started, UTC) if job.started else None,
            end_time=datetime.now(UTC) if state.is_final else None,
            material_actuals=actuals,
            processed_count=done,
            defective_count=bad,
        )

    async def capacity(self) -> JobCapacity:
        """One job at a time: the one in the job record until it is cleared."""
        job = await self._job()
        return JobCapacity(1, 1 if job.job_order_id else 0)


def _planned(order: JobOrderData) -> float:
    return sum(m.quantity for m in order.material_requirements if m.use == "Produced") or 1.0


def _actuals(order: JobOrderData, state: JobState, processed: int) -> list[MaterialActualData]:
    ended = state is JobState.ENDED
    share = 1.0 if ended else min(1.0, processed / _planned(order))
    actuals = [
        MaterialActualData(m.material_definition_id, m.use, m.quantity * share, m.unit, m.lot_id)
        for m in order.material_requirements
        if m.use == "Consumed" and share > 0
    ]
    if ended:
        actuals += [
            MaterialActualData(
                m.material_definition_id,
                m.use,
                m.quantity,
                m.unit,
                m.lot_id or f"{order.job_order_id}-OUT",
            )
            for m in order.material_requirements
            if m.use == "Produced"
        ]
    return actuals
