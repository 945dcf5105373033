"""The embedded stack as ``mes dev --secure`` runs it: its PLC simulator requires Basic256Sha256
SignAndEncrypt, a client certificate it trusts and a user name and password; an order still
runs to Completed, the master data names each endpoint's security and no answer shows a
secret."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from adapters.opcua.client import JobControlClient
from mes.launch import DEV_OPCUA_SECURITY, Stack, embedded_stack
from mes.machines import MachineSecurityError
from mes.masterdata import MasterDataError, parse_plant
from mes.settings import Settings


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure-dev")


@pytest.fixture(scope="module")
async def secure_stack(folder: Path, temporal_env: WorkflowEnvironment) -> AsyncIterator[Stack]:
    settings = Settings(
        database_url=f"sqlite:///{folder / 'mes.db'}",
        task_queue="mes-secure-test",
        plc_poll_seconds=0.1,
    )
    async with embedded_stack(
        settings,
        cycle_time_s=0.2,
        temporal_ui=False,
        temporal_client=temporal_env.client,
        erp_format=None,
        opcua_pki=folder / "pki",
    ) as stack:
        yield stack


def api(stack: Stack, role: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.api_url,
        timeout=60,
        headers={"Authorization": f"Bearer {stack.tokens[role]}"},
    )


async def test_an_order_runs_through_the_secured_simulator(secure_stack: Stack) -> None:
    async with api(secure_stack, "erp") as http:
        body = {
            "order_number": "SECURE-1",
            "product": "ROLL-6PK",
            "quantity": 6,
            "unit": "ea",
            "due": (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
            "priority": 100,
        }
        r = await http.post("/api/v1/production-orders", json=body)
        assert r.status_code == 202, r.text
        order_id = r.json()["id"]
        async with asyncio.timeout(90):
            while (order := (await http.get(f"/api/v1/production-orders/{order_id}")).json())[
                "state"
            ] not in ("Completed", "Aborted", "Held"):
                await asyncio.sleep(0.2)
    assert order["state"] == "Completed", order
    assert [j["state"] for j in order["job_orders"]] == ["Completed"] * 3


async def test_the_simulator_refuses_a_session_without_security(secure_stack: Stack) -> None:
    with pytest.raises(MachineSecurityError, match="offers no endpoint with security None"):
        async with JobControlClient(secure_stack.plc_url, secure_stack.units[0]):
            pass


async def test_endpoints_name_their_security_and_no_answer_shows_a_secret(
    secure_stack: Stack, folder: Path
) -> None:
    pki = folder / "pki"
    secret = (pki / "opcua-password").read_text()
    for name in ("opcua-password", "mes-key.pem", "simulator-key.pem"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    async with api(secure_stack, "admin") as admin, api(secure_stack, "auditor") as auditor:
        tree = (await admin.get("/api/v1/equipment")).json()
        seen = json.dumps(tree)
        assert f'"security": "{DEV_OPCUA_SECURITY}"' in seen
        audit = await auditor.get("/api/v1/audit-events", params={"limit": 500})
        assert audit.status_code == 200, audit.text
        assert secret not in seen
        assert secret not in audit.text
        assert "password_file" not in seen  # settings stay in

        # A literal password is refused, named, and not echoed.
        literal = "hunter2-literal-password"
        plant = {
            "equipment": [
                {
                    "id": "SECURE-SITE",
                    "level": "Site",
                    "children": [
                        {
                            "id": "SECURE-WU",
                            "level": "WorkUnit",
                            "endpoint": {
                                "protocol": "opcua",
                                "url": "opc.tcp://plc.example:4840/",
                                "security": DEV_OPCUA_SECURITY,
                                "settings": {"user": "mes", "password": literal},
                            },
                        }
                    ],
                }
            ]
        }
        refused = await admin.post("/api/v1/master-data", json=plant)
        assert refused.status_code == 422, refused.text
        assert literal not in refused.text
        fields = {e["field"]: e["reason"] for e in refused.json()["errors"]}
        where = "equipment[0] (SECURE-SITE).children[0] (SECURE-WU).endpoint"
        assert "master data does not hold passwords" in fields[f"{where}.settings.password"]

        # Named by reference, it loads; the answer shows the security only.
        endpoint = plant["equipment"][0]["children"][0]["endpoint"]  # type: ignore[index]
        endpoint["settings"] = {
            "certificate": "pki/mes-cert.der",
            "private_key": "pki/mes-key.pem",
            "server_certificate": "pki/plc-cert.der",
            "user": "mes",
            "password_env": "PLC_PASSWORD",
        }
        loaded = await admin.post("/api/v1/master-data", json=plant)
        assert loaded.status_code in (200, 201), loaded.text
        tree = (await admin.get("/api/v1/equipment")).json()
        site = next(n for n in tree if n["id"] == "SECURE-SITE")
        assert site["children"][0]["endpoint"] == {
            "protocol": "opcua",
            "url": "opc.tcp://plc.example:4840/",
            "machine": "SECURE-WU",
            "security": DEV_OPCUA_SECURITY,
        }


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        (
            {"security": "Basic256Sha256"},
            "endpoint.security: 'Basic256Sha256' is not one of None, Basic256Sha256-Sign, "
            "Basic256Sha256-SignAndEncrypt",
        ),
        (
            {"security": "Basic256Sha256-Sign", "settings": {"user": "mes", "password_env": "P"}},
            "endpoint.settings: Basic256Sha256-Sign needs certificate, private_key, "
            "server_certificate",
        ),
        ({"settings": {"user": "mes"}}, "endpoint.settings.user: needs exactly one of"),
        ({"settings": {"password_file": "pw"}}, "endpoint.settings.password_file: a password"),
        ({"settings": {"pasword_env": "P"}}, "endpoint.settings.pasword_env: Extra inputs"),
    ],
)
def test_an_opcua_endpoint_names_its_security_correctly(
    endpoint: dict[str, Any], problem: str
) -> None:
    node: dict[str, Any] = {"id": "WU", "level": "WorkUnit"}
    node["endpoint"] = {"protocol": "opcua", "url": "opc.tcp://plc:4840/"} | endpoint
    with pytest.raises(MasterDataError) as caught:
        parse_plant({"equipment": [node]}, partial=True)
    assert any(p.startswith(f"equipment[0] (WU).{problem}") for p in caught.value.problems), (
        caught.value.problems
    )
