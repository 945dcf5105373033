"""Schemathesis over every operation of the OpenAPI document, with a token of each role,
against the real API (uvicorn on a free port, PostgreSQL with the sample plant, the Temporal
dev server, a worker and the PLC simulator).

Every check runs (``tests/fuzz.toml``): no 5xx, no undocumented status or content type, every
response matching its schema, schema-invalid input refused, schema-valid input accepted,
authentication enforced. A bounded number of cases per operation keeps it to about a
minute; the seed is fixed, so CI is repeatable. Another run, by hand::

    MES_FUZZ_SEED=4711 MES_FUZZ_EXAMPLES=200 uv run pytest tests/test_fuzz.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from mes.cli import OPENAPI_FILE
from mes.launch import Stack, embedded_stack
from mes.settings import Settings
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.postgres

ROLES = ("erp", "supervisor", "auditor", "admin")
SEED = int(os.environ.get("MES_FUZZ_SEED", "20240501"))
CONFIG = Path(__file__).with_name("fuzz.toml")
EXAMPLES = int(os.environ.get("MES_FUZZ_EXAMPLES", "5"))


@contextlib.contextmanager
def stack_in_a_thread(settings: Settings, temporal_address: str) -> Iterator[Stack]:
    """The embedded stack on an event loop of its own, in a thread, so that it serves while
    the test blocks on the fuzzer (a subprocess); stopped on exit."""
    started: list[Stack] = []
    failed: list[BaseException] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            client = await Client.connect(temporal_address)
            async with embedded_stack(
                settings, temporal_ui=False, temporal_client=client, cycle_time_s=0.3
            ) as stack:
                started.append(stack)
                ready.set()
                await stop.wait()
        except BaseException as e:
            failed.append(e)
            raise
        finally:
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="fuzz-stack")
    thread.start()
    ready.wait(120)
    try:
        if failed or not started:
            raise RuntimeError("the stack did not start") from (failed[0] if failed else None)
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


@pytest.fixture(scope="module")
async def temporal_address(temporal_env: WorkflowEnvironment) -> str:
    return temporal_env.client.service_client.config.target_host


@pytest.fixture(scope="module")
def fuzzed(temporal_address: str) -> Iterator[Stack]:
    """A stack of its own on a database of its own: the fuzzer's orders, holds and tokens
    touch no other test's data."""
    for url in fresh_pg_database("mes_fuzz"):
        settings = Settings(database_url=url, task_queue="mes-fuzz", plc_poll_seconds=0.1)
        with stack_in_a_thread(settings, temporal_address) as stack:
            yield stack


@pytest.mark.parametrize("role", ROLES)
def test_every_operation_survives_the_fuzzer(fuzzed: Stack, role: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG)),
        *("run", str(OPENAPI_FILE)),
        *("--url", fuzzed.api_url),
        *("--header", f"Authorization: Bearer {fuzzed.tokens[role]}"),
        *("--phases", "examples,coverage,fuzzing"),
        *("--max-examples", str(EXAMPLES), "--seed", str(SEED)),
        *("--workers", "1", "--request-timeout", "30"),
        *("--report", "json", "--report-json-path", str(report)),
    ]
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=3600, check=False
    )
    summary = run.stdout[run.stdout.rfind("SUMMARY") :] if "SUMMARY" in run.stdout else ""
    print(f"\n{role}: seed {SEED}, {EXAMPLES} examples per operation\n{summary}")
    assert run.returncode == 0, f"the fuzzer found failures as {role}:\n{run.stdout[-20000:]}"
    assert json.loads(report.read_text()), "no report written"
