"""The long-running commands of ``mes.launch``: the PLC simulator and the ERP receiver as
``mes sim opcua`` / ``mes sim erp`` run them, in process and as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from adapters.erp.client import deliver
from adapters.opcua.client import JobControlClient
from mes.callbacks import LOOPBACK, CallbackPolicy
from mes.launch import free_port, run_erp_receiver, run_plc_simulator, sim_unit_specs

MES = str(Path(sys.executable).parent / "mes")
XML = "application/xml"
DOC = b'<?xml version="1.0"?><SyncOperationsPerformance releaseID="7.1"/>'


async def _wait_for_port(port: int, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


def test_sim_unit_specs_name_the_given_units_first() -> None:
    specs = sim_unit_specs(3, 1.5, ["Kiln"])
    assert [(s.name, s.cycle_time_s) for s in specs] == [
        ("Kiln", 1.5),
        ("Unit2", 1.5),
        ("Unit3", 1.5),
    ]
    assert [s.name for s in sim_unit_specs(1, 1.0, ["A", "B"])] == ["A", "B"]


async def test_run_plc_simulator_serves_named_units_until_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(run_plc_simulator(2, 0, 0.4, ["Kiln"]))
    out = ""
    async with asyncio.timeout(10):
        while "Unit2" not in out:
            await asyncio.sleep(0.05)
            out += capsys.readouterr().out
    url = next(word for word in out.split() if word.startswith("opc.tcp://"))
    for machine in ("Kiln", "Unit2"):
        async with JobControlClient(url, machine) as client:
            assert await client.list_jobs() == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


ALLOW_LOOPBACK = CallbackPolicy.allowing(LOOPBACK)


async def test_run_erp_receiver_prints_one_line_per_callback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/callbacks"
    task = asyncio.create_task(run_erp_receiver(port, tmp_path / "erp.jsonl"))
    try:
        await _wait_for_port(port)
        for _ in range(2):
            await deliver(
                url, DOC, XML, "BOD-42", "PO-9", signing_secret="s", policy=ALLOW_LOOPBACK
            )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    out = capsys.readouterr().out.splitlines()
    assert url in out[0]
    callbacks = [line for line in out if line.startswith("#")]
    assert len(callbacks) == 2
    assert callbacks[0].startswith("#1 ")
    for part in ("order=PO-9", "id=BOD-42", XML, "<?xml", "SyncOperationsPerformance"):
        assert part in callbacks[0]
    assert "DUPLICATE" in callbacks[1]
    assert "DUPLICATE" not in callbacks[0]


async def test_mes_sim_erp_records_a_callback_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "erp.jsonl"
    proc = await asyncio.create_subprocess_exec(
        MES,
        "sim",
        "erp",
        "--port",
        str(port),
        "--store",
        str(store),
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        callback_url = f"http://127.0.0.1:{port}/callbacks"
        assert callback_url in banner, banner
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(
                callback_url,
                content=DOC,
                headers={
                    "Content-Type": XML,
                    "X-Message-Id": "BOD-1",
                    "X-Order-Number": "PO-1",
                },
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"seq": 1, "message_id": "BOD-1", "duplicate": False}
            [listed] = (await http.get(f"http://127.0.0.1:{port}/messages")).json()
        assert (listed["message_id"], listed["order_number"]) == ("BOD-1", "PO-1")
        assert "SyncOperationsPerformance" in listed["body"]
        assert "BOD-1" in store.read_text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, rest
    assert "#1 " in rest
    assert "id=BOD-1" in rest
