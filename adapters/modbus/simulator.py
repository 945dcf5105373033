"""A legacy machine simulator: a PLC without job orders, reached over Modbus TCP (pymodbus).

It reads the same register map as the MES (``adapters.modbus.registers``) and behaves as a
simple batch machine does: idle until Start (with RecipeValid on), then running for
``cycle_time_s``, counting ``Quantity`` items (the setpoint of that name, else one) on its
processed counter, each defective with probability ``defect_rate``, then complete until
Reset. Pause stops the clock, Start resumes; Stop aborts. Counters are uint32 and wrap.

Its memory outlives its server, as a PLC's retentive memory outlives a restart of its
communication: a ``ModbusSimulator`` leaving and a new one serving the same
``LegacyMachine`` is a restart in the middle of a job. ``word_order`` may differ from the
map's, to see what a device with another byte order does to an MES that expects the map's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer

from adapters.modbus.client import QUANTITY
from adapters.modbus.registers import WIDTH, RegisterMap, decode, decode_uint32, encode_uint32

_SIZE = 0x10000
_TICK_S = 0.02


@dataclass
class LegacyMachine:
    """One simulated machine: its four tables and the logic behind them."""

    map: RegisterMap
    cycle_time_s: float = 2.0
    defect_rate: float = 0.0
    word_order: str | None = None
    #: Where the counters start (near 2**32 to see them wrap).
    counter_start: int = 0
    seed: int = 0
    coils: list[bool] = field(default_factory=lambda: [False] * _SIZE)
    discrete: list[bool] = field(default_factory=lambda: [False] * _SIZE)
    holding: list[int] = field(default_factory=lambda: [0] * _SIZE)
    inputs: list[int] = field(default_factory=lambda: [0] * _SIZE)
    #: Jobs started and ended (a test checks nothing starts twice).
    starts: int = 0
    ends: int = 0

    def __post_init__(self) -> None:
        self.order = self.word_order or self.map.word_order
        self._rng = random.Random(self.seed)
        self._elapsed = 0.0
        self._made = 0
        self.processed = self.counter_start
        self.defective = self.counter_start
        self._set_state(self.map.states.idle)
        self._write_counters()

    # -- what the MES sees ------------------------------------------------------------------

    @property
    def state(self) -> int:
        return self.inputs[self.map.inputs.state]

    def setpoint(self, parameter: str) -> float:
        """The value the machine reads from a setpoint, in its own word order."""
        s = next(s for s in self.map.setpoints if s.parameter == parameter)
        return decode(
            self.holding[s.address : s.address + WIDTH[s.type]], s.type, self.order, s.scale
        )

    def _set_state(self, code: int) -> None:
        self.inputs[self.map.inputs.state] = code
        states = self.map.states
        bits = {"ready": code == states.idle, "running": code == states.running}
        for name, address in self.map.status.items():
            self.discrete[address] = bits.get(name, False)

    def _write_counters(self) -> None:
        i = self.map.inputs
        self.inputs[i.processed : i.processed + 2] = encode_uint32(self.processed, self.order)
        self.inputs[i.defective : i.defective + 2] = encode_uint32(self.defective, self.order)

    # -- commands ---------------------------------------------------------------------------

    def command(self, address: int, value: bool) -> None:
        """A coil written: Start, Stop, Pause and Reset act on a rising edge."""
        was = self.coils[address]
        self.coils[address] = value
        if not value or was:
            return
        coils, states, state = self.map.coils, self.map.states, self.state
        if address == coils.start:
            if state == states.idle and self.coils[coils.recipe_valid]:
                self._elapsed, self._made = 0.0, 0
                self.starts += 1
                self._set_state(states.running)
            elif state == states.paused:
                self._set_state(states.running)
        elif address == coils.stop and state in (states.running, states.paused):
            self.ends += 1
            self._set_state(states.aborted)
        elif address == coils.pause and state == states.running:
            self._set_state(states.paused)
        elif address == coils.reset and state in (states.complete, states.aborted):
            self.coils[coils.recipe_valid] = False
            self._set_state(states.idle)

    def tick(self, dt: float) -> None:
        """Run for ``dt`` seconds: count the items made meanwhile, end when the cycle is."""
        if self.state != self.map.states.running:
            return
        self._elapsed += dt
        quantity = self._quantity()
        progress = 1.0 if self.cycle_time_s <= 0 else min(1.0, self._elapsed / self.cycle_time_s)
        due = int(quantity * progress)
        while self._made < due:
            self._made += 1
            self.processed = (self.processed + 1) % 2**32
            if self._rng.random() < self.defect_rate:
                self.defective = (self.defective + 1) % 2**32
        self._write_counters()
        if progress >= 1.0:
            self.ends += 1
            self._set_state(self.map.states.complete)

    def _quantity(self) -> int:
        if any(s.parameter == QUANTITY for s in self.map.setpoints):
            return max(0, round(self.setpoint(QUANTITY)))
        return 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(_TICK_S)
            now = loop.time()
            self.tick(now - last)
            last = now


class _Context(ModbusServerContext):
    """The machine's tables as pymodbus's datastore (one device)."""

    def __init__(self, machine: LegacyMachine) -> None:  # no super(): its devices are ours
        self.machine = machine
        self.old_simulator = True
        self.simdevices = []

    def device_ids(self) -> list[int]:
        return [self.machine.map.device_id]

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        m = self.machine
        if address + count > _SIZE:
            return ExcCodes.ILLEGAL_ADDRESS
        if func_code in (1, 5, 15):
            return m.coils[address : address + count]
        if func_code == 2:
            return m.discrete[address : address + count]
        if func_code in (3, 6, 16, 23):
            return m.holding[address : address + count]
        if func_code == 4:
            return m.inputs[address : address + count]
        return ExcCodes.ILLEGAL_FUNCTION

    async def async_setValues(
        self,
        device_id: int,
        func_code: int,
        address: int,
        values: Sequence[int] | Sequence[bool],
    ) -> ExcCodes | None:
        if address + len(values) > _SIZE:
            return ExcCodes.ILLEGAL_ADDRESS
        if func_code in (5, 15):
            for offset, value in enumerate(values):
                self.machine.command(address + offset, bool(value))
            return None
        if func_code in (6, 16, 23):
            self.machine.holding[address : address + len(values)] = [int(v) for v in values]
            return None
        return ExcCodes.ILLEGAL_FUNCTION


class ModbusSimulator:
    """Serves one ``LegacyMachine`` over Modbus TCP and runs it while serving
    (``async with``); ``port`` 0 picks a free one (see ``url``)."""

    def __init__(self, machine: LegacyMachine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.machine = machine
        self.host = host
        self.port = port
        self._server: ModbusTcpServer | None = None
        self._run: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"modbus://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        server = ModbusTcpServer(_Context(self.machine), address=(self.host, self.port))
        await server.serve_forever(background=True)
        if self.port == 0:
            assert server.transport is not None
            self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._server = server
        self._run = asyncio.create_task(self.machine.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
        self._server = self._run = None


def read_uint32(machine: LegacyMachine, address: int) -> int:
    """A uint32 in the machine's input registers, in its own word order (tests, CLI)."""
    return decode_uint32(machine.inputs[address : address + 2], machine.order)
