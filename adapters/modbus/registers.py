"""The register map of a legacy machine: which Modbus address holds what, and how to code it.

A map lives in the work unit's endpoint ``settings`` (master data, ``protocol: modbus``) and
is checked when the plant file is loaded; the MES's adapter (``adapters.modbus.client``) and
the simulator (``adapters.modbus.simulator``) read the same map. Wire addresses start at 0
("40001" is documentation's name for holding register 0). The four tables:

- holding registers (read/write 16 bit): the recipe ``setpoints`` and the ``job`` record the
  MES keeps on the machine (the job-id register, and the counters when the job started);
- coils (read/write bits): the commands ``start``, ``recipe_valid`` and, where the machine
  has them, ``stop`` (abort the job), ``pause`` and ``reset`` (back to idle);
- input registers (read-only 16 bit): the machine's ``state`` code and its ``processed`` and
  ``defective`` counters (uint32, counting up and wrapping at 2**32);
- discrete inputs (read-only bits): ``status`` bits, e.g. ``ready``.

32-bit values span two registers and devices disagree on the order of their four bytes
(A most significant): ``word_order`` ABCD (big-endian), CDAB (word swapped), BADC (bytes
swapped in each word) or DCBA (little-endian); a 16-bit value's bytes are swapped by BADC
and DCBA too. A setpoint's ``scale`` is engineering units per count: 0.1 stores 25.3 as 253.
"""

from __future__ import annotations

