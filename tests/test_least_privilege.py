"""Least privilege over real HTTP (issue 11): master data that drives machines changes only
with the admin role, by B2MML as by JSON; each ERP client sees and changes only its own
orders; tokens expire; a token in a query string is refused and never logged.

Every refusal is checked in the database too: the row it would have changed is as it was.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from lxml import etree  # type: ignore[import-untyped, unused-ignore]  # lxml: no type hints
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from mes.auth import authenticate
from mes.launch import Stack, api_server
from mes.models import (
    B2mmlMessage,
    ControllerEndpoint,
    Equipment,
    JobOrder,
    MaterialDefinition,
    MaterialLot,
    OperationsRequest,
    ProcessSegment,
    SegmentRequirement,
    WorkMaster,
)
from tests.conftest import client, fresh_stack, token_client
from tests.test_erp_integration import NS, fresh, post_xml, valid

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
async def line(temporal_env: WorkflowEnvironment) -> AsyncIterator[Stack]:
    """The MES with slow machines (3 s a job), so an order stays open while others poke it."""
    async with fresh_stack(temporal_env, "privilege", cycle_time_s=3) as stack:
        yield stack


async def new_token(stack: Stack, role: str, **extra: Any) -> str:
    async with client(stack, "admin") as admin:
        r = await admin.post(
            "/api/v1/tokens", json={"name": f"{role}-{uuid.uuid4().hex[:8]}", "role": role} | extra
        )
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def sync(noun: str, body: str) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Sync{noun} xmlns="http://www.mesa.org/xml/B2MML" releaseID="7.01">
  <ApplicationArea><Sender><LogicalID>ERP</LogicalID></Sender>
    <CreationDateTime>2030-02-01T00:00:00Z</CreationDateTime>
    <BODID>{uuid.uuid4()}</BODID></ApplicationArea>
  <DataArea><Sync/>{body}</DataArea>
</Sync{noun}>""".encode()


def value(text: str, unit: str = "") -> str:
    return f"<Value><ValueString>{text}</ValueString>" + (
        f"<UnitOfMeasure>{unit}</UnitOfMeasure></Value>" if unit else "</Value>"
    )


def work_unit(unit: str, url: str) -> bytes:
    """A work unit on LINE-1 with its controller's URL."""
    return sync(
        "Equipment",
        f"""<Equipment><ID>{unit}</ID>
          <HierarchyScope><EquipmentID>LINE-1</EquipmentID>
            <EquipmentLevel>ProductionLine</EquipmentLevel></HierarchyScope>
          <EquipmentLevel>WorkUnit</EquipmentLevel>
          <EquipmentProperty><ID>ControllerProtocol</ID>{value("opcua")}</EquipmentProperty>
          <EquipmentProperty><ID>ControllerURL</ID>{value(url)}</EquipmentProperty>
        </Equipment>""",
    )


def work_master(wm: str, mix_time: str) -> bytes:
    return sync(
        "WorkMaster",
        f"""<WorkMaster><ID>{wm}</ID>
          <ParameterSpecification><ID>MixTime</ID>{value(mix_time, "s")}</ParameterSpecification>
          <EquipmentSpecification><ID>E1</ID><EquipmentID>WU-MIXER-1</EquipmentID>
            <EquipmentSpecificationProperty><ID>IdealCycleTime</ID>{value("1.2", "s")}
            </EquipmentSpecificationProperty></EquipmentSpecification>
          <ProcessSegmentID>MIX</ProcessSegmentID></WorkMaster>""",
    )


def confirm_errors(r: httpx.Response) -> list[str]:
    doc = valid(r.content)
    assert etree.QName(doc).localname == "ConfirmBOD"
    return [str(e.text) for e in doc.iter(f"{NS}Description")]


def endpoint(stack: Stack, unit: str) -> tuple[str, str, str] | None:
    with stack.sessions() as s:
        row = s.execute(
            select(ControllerEndpoint.protocol, ControllerEndpoint.url, ControllerEndpoint.machine)
            .join(Equipment, Equipment.id == ControllerEndpoint.equipment_id)
            .where(Equipment.external_id == unit)
        ).one_or_none()
    return None if row is None else (row.protocol, row.url, row.machine)


def parameters(stack: Stack, wm: str) -> dict[str, float] | None:
    with stack.sessions() as s:
        found = s.scalar(
            select(WorkMaster)
            .where(WorkMaster.external_id == wm)
            .options(selectinload(WorkMaster.parameters))
        )
        return None if found is None else {p.name: p.default for p in found.parameters}


# --- master data that drives machines ----------------------------------------------------


