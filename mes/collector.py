"""The machine data collector: PackML states and counters of the work units, for OEE.

For every work unit with an OPC UA endpoint (of its share: ``--share K/N`` owns the units
whose id % N == K, so several collectors split a plant), it follows the unit's PackML tags by
subscription (``adapters.opcua.packml``) and stores

- **state intervals** (``equipment_state_interval``): a new row each time StateCurrent (or,
  while the unit is not executing, its StopReason) changes; the previous one gets its end;
- **counter deltas** (``equipment_count``): what ProdProcessedCount / ProdDefectiveCount
  rose by since the last reading, with the counters as read.

Counters are unsigned 32-bit: a rise across 2^32 is a rollover (the delta counts on through
zero); a counter that goes down otherwise, or any reading after the controller's server
restarted (a new ServerStatus StartTime), is a restart: the delta is the new value (the
controller counted that many since it came back). The last totals and the open interval are
read back from the database at start, so a restarted collector neither loses nor repeats a
count. A lost connection is retried with a growing pause (up to 5 s); while it is down the
open interval stays open (the unit's next reported state closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.opcua.packml import Connected, PackmlEvent, PackmlSample, follow_packml
from mes.machines import JobControlError
from mes.models import ControllerEndpoint, Equipment, EquipmentCount, EquipmentStateInterval

log = logging.getLogger(__name__)

COUNTER_MODULUS = 2**32
PACKML_EXECUTE = 6
MAX_RETRY_S = 5.0


def counter_delta(last: int | None, new: int, *, restarted: bool = False) -> int:
    """What an unsigned 32-bit counter rose by from ``last`` to ``new``.

    None before (the first reading ever): 0, the reading is the baseline. A controller that
    ``restarted`` counted ``new`` since. Otherwise a step of less than 2^31 forward modulo
    2^32 is a rise (across a rollover too); anything else is a counter set back by a restart.
    """
    new %= COUNTER_MODULUS
    if last is None:
        return 0
    if restarted:
        return new
    step = (new - last) % COUNTER_MODULUS
    return step if step < COUNTER_MODULUS // 2 else new


@dataclass(frozen=True)
class Share:
    """The work units one collector owns: those whose id % ``of`` == ``index``."""

    index: int = 0
    of: int = 1

    @classmethod
    def parse(cls, text: str) -> Share:
        """``K/N`` with 0 <= K < N."""
        k, sep, n = text.partition("/")
        if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
            raise ValueError(f"a share is K/N with 0 <= K < N, not {text!r}")
        return cls(int(k), int(n))


@dataclass(frozen=True)
class Unit:
    """A work unit to follow and where its controller is."""

    id: int
    external_id: str
    url: str
    machine: str
    security: str
    settings: dict[str, object]


def owned_units(session: Session, share: Share) -> list[Unit]:
    """The OPC UA work units of ``share``, by id."""
    rows = session.execute(
        select(Equipment, ControllerEndpoint)
        .join(ControllerEndpoint, ControllerEndpoint.equipment_id == Equipment.id)
        .where(ControllerEndpoint.protocol == "opcua")
        .order_by(Equipment.id)
    ).all()
    return [
        Unit(eq.id, eq.external_id, ep.url, ep.machine, ep.security, dict(ep.settings or {}))
        for eq, ep in rows
        if eq.id % share.of == share.index
    ]


class UnitRecorder:
    """Turns one unit's PackML events into rows; its memory starts from the database."""

    def __init__(self, sessions: sessionmaker[Session], equipment_id: int) -> None:
        self.sessions = sessions
        self.equipment_id = equipment_id
        with sessions() as s:
            last = s.scalars(
                select(EquipmentCount)
                .where(EquipmentCount.equipment_id == equipment_id)
                .order_by(EquipmentCount.at.desc(), EquipmentCount.id.desc())
                .limit(1)
            ).first()
            self.totals: dict[str, int | None] = {
                "processed": last.processed_total if last else None,
                "defective": last.defective_total if last else None,
            }
            open_row = s.scalars(
                select(EquipmentStateInterval).where(
                    EquipmentStateInterval.equipment_id == equipment_id,
                    EquipmentStateInterval.ended_at.is_(None),
                )
            ).first()
            self.open: tuple[int, int | None] | None = (
                (open_row.state, open_row.stop_reason) if open_row else None
            )
        self.state: int | None = self.open[0] if self.open else None
        self.stop_reason = 0
        self.server_started: datetime | None = None
        #: Counters whose next reading follows a controller restart.
        self.restarted: set[str] = set()

    def record(self, event: PackmlEvent) -> None:
        """Store what ``event`` changes (in its own transaction)."""
        if isinstance(event, Connected):
            if (
                self.server_started is not None
                and event.server_started is not None
                and event.server_started != self.server_started
            ):
                self.restarted = {"processed", "defective"}
            self.server_started = event.server_started
            return
        if event.tag in ("processed", "defective"):
            self._count(event)
        else:
            if event.tag == "state":
                self.state = event.value
            else:
                self.stop_reason = event.value
            self._interval(event.at)

    def _count(self, sample: PackmlSample) -> None:
        last = self.totals[sample.tag]
        delta = counter_delta(last, sample.value, restarted=sample.tag in self.restarted)
        self.restarted.discard(sample.tag)
        new = sample.value % COUNTER_MODULUS
        if last == new and delta == 0:
            return
        self.totals[sample.tag] = new
        with self.sessions() as s, s.begin():
            s.add(
                EquipmentCount(
                    equipment_id=self.equipment_id,
                    at=sample.at,
                    processed_delta=delta if sample.tag == "processed" else 0,
                    defective_delta=delta if sample.tag == "defective" else 0,
                    processed_total=self.totals["processed"] or 0,
                    defective_total=self.totals["defective"] or 0,
                )
            )

    def _interval(self, at: datetime) -> None:
        if self.state is None:
            return
        # A stop reason describes a stop: while executing, the unit has none.
        reason = None if self.state == PACKML_EXECUTE or not self.stop_reason else self.stop_reason
        current = (self.state, reason)
        if current == self.open:
            return
        with self.sessions() as s, s.begin():
            for row in s.scalars(
                select(EquipmentStateInterval).where(
                    EquipmentStateInterval.equipment_id == self.equipment_id,
                    EquipmentStateInterval.ended_at.is_(None),
                )
            ):
                row.ended_at = max(at, row.started_at)
            s.add(
                EquipmentStateInterval(
                    equipment_id=self.equipment_id,
                    state=self.state,
                    stop_reason=reason,
                    started_at=at,
                )
            )
        self.open = current


