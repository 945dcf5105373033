"""ERP integration end to end: B2MML orders in (written against the XSDs, not by our code),
orders run to completion, every report the MES sends validates against the official XSDs,
and an ERP that is away for a while gets every message exactly once, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from lxml import etree  # type: ignore[import-untyped, unused-ignore]  # lxml: no type hints
from sqlalchemy import func, select

from mes.b2mml import schema
from mes.launch import Stack
from mes.models import ErpMessage, OperationsRequest
from tests.conftest import client, order_final

pytestmark = pytest.mark.postgres
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "b2mml"
NS = "{http://www.mesa.org/xml/B2MML}"


def fresh(name: str, **ids: str) -> bytes:
    """An example message with new order numbers and a new BODID."""
    text = (EXAMPLES / name).read_text()
    for old, new in ids.items():
        text = text.replace(old.replace("_", "-"), new)
    root = etree.fromstring(text.encode())
    bod = root.find(f"{NS}ApplicationArea/{NS}BODID")
    assert bod is not None
    bod.text = str(uuid.uuid4())
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def valid(xml: bytes) -> etree._Element:
    doc = etree.fromstring(xml)
    assert schema().validate(doc), schema().error_log
    return doc


async def post_xml(http: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await http.post(
        "/api/v1/b2mml", content=body, headers={"content-type": "application/xml"}
    )


def order_ids(stack: Stack, numbers: list[str]) -> dict[str, int]:
    with stack.sessions() as s:
        rows = s.execute(
            select(OperationsRequest.external_id, OperationsRequest.id).where(
                OperationsRequest.external_id.in_(numbers)
            )
        ).all()
    return dict(rows)


async def test_b2mml_orders_run_and_every_report_is_valid(stack: Stack) -> None:
    a, b = f"B2-{uuid.uuid4().hex[:6]}-1", f"B2-{uuid.uuid4().hex[:6]}-2"
    body = fresh("process-operations-schedule.xml", PO_2030_0001=a, PO_2030_0002=b)
    async with client(stack, "erp") as erp:
        r = await post_xml(erp, body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/xml")
        ack = valid(r.content)
        assert etree.QName(ack).localname == "AcknowledgeOperationsSchedule"

        again = await post_xml(erp, body)  # the same BODID: the same answer, nothing new
        assert again.status_code == 200
        assert again.content == r.content
        ids = order_ids(stack, [a, b])
        assert set(ids) == {a, b}

        first = (await erp.get(f"/api/v1/production-orders/{ids[a]}")).json()
        assert (first["product"], first["quantity"], first["unit"]) == ("BREAD-WHITE", 500, "ea")
        assert first["priority"] == 5
        assert first["due"].startswith("2030-03-01T13:00:00")  # 14:00+01:00
        second = (await erp.get(f"/api/v1/production-orders/{ids[b]}")).json()
        assert second["product"] == "ROLL-6PK"
        assert second["priority"] == 3

        for number in (a, b):
            assert (await order_final(erp, ids[number], 90))["state"] == "Completed"

        perf = await erp.get(f"/api/v1/production-orders/{ids[b]}/performance?format=b2mml")
        doc = valid(perf.content)
        segments = doc.findall(f".//{NS}SegmentResponse")
        assert len(segments) == 3
        assert doc.findall(f".//{NS}MaterialActual")

    # The ERP receiver got B2MML for both orders; every message is XSD-valid.
    assert stack.erp is not None
    async with asyncio.timeout(30):
        while {m.order_number for m in stack.erp.messages if "Completed" in m.text} < {a, b}:
            await asyncio.sleep(0.2)
    for m in stack.erp.messages:
        if m.order_number in (a, b):
            valid(m.body)


async def test_change_before_start_and_refused_once_running(stack: Stack) -> None:
    n = f"B2-{uuid.uuid4().hex[:6]}"
    async with client(stack, "erp") as erp, client(stack, "supervisor") as sup:
        r = await post_xml(
            erp, fresh("process-operations-schedule.xml", PO_2030_0001=n, PO_2030_0002=n + "-b")
        )
        assert r.status_code == 200, r.text
        ids = order_ids(stack, [n, n + "-b"])
        await order_final(erp, ids[n], 90)
        change = fresh("change-operations-schedule.xml", PO_2030_0001=n, PO_2030_0002=n + "-b")
        refused = await post_xml(erp, change)
        doc = valid(refused.content)
        assert etree.QName(doc).localname == "RespondOperationsSchedule"
        assert refused.status_code == 409
        assert b"cannot change" in refused.content
        await order_final(erp, ids[n + "-b"], 90)
        del sup


@pytest.mark.parametrize(
    "body",
    [
        b"<not-xml",
        b'<?xml version="1.0"?><ProcessOperationsSchedule xmlns="http://www.mesa.org/xml/B2MML"/>',
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">'
        b"]><l>&b;</l>",
    ],
)
async def test_bad_and_hostile_xml_gets_confirm_bod_and_creates_nothing(
    stack: Stack, body: bytes
) -> None:
    with stack.sessions() as s:
        before = s.scalar(select(func.count()).select_from(OperationsRequest))
    async with client(stack, "erp") as erp:
        r = await post_xml(erp, body)
    assert r.status_code == 400
    doc = valid(r.content)
    assert etree.QName(doc).localname == "ConfirmBOD"
    with stack.sessions() as s:
        assert s.scalar(select(func.count()).select_from(OperationsRequest)) == before


async def test_unknown_product_in_b2mml_creates_nothing(stack: Stack) -> None:
    n = f"B2-{uuid.uuid4().hex[:6]}"
    body = fresh("process-operations-schedule.xml", PO_2030_0001=n, PO_2030_0002=n + "-b")
    body = body.replace(b"<MaterialDefinitionID>BREAD-WHITE<", b"<MaterialDefinitionID>NOPE<")
    async with client(stack, "erp") as erp:
        r = await post_xml(erp, body)
    assert r.status_code == 422
    assert b"NOPE" in r.content
    valid(r.content)
    assert order_ids(stack, [n, n + "-b"]) == {}


async def test_erp_away_for_a_while_gets_every_message_once_in_order(stack: Stack) -> None:
    erp_rx = stack.erp
    assert erp_rx is not None
    numbers: list[str] = []
    await erp_rx.stop()
    try:
        async with client(stack, "erp") as erp:
            for _ in range(3):
                n = f"OUT-{uuid.uuid4().hex[:6]}"
                r = await erp.post(
                    "/api/v1/production-orders",
                    json={
                        "order_number": n,
                        "product": "BREAD-WHITE",
                        "quantity": 4,
                        "unit": "ea",
                        "due": "2031-01-01T00:00:00Z",
                        "priority": 1,
                    },
                )
                assert r.status_code == 202
                numbers.append(n)
            ids = order_ids(stack, numbers)
            for n in numbers:  # production goes on while the ERP is away
                assert (await order_final(erp, ids[n], 90))["state"] == "Completed"
        with stack.sessions() as s:
            waiting = s.scalar(
                select(func.count())
                .select_from(ErpMessage)
                .where(
                    ErpMessage.operations_request_id.in_(ids.values()),
                    ErpMessage.delivered_at.is_(None),
                )
            )
            tried = s.scalar(
                select(func.max(ErpMessage.attempts)).where(
                    ErpMessage.operations_request_id.in_(ids.values())
                )
            )
        assert waiting == 9  # released, running, completed for each order
        assert tried
        assert tried >= 1
    finally:
        await erp_rx.start()  # back on the same port

    async with asyncio.timeout(120):
        while sum(1 for m in erp_rx.messages if m.order_number in numbers) < 9:
            await asyncio.sleep(0.3)
    per_order: dict[str, list[str]] = defaultdict(list)
    for m in erp_rx.messages:
        if m.order_number in numbers and not m.duplicate:
            per_order[m.order_number or ""].append(m.message_id)
    for n in numbers:
        assert per_order[n] == [f"MES-{n}-000{i}" for i in (1, 2, 3)]


async def test_master_data_by_b2mml_sync_and_by_json(stack: Stack) -> None:
    from mes.models import MaterialDefinition

    body = fresh("sync-material-definition.xml")
    async with client(stack, "erp") as erp, client(stack, "admin") as admin:
        r = await post_xml(erp, body)
        assert r.status_code == 200, r.text
        assert etree.QName(valid(r.content)).localname == "ConfirmBOD"
        synced = {
            el.text
            for el in etree.fromstring(body).iter(f"{NS}MaterialDefinition")
            for el in el.findall(f"{NS}ID")
        }
        with stack.sessions() as s:
            stored = set(
                s.scalars(
                    select(MaterialDefinition.external_id).where(
                        MaterialDefinition.external_id.in_(synced)
                    )
                )
            )
        assert stored == synced

        good = {"materials": [{"id": "SESAME", "material_class": "Raw", "unit": "kg"}]}
        loaded = await admin.post("/api/v1/master-data", json=good)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["created"] == 1
        again = await admin.post("/api/v1/master-data", json=good)
        assert again.json() == {"created": 0, "updated": 0, "unchanged": 1, "deleted": 0}
        bad = {"materials": [{"id": "POPPY", "material_class": "NoSuchClass", "unit": "kg"}]}
        refused = await admin.post("/api/v1/master-data", json=bad)
        assert refused.status_code == 422
        assert "POPPY" in refused.json()["detail"]
        assert refused.headers["content-type"].startswith("application/problem+json")
        audit = (
            await client(stack, "auditor").get(
                "/api/v1/audit-events", params={"object_id": "SESAME"}
            )
        ).json()["items"]
        assert audit
        assert audit[0]["actor"].endswith("(admin)")


FIXTURES = Path(__file__).resolve().parent / "b2mml" / "fixtures"


def third_party(name: str, number: str) -> bytes:
    """A third-party-shaped fixture with a new order number and BODID."""
    text = (FIXTURES / name).read_text()
    for old in ("ACME-4711", "ACME-4712"):
        text = text.replace(old, number)
    for old in ("ACME-BOD-0001", "ACME-BOD-0002"):
        text = text.replace(old, f"ACME-{uuid.uuid4()}")
    return text.encode()


async def test_third_party_schedule_runs_with_the_erps_ids_and_lots(stack: Stack) -> None:
    n = f"AC-{uuid.uuid4().hex[:6]}"
    async with client(stack, "erp") as erp:
        refused = await post_xml(erp, third_party("third-party-unknown-operation.xml", n + "-x"))
        assert refused.status_code == 422, refused.text
        doc = valid(refused.content)
        assert etree.QName(doc).localname == "AcknowledgeOperationsSchedule"
        assert b"GLAZE" in refused.content
        assert doc.findtext(f".//{NS}OriginalApplicationArea/{NS}Sender/{NS}LogicalID") == (
            "ACME-ERP-PRD"
        )
        with stack.sessions() as s:
            assert (
                s.scalar(
                    select(func.count())
                    .select_from(OperationsRequest)
                    .where(OperationsRequest.external_id == n + "-x")
                )
                == 0
            )

        r = await post_xml(erp, third_party("third-party-schedule.xml", n))
        assert r.status_code == 200, r.text
        ack = valid(r.content)
        assert ack.findtext(f".//{NS}OriginalApplicationArea/{NS}BODID", "").startswith("ACME-")
        ids = order_ids(stack, [n])
        order = await order_final(erp, ids[n], 90)
        assert order["state"] == "Completed"
        assert (order["quantity"], order["unit"]) == (12, "ea")  # not the rate 41.9 EA/H
        assert order["job_orders"][0]["equipment"] == "WU-MIXER-2"

        perf = await erp.get(f"/api/v1/production-orders/{ids[n]}/performance?format=b2mml")
        doc = valid(perf.content)
        assert doc.findtext(f".//{NS}OperationsScheduleID") == "ACME-SCHED-77"
        segments = doc.findall(f".//{NS}SegmentResponse")
        assert [s.findtext(f"{NS}SegmentRequirementID") for s in segments] == [
            "0010",
            "0020",
            "0030",
        ]
        assert all(s.findtext(f"{NS}JobResponseID") for s in segments)
        data = (await erp.get(f"/api/v1/production-orders/{ids[n]}/performance")).json()
        pack = data["segments"][2]
        consumed = [
            (m["lot_id"], m["quantity"])
            for m in pack["material_actuals"]
            if m["material_definition_id"] == "BAG-6PK"
        ]
        assert consumed == [("LOT-BAG6-0002", 12)]