async def test_erp_cannot_change_an_endpoint_by_sync_equipment(line: Stack) -> None:
    before = endpoint(line, "WU-MIXER-1")
    assert before is not None
    async with client(line, "erp") as erp:
        r = await post_xml(erp, work_unit("WU-MIXER-1", "opc.tcp://attacker.example:4840/"))
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/xml")
    (error,) = confirm_errors(r)
    assert "role erp may not send SyncEquipment" in error
    assert endpoint(line, "WU-MIXER-1") == before


async def test_admin_syncs_equipment_and_work_masters(line: Stack) -> None:
    unit = f"WU-TEST-{uuid.uuid4().hex[:6]}"
    async with client(line, "admin") as admin:
        made = await post_xml(admin, work_unit(unit, "opc.tcp://10.1.2.3:4840/"))
        assert made.status_code == 200, made.text
        assert confirm_errors(made) == ["SyncEquipment accepted"]
        assert endpoint(line, unit) == ("opcua", "opc.tcp://10.1.2.3:4840/", unit)
        moved = await post_xml(admin, work_unit(unit, "opc.tcp://10.1.2.4:4840/"))
        assert moved.status_code == 200, moved.text
        assert endpoint(line, unit) == ("opcua", "opc.tcp://10.1.2.4:4840/", unit)

        wm = f"WM-TEST-{uuid.uuid4().hex[:6]}"
        recipe = await post_xml(admin, work_master(wm, "400"))
        assert recipe.status_code == 200, recipe.text
        assert parameters(line, wm) == {"MixTime": 400.0}

        # Orders stay the ERP's: an admin token does not post them.
        order = await post_xml(admin, fresh("process-operations-schedule.xml"))
        assert order.status_code == 403, order.text
        assert "may not send ProcessOperationsSchedule" in confirm_errors(order)[0]

    async with client(line, "erp") as erp:
        r = await post_xml(erp, work_unit(unit, "opc.tcp://attacker.example:4840/"))
        assert r.status_code == 403, r.text
        assert endpoint(line, unit) == ("opcua", "opc.tcp://10.1.2.4:4840/", unit)
        r = await post_xml(erp, work_master(wm, "1"))
        assert r.status_code == 403, r.text
        assert parameters(line, wm) == {"MixTime": 400.0}


async def test_erp_cannot_sync_any_master_data_that_drives_machines(line: Stack) -> None:
    recipe = parameters(line, "WM-MIX-WHITE")
    assert recipe is not None
    tag = uuid.uuid4().hex[:6].upper()
    attempts = {
        "WorkMaster": work_master("WM-MIX-WHITE", "1"),
        "ProcessSegment": sync(
            "ProcessSegment", f"<ProcessSegment><ID>PS-{tag}</ID></ProcessSegment>"
        ),
        "OperationsDefinition": sync(
            "OperationsDefinition",
            f"""<OperationsDefinition><ID>OD-{tag}</ID><OperationsSegment><ID>MIX</ID>
              <ProcessSegmentID>MIX</ProcessSegmentID>
              <WorkMasterSourceID>WM-MIX-WHITE</WorkMasterSourceID>
              <MaterialSpecification><ID>1</ID><MaterialDefinitionID>DOUGH-WHITE</MaterialDefinitionID>
              <MaterialUse>Produced</MaterialUse><Quantity><QuantityString>1</QuantityString>
              <UnitOfMeasure>kg</UnitOfMeasure></Quantity></MaterialSpecification>
              </OperationsSegment></OperationsDefinition>""",
        ),
    }
    async with client(line, "erp") as erp:
        for noun, body in attempts.items():
            r = await post_xml(erp, body)
            assert r.status_code == 403, (noun, r.text)
            assert f"may not send Sync{noun}" in confirm_errors(r)[0]
    assert parameters(line, "WM-MIX-WHITE") == recipe
    with line.sessions() as s:
        assert (
            s.scalar(select(ProcessSegment).where(ProcessSegment.external_id == f"PS-{tag}"))
            is None
        )


async def test_erp_syncs_materials_and_lots(line: Stack) -> None:
    material, lot = f"M-{uuid.uuid4().hex[:6]}", f"L-{uuid.uuid4().hex[:6]}"
    async with client(line, "erp") as erp:
        defined = await post_xml(
            erp,
            sync(
                "MaterialDefinition",
                f"""<MaterialDefinition><ID>{material}</ID>
                  <MaterialDefinitionProperty><ID>UnitOfMeasure</ID>{value("kg")}
                  </MaterialDefinitionProperty><MaterialClassID>Raw</MaterialClassID>
                </MaterialDefinition>""",
            ),
        )
        assert defined.status_code == 200, defined.text
        stocked = await post_xml(
            erp,
            sync(
                "MaterialLot",
                f"""<MaterialLot><ID>{lot}</ID><MaterialDefinitionID>{material}
                  </MaterialDefinitionID><Quantity><QuantityString>12.5</QuantityString>
                  <UnitOfMeasure>kg</UnitOfMeasure></Quantity></MaterialLot>""",
            ),
        )
        assert stocked.status_code == 200, stocked.text
    with line.sessions() as s:
        assert (
            s.scalar(
                select(MaterialDefinition.unit).where(MaterialDefinition.external_id == material)
            )
            == "kg"
        )
        assert (
            str(s.scalar(select(MaterialLot.quantity).where(MaterialLot.external_id == lot)))
            == "12.500000"
        )


