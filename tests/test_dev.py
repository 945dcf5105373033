"""`mes dev` as a user runs it: on a fresh PostgreSQL database, an order reaches Completed,
its lot traces back to raw lots, an independent OPC UA client finds the job on the work
unit's JobOrderList, and SIGTERM stops every child."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from asyncua.client.client import Client

from adapters.opcua.model import JOBCONTROL_NS_URI
from adapters.opcua.simulator import SIM_NAMESPACE_URI
from mes.launch import free_port
from mes.migrate import AppRole
from tests.conftest import as_role, fresh_pg_database

pytestmark = pytest.mark.postgres
MES = str(Path(sys.executable).parent / "mes")


async def _read_until(stream: asyncio.StreamReader, marker: str) -> list[str]:
    lines: list[str] = []
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"mes dev ended before {marker!r}: {lines}")
        line = raw.decode().rstrip()
        lines.append(line)
        if line == marker:
            return lines


async def test_mes_dev_runs_an_order_on_postgres_and_stops_cleanly(
    app_role: AppRole, tmp_path: Path
) -> None:
    for url in fresh_pg_database("mes_dev"):
        port = free_port()
        # Migrated as the owner, run as this test session's app role.
        env = {
            "MES_DATABASE_URL": as_role(url, app_role),
            "MES_MIGRATION_DATABASE_URL": url,
            "MES_DATABASE_APP_ROLE": app_role.name,
            "MES_DATABASE_APP_PASSWORD": app_role.password or "",
            "MES_AUDIT_KEY_FILE": str(tmp_path / "audit-key.pem"),
            "MES_AUDIT_CHECKPOINTS": str(tmp_path / "audit-checkpoints.jsonl"),
            "MES_PLC_POLL_SECONDS": "0.2",
        }
        proc = await asyncio.create_subprocess_exec(
            MES,
            "dev",
            "--port",
            str(port),
            env=os.environ | env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(90):
                lines = await _read_until(proc.stdout, "ready")
            text = "\n".join(lines)
            assert f"http://127.0.0.1:{port}/api/v1" in text
            assert f"http://127.0.0.1:{port}/schema" in text
            plc = re.search(r"PLCs\s+(opc\.tcp://\S+)", text)
            temporal_ui = re.search(r"UI: (http://\S+)", text)
            assert plc, text
            assert temporal_ui, text

            tokens = dict(
                re.findall(r"^\s+(erp|supervisor|auditor|admin)\s+(mes_\S+)$", text, re.M)
            )
            assert set(tokens) == {"erp", "supervisor", "auditor", "admin"}, text
            number = f"DEV-{uuid.uuid4().hex[:6]}"
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=30,
                headers={"Authorization": f"Bearer {tokens['erp']}"},
            ) as http:
                products = [p["id"] for p in (await http.get("/api/v1/products")).json()]
                body = {
                    "order_number": number,
                    "product": products[0],
                    "quantity": 5,
                    "unit": "ea",
                    "due": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
                    "priority": 10,
                }
                r = await http.post("/api/v1/production-orders", json=body)
                assert r.status_code == 202, r.text
                order_id = r.json()["id"]
                async with asyncio.timeout(90):
                    while (
                        order := (await http.get(f"/api/v1/production-orders/{order_id}")).json()
                    )["state"] not in ("Completed", "Aborted"):
                        await asyncio.sleep(0.3)
                assert order["state"] == "Completed"
                lot = order["produced_lots"][0]["lot"]
                trace = (
                    await http.get(
                        f"/api/v1/genealogy/lots/{lot}/backward",
                        headers={"Authorization": f"Bearer {tokens['auditor']}"},
                    )
                ).json()
                raw_lots = {
                    n["lot"] for n in trace["lots"] if not n["lot"].startswith(f"LOT-{number}")
                }
                assert raw_lots, trace
                assert all(n["depth"] >= 1 for n in trace["lots"] if n["lot"] in raw_lots)

            last_job = order["job_orders"][-1]
            async with Client(plc.group(1)) as opcua:
                await opcua.load_data_type_definitions()
                jc = await opcua.get_namespace_index(JOBCONTROL_NS_URI)
                sim = await opcua.get_namespace_index(SIM_NAMESPACE_URI)
                job_list = await opcua.nodes.objects.get_child(
                    [
                        f"{sim}:{last_job['equipment']}",
                        f"{sim}:JobManagement",
                        f"{sim}:JobOrderControl",
                        f"{jc}:JobOrderList",
                    ]
                )
                entries = {e.JobOrder.JobOrderID: e for e in await job_list.read_value() or []}
                # Recorded, so cleared from the PLC (OPC 10031-4: the client clears ended jobs).
                assert last_job["id"] not in entries
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.stdout.read(), 60)
            code = await asyncio.wait_for(proc.wait(), 60)
        assert code == 0, rest.decode()
        assert b"stopped" in rest
        # The worker signed the audit chain outside the database, at the latest on its way out.
        assert (tmp_path / "audit-checkpoints.jsonl").read_text().count('"signature"') >= 1
        # The embedded Temporal server (a child of mes dev) is gone with it.
        async with httpx.AsyncClient(timeout=2) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(temporal_ui.group(1))