async def follow_unit(sessions: sessionmaker[Session], unit: Unit, publish_ms: int = 200) -> None:
    """Follow one unit forever (until cancelled), reconnecting after a lost connection."""
    recorder = await asyncio.to_thread(UnitRecorder, sessions, unit.id)
    queue: asyncio.Queue[PackmlEvent | None] = asyncio.Queue()

    async def store() -> None:
        # One writer, in arrival order; None (put on the way out) ends it.
        while (event := await queue.get()) is not None:
            try:
                await asyncio.to_thread(recorder.record, event)
            except Exception:
                log.exception("collector: %s: could not store %r", unit.external_id, event)

    writer = asyncio.create_task(store(), name=f"collector-store:{unit.external_id}")
    pause = 0.2
    try:
        while True:
            try:
                await follow_packml(
                    unit.url,
                    unit.machine,
                    queue.put_nowait,
                    security=unit.security,
                    settings=unit.settings,
                    publish_ms=publish_ms,
                )
            except JobControlError as exc:
                log.info("collector: %s: %s; retrying in %.1f s", unit.external_id, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_S)
    finally:
        # What was received is stored before the collector goes.
        queue.put_nowait(None)
        await writer


@contextlib.asynccontextmanager
async def collector_running(
    sessions: sessionmaker[Session], share: Share | None = None, publish_ms: int = 200
) -> AsyncIterator[list[Unit]]:
    """The collector of ``share`` (all units by default) in the background; yields the units
    it follows and stops them on exit."""
    units = await asyncio.to_thread(_owned, sessions, share or Share())
    tasks = [
        asyncio.create_task(follow_unit(sessions, u, publish_ms), name=f"collector:{u.external_id}")
        for u in units
    ]
    try:
        yield units
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _owned(sessions: sessionmaker[Session], share: Share) -> list[Unit]:
    with sessions() as s:
        return owned_units(s, share)