async def test_json_master_data_stays_admin_only(line: Stack) -> None:
    before = endpoint(line, "WU-MIXER-1")
    evil = {
        "equipment": [
            {
                "id": "WU-MIXER-1",
                "level": "WorkUnit",
                "parent": "LINE-1",
                "endpoint": {"protocol": "opcua", "url": "opc.tcp://attacker.example:4840/"},
            }
        ]
    }
    async with client(line, "erp") as erp:
        r = await erp.post("/api/v1/master-data", json=evil)
    assert r.status_code == 403, r.text
    assert endpoint(line, "WU-MIXER-1") == before


# --- ERP clients are isolated ------------------------------------------------------------


def order_row(stack: Stack, number: str) -> tuple[str, int, str, list[str]]:
    """State, priority, quantity and job states of an order, straight from the database."""
    with stack.sessions() as s:
        order = s.scalar(
            select(OperationsRequest)
            .where(OperationsRequest.external_id == number)
            .options(
                selectinload(OperationsRequest.segment_requirements).selectinload(
                    SegmentRequirement.job_order
                )
            )
        )
        assert order is not None
        jobs = [str(r.job_order.state) for r in order.segment_requirements if r.job_order]
        return str(order.state), order.priority, str(order.quantity), jobs


async def running(stack: Stack, number: str) -> None:
    """Wait until the order's first work order runs on its machine."""
    async with asyncio.timeout(60):
        while True:
            with stack.sessions() as s:
                state = s.scalar(
                    select(JobOrder.state).where(JobOrder.external_id == f"{number}-01")
                )
            if state == "Running":
                return
            await asyncio.sleep(0.2)