import itertools
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Address = Annotated[int, Field(ge=0, le=0xFFFF)]
ValueType = Literal["int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

#: Registers a value of each type takes.
WIDTH: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
# Where each of the big-endian bytes A, B, C, D goes, per word order.
_PERMUTATION = {
    "ABCD": (0, 1, 2, 3),
    "CDAB": (2, 3, 0, 1),
    "BADC": (1, 0, 3, 2),
    "DCBA": (3, 2, 1, 0),
}
#: The most registers one read (FC3/FC4) and one write (FC16) move.
MAX_READ, MAX_WRITE = 125, 123
#: Characters of the job order id one register holds (ASCII, two per register).
CHARS_PER_REGISTER = 2
#: The counters in the job record: processed and defective at the start, start time (epoch s).
JOB_RECORD_EXTRA = 6


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Setpoint(_Entry):
    """One recipe parameter in holding registers: ``parameter`` is its name in the recipe."""

    parameter: Annotated[str, Field(min_length=1, max_length=100)]
    address: Address
    type: ValueType = "uint16"
    scale: Annotated[float, Field(gt=0)] = 1.0


class Coils(_Entry):
    """The command coils; a missing optional coil is a command the machine does not take."""

    start: Address
    recipe_valid: Address
    stop: Address | None = None
    pause: Address | None = None
    reset: Address | None = None


class Inputs(_Entry):
    """Input registers: the state code and the two uint32 counters."""

    state: Address
    processed: Address
    defective: Address


class StateCodes(_Entry):
    """The values of the state register (the machine's manual says which)."""

    idle: int = 0
    running: int = 1
    paused: int = 2
    complete: int = 3
    aborted: int = 4


class JobRecord(_Entry):
    """Holding registers the MES writes when it starts a job: the job order id (ASCII,
    ``length`` registers) at ``address``, then the processed and defective counters at that
    moment and the start time (three uint32). A retry reads it and never starts twice."""

    address: Address
    length: Annotated[int, Field(ge=1, le=60)] = 16


class RegisterMap(_Entry):
    """A work unit's Modbus register map (the endpoint's ``settings``)."""

    device_id: Annotated[int, Field(ge=0, le=255)] = 1
    word_order: WordOrder = "ABCD"
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    setpoints: list[Setpoint] = []
    job: JobRecord
    coils: Coils
    inputs: Inputs
    states: StateCodes = StateCodes()
    #: Discrete inputs by name; ``ready`` (if given) must be on for a recipe download.
    status: dict[str, Address] = {}

    def problems(self) -> list[str]:
        """What is wrong across entries (overlaps, addresses past 65535, a parameter or a
        state code used twice), each starting with the field it is about."""
        problems = [
            *_overlaps("holding registers", self.holding_spans()),
            *_overlaps("input registers", self.input_spans()),
            *_overlaps("coils", [(f"coils.{k}", a, 1) for k, a in self.coil_items()]),
            *_overlaps("discrete inputs", [(f"status.{k}", a, 1) for k, a in self.status.items()]),
        ]
        names = [s.parameter for s in self.setpoints]
        problems += [
            f"setpoints: parameter {n!r} is mapped twice"
            for n in sorted(set(names))
            if names.count(n) > 1
        ]
        first, count = self.setpoint_block()
        if count > MAX_WRITE:
            problems.append(
                f"setpoints: span holding registers {first}-{first + count - 1}; "
                f"one write (FC16) takes at most {MAX_WRITE}"
            )
        first, count = self.input_block()
        if count > MAX_READ:
            problems.append(
                f"inputs: span input registers {first}-{first + count - 1}; "
                f"one read (FC4) takes at most {MAX_READ}"
            )
        codes = self.states.model_dump()
        if len(set(codes.values())) != len(codes):
            problems.append("states: two states share a code")
        return problems

    def holding_spans(self) -> list[tuple[str, int, int]]:
        """(field, first address, registers) of everything in holding registers."""
        spans = [
            (f"setpoints[{i}] ({s.parameter})", s.address, WIDTH[s.type])
            for i, s in enumerate(self.setpoints)
        ]
        spans.append(("job", self.job.address, self.job.length + JOB_RECORD_EXTRA))
        return spans

    def input_spans(self) -> list[tuple[str, int, int]]:
        i = self.inputs
        return [
            ("inputs.state", i.state, 1),
            ("inputs.processed", i.processed, 2),
            ("inputs.defective", i.defective, 2),
        ]

    def coil_items(self) -> list[tuple[str, int]]:
        return [(k, a) for k, a in self.coils.model_dump().items() if a is not None]

    def setpoint_block(self) -> tuple[int, int]:
        """(first address, count) of the registers spanning every setpoint: one FC16."""
        if not self.setpoints:
            return 0, 0
        first = min(s.address for s in self.setpoints)
        end = max(s.address + WIDTH[s.type] for s in self.setpoints)
        return first, end - first

    def input_block(self) -> tuple[int, int]:
        """(first address, count) of the input registers spanning state and counters."""
        spans = self.input_spans()
        first = min(a for _, a, _ in spans)
        return first, max(a + n for _, a, n in spans) - first


def _overlaps(table: str, spans: list[tuple[str, int, int]]) -> list[str]:
    problems = []
    ordered = sorted(spans, key=lambda s: s[1])
    for name, address, count in ordered:
        if address + count - 1 > 0xFFFF:
            problems.append(f"{name}: {table} {address}-{address + count - 1} run past 65535")
    for (a_name, a, a_count), (b_name, b, _) in itertools.pairwise(ordered):
        if b < a + a_count:
            problems.append(
                f"{b_name} at {table} {b} overlaps {a_name} ({table} {a}-{a + a_count - 1})"
            )
    return problems


def encode(value: float, type_: str, order: str, scale: float = 1.0) -> list[int]:
    """The registers holding ``value`` (engineering units) as ``type_`` in ``order``.

    ValueError when the scaled value does not fit the type.
    """
    raw: float = value / scale
    if type_ != "float32":
        raw = round(raw)
    try:
        data = struct.pack(_STRUCT[type_], raw)
    except struct.error:
        raise ValueError(f"{value} does not fit {type_} (scale {scale})") from None
    return _registers(data, order)


def decode(registers: list[int], type_: str, order: str, scale: float = 1.0) -> float:
    """The engineering value of ``registers`` holding a ``type_`` in ``order``."""
    width = WIDTH[type_]
    if len(registers) != width:
        raise ValueError(f"{type_} takes {width} register(s), got {len(registers)}")
    (raw,) = struct.unpack(_STRUCT[type_], _bytes(registers, order))
    return float(raw) * scale


def encode_uint32(value: int, order: str) -> list[int]:
    return encode(value % 2**32, "uint32", order)


def decode_uint32(registers: list[int], order: str) -> int:
    return round(decode(registers, "uint32", order))


def _permutation(order: str, size: int) -> tuple[int, ...]:
    if size == 4:
        return _PERMUTATION[order]
    return (1, 0) if order in ("BADC", "DCBA") else (0, 1)


def _registers(data: bytes, order: str) -> list[int]:
    perm = _permutation(order, len(data))
    wire = bytes(data[i] for i in perm)
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


def _bytes(registers: list[int], order: str) -> bytes:
    wire = b"".join(r.to_bytes(2, "big") for r in registers)
    perm = _permutation(order, len(wire))
    data = bytearray(len(wire))
    for position, source in enumerate(perm):
        data[source] = wire[position]
    return bytes(data)


def encode_text(text: str, registers: int) -> list[int]:
    """ASCII ``text`` in ``registers`` registers, two characters each, NUL padded."""
    data = text.encode("ascii")
    if len(data) > registers * CHARS_PER_REGISTER:
        raise ValueError(f"{text!r} is longer than {registers * CHARS_PER_REGISTER} characters")
    data = data.ljust(registers * CHARS_PER_REGISTER, b"\0")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def decode_text(registers: list[int]) -> str:
    data = b"".join(r.to_bytes(2, "big") for r in registers)
    return data.rstrip(b"\0").decode("ascii", errors="replace")