def roll_order(number: str) -> dict[str, Any]:
    return {
        "order_number": number,
        "product": "ROLL-6PK",
        "quantity": 6,
        "unit": "ea",
        "due": (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
        "priority": 100,
    }


async def test_an_erp_client_cannot_see_or_touch_another_clients_order(line: Stack) -> None:
    erp_b = await new_token(line, "erp")
    number = f"B-{uuid.uuid4().hex[:6]}"
    async with token_client(line.api_url, erp_b) as b, client(line, "erp") as a:
        posted = await b.post("/api/v1/production-orders", json=roll_order(number))
        assert posted.status_code == 202, posted.text
        order_id = posted.json()["id"]
        await running(line, number)
        before = order_row(line, number)
        assert before[0] == "Running"

        # Reading: another's order is not there for A; B and the other roles see it.
        for path in (
            f"/{order_id}",
            f"/{order_id}/performance",
            f"/{order_id}/performance?format=b2mml",
        ):
            r = await a.get(f"/api/v1/production-orders{path}")
            assert r.status_code == 404, (path, r.text)
            assert number not in r.text
            assert (await b.get(f"/api/v1/production-orders{path}")).status_code == 200
        listed = (await a.get("/api/v1/production-orders", params={"limit": 1000})).json()
        assert number not in {o["order_number"] for o in listed}
        assert number in {
            o["order_number"] for o in (await b.get("/api/v1/production-orders")).json()
        }
        for role in ("supervisor", "auditor"):
            async with client(line, role) as other:
                assert (await other.get(f"/api/v1/production-orders/{order_id}")).status_code == 200
                seen = (await other.get("/api/v1/production-orders")).json()
                assert number in {o["order_number"] for o in seen}

        # Posting B's number again, even with B's very body: a conflict that tells nothing.
        again = await a.post("/api/v1/production-orders", json=roll_order(number))
        assert again.status_code == 409, again.text
        assert again.headers["content-type"].startswith("application/problem+json")
        assert again.json()["detail"] == (
            f"order number {number!r} is taken; an order number can be used once"
        )

        # Changing and cancelling by B2MML: refused as for an unknown order, nothing changes.
        change = await post_xml(a, fresh("change-operations-schedule.xml", PO_2030_0001=number))
        assert change.status_code == 409, change.text
        assert f"unknown order {number}" in change.text
        cancel = await post_xml(a, fresh("cancel-operations-schedule.xml", PO_2030_0002=number))
        assert cancel.status_code == 409, cancel.text
        assert f"no production order '{number}'" in confirm_errors(cancel)[0]
        resync = await post_xml(
            a,
            fresh(
                "process-operations-schedule.xml", PO_2030_0001=number, PO_2030_0002=number + "-2"
            )
            .replace(b"ProcessOperationsSchedule", b"SyncOperationsSchedule")
            .replace(b'<Process acknowledgeCode="Always"/>', b"<Sync/>"),
        )
        assert resync.status_code == 422, resync.text
        assert b"is taken" in resync.content

        await asyncio.sleep(1)  # a cancel that got through would show by now
        after = order_row(line, number)
        assert after[:3] == before[:3]  # state, priority, quantity
        assert "Cancelled" not in after[3]
        assert "Aborted" not in after[3]
        handle = line.temporal.get_workflow_handle(f"order-{number}")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        # B itself cancels its order: its own orders are its to change.
        mine = await post_xml(b, fresh("cancel-operations-schedule.xml", PO_2030_0002=number))
        assert mine.status_code == 200, mine.text
        async with asyncio.timeout(60):
            while order_row(line, number)[0] != "Cancelled":
                await asyncio.sleep(0.2)


async def test_a_bodid_of_another_client_replays_nothing(line: Stack) -> None:
    erp_b = await new_token(line, "erp")
    number = f"BOD-{uuid.uuid4().hex[:6]}"
    message = fresh("cancel-operations-schedule.xml", PO_2030_0002=number)
    async with client(line, "erp") as a, token_client(line.api_url, erp_b) as b:
        first = await post_xml(a, message)
        assert first.status_code == 409, first.text
        assert (await post_xml(a, message)).content == first.content  # A's retry: A's answer
        other = await post_xml(b, message)
    assert other.status_code == 409, other.text  # B's own message, answered for B
    bod_id = etree.fromstring(message).findtext(f".//{NS}BODID")
    with line.sessions() as s:
        names = [authenticate(s, t) for t in (line.tokens["erp"], erp_b)]
        clients = s.scalars(select(B2mmlMessage.client).where(B2mmlMessage.bod_id == bod_id))
        assert sorted(clients) == sorted(p.name for p in names if p is not None)


# --- tokens ------------------------------------------------------------------------------


async def test_an_expired_token_is_refused(line: Stack) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=2)
    token = await new_token(line, "auditor", expires_at=soon.isoformat())
    async with token_client(line.api_url, token) as auditor:
        assert (await auditor.get("/api/v1/audit-events")).status_code == 200
        await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.5)
        r = await auditor.get("/api/v1/audit-events")
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "expired" in r.json()["detail"]
    async with client(line, "admin") as admin:
        listed = (await admin.get("/api/v1/tokens")).json()
        past = await admin.post(
            "/api/v1/tokens",
            json={
                "name": f"late-{uuid.uuid4().hex[:6]}",
                "role": "erp",
                "expires_at": "2020-01-01T00:00:00Z",
            },
        )
        naive = await admin.post(
            "/api/v1/tokens",
            json={
                "name": f"late-{uuid.uuid4().hex[:6]}",
                "role": "erp",
                "expires_at": "2040-01-01T00:00:00",
            },
        )
    expired = [t for t in listed if t["expired"]]
    assert expired
    assert all(
        set(t) == {"name", "role", "created_at", "revoked_at", "expires_at", "expired"}
        for t in listed
    )
    assert past.status_code == 422, past.text
    assert past.json()["errors"][0]["field"] == "expires_at"
    assert naive.status_code == 400, naive.text


async def test_a_token_in_the_query_string_is_refused(line: Stack) -> None:
    token = line.tokens["auditor"]
    async with httpx.AsyncClient(base_url=line.api_url, timeout=30) as http:
        for param in ("token", "access_token"):
            r = await http.get("/api/v1/audit-events", params={param: token})
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["errors"] == [
                {
                    "field": param,
                    "reason": "a token is accepted in the Authorization header alone, "
                    "never in the URL",
                }
            ]
            assert token not in r.text
        with_header = await http.get(
            "/api/v1/audit-events",
            params={"token": token},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert with_header.status_code == 400, with_header.text


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_access_log_never_shows_a_query_string(line: Stack) -> None:
    lines = _Lines()
    access = logging.getLogger("uvicorn.access")
    secret = "mes_query-secret-" + uuid.uuid4().hex
    async with api_server(line.settings, line.sessions, line.temporal, log_level="info") as url:
        access.addHandler(lines)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                r = await http.get("/api/v1/production-orders", params={"access_token": secret})
                assert r.status_code == 400
                assert (await http.get("/health", params={"token": secret})).status_code == 200
        finally:
            access.removeHandler(lines)
    assert any("/api/v1/production-orders" in line_ and " 400" in line_ for line_ in lines.lines), (
        lines.lines
    )
    assert any("/health" in line_ for line_ in lines.lines), lines.lines
    assert not any(secret in line_ or "?" in line_ for line_ in lines.lines), lines.lines
