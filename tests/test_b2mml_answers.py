"""Every answer of ``POST /api/v1/b2mml`` echoes the message it answers and validates, and
the ERP's stock lots (SyncMaterialLot) are what its orders then consume; on the stack."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree  # type: ignore[import-untyped, unused-ignore]  # lxml: no type hints
from sqlalchemy import func, select

from mes.launch import Stack
from mes.models import AuditEvent, MaterialLot
from tests.conftest import client, order_final
from tests.test_erp_integration import (
    EXAMPLES,
    NS,
    order_ids,
    post_xml,
    third_party,
    valid,
)

pytestmark = pytest.mark.postgres
FIXTURES = Path(__file__).resolve().parent / "b2mml" / "fixtures"
CREATED = "2031-01-02T03:04:05Z"


def envelope(noun: str, body: str, verb: str = "<Sync/>") -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<{noun} xmlns="http://www.mesa.org/xml/B2MML" releaseID="7.01">
  <ApplicationArea><Sender><LogicalID>X</LogicalID></Sender>
    <CreationDateTime>2030-01-01T00:00:00Z</CreationDateTime><BODID>x</BODID></ApplicationArea>
  <DataArea>{verb}{body}</DataArea>
</{noun}>"""


def stamp(xml: str | bytes, sender: str, bod_id: str) -> bytes:
    """The message with this sender, BODID and creation time (whatever prefix it uses)."""
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    area = root.find(f"{NS}ApplicationArea")
    area.find(f"{NS}Sender/{NS}LogicalID").text = sender
    area.find(f"{NS}CreationDateTime").text = CREATED
    area.find(f"{NS}BODID").text = bod_id
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def example(name: str, tag: str) -> str:
    text = (EXAMPLES / name).read_text()
    return text.replace("PO-2030-0001", f"{tag}-1").replace("PO-2030-0002", f"{tag}-2")


def as_sync(process: str) -> str:
    return process.replace("ProcessOperationsSchedule", "SyncOperationsSchedule").replace(
        '<Process acknowledgeCode="Always"/>', "<Sync/>"
    )


def unit_prop(unit: str) -> str:
    return (
        "<MaterialDefinitionProperty><ID>UnitOfMeasure</ID><Value>"
        f"<ValueString>{unit}</ValueString></Value></MaterialDefinitionProperty>"
    )


def lot_body(lot_id: str, material: str, quantity: str, unit: str) -> str:
    return (
        f"<MaterialLot><ID>{lot_id}</ID><MaterialDefinitionID>{material}</MaterialDefinitionID>"
        f"<Quantity><QuantityString>{quantity}</QuantityString>"
        f"<UnitOfMeasure>{unit}</UnitOfMeasure></Quantity></MaterialLot>"
    )


# Each: a message for a fresh tag (unique ids), and the answer's root element and status.
MESSAGES: dict[str, tuple[Callable[[str], str], str, int]] = {
    "Process": (
        lambda t: example("process-operations-schedule.xml", t),
        "AcknowledgeOperationsSchedule",
        200,
    ),
    "Change (unknown order)": (
        lambda t: example("change-operations-schedule.xml", t),
        "RespondOperationsSchedule",
        409,
    ),
    "Cancel (unknown order)": (
        lambda t: example("cancel-operations-schedule.xml", t),
        "ConfirmBOD",
        409,
    ),
    "SyncOperationsSchedule": (
        lambda t: as_sync(example("process-operations-schedule.xml", t)),
        "AcknowledgeOperationsSchedule",
        200,
    ),
    "SyncMaterialClass": (
        lambda t: envelope("SyncMaterialClass", f"<MaterialClass><ID>{t}</ID></MaterialClass>"),
        "ConfirmBOD",
        200,
    ),
    "SyncMaterialDefinition": (
        lambda t: envelope(
            "SyncMaterialDefinition",
            f"<MaterialDefinition><ID>{t}</ID>{unit_prop('KGM')}"
            "<MaterialClassID>Raw</MaterialClassID></MaterialDefinition>",
        ),
        "ConfirmBOD",
        200,
    ),
    "SyncProcessSegment": (
        lambda t: envelope("SyncProcessSegment", f"<ProcessSegment><ID>{t}</ID></ProcessSegment>"),
        "ConfirmBOD",
        200,
    ),
    "SyncEquipment (unmappable)": (
        lambda t: envelope("SyncEquipment", f"<Equipment><ID>{t}</ID></Equipment>"),
        "ConfirmBOD",
        400,
    ),
    "SyncOperationsDefinition (unknown work master)": (
        lambda t: envelope(
            "SyncOperationsDefinition",
            f"""<OperationsDefinition><ID>{t}</ID><OperationsSegment><ID>S</ID>
            <WorkMasterSourceID>NO-{t}</WorkMasterSourceID>
            <MaterialSpecification><ID>1</ID><MaterialDefinitionID>SALT</MaterialDefinitionID>
            <MaterialUse>Produced</MaterialUse><Quantity><QuantityString>1</QuantityString>
            <UnitOfMeasure>kg</UnitOfMeasure></Quantity></MaterialSpecification>
            </OperationsSegment></OperationsDefinition>""",
        ),
        "ConfirmBOD",
        422,
    ),
    "SyncWorkMaster (unknown segment)": (
        lambda t: envelope(
            "SyncWorkMaster",
            f"<WorkMaster><ID>{t}</ID><ProcessSegmentID>NO-{t}</ProcessSegmentID></WorkMaster>",
        ),
        "ConfirmBOD",
        422,
    ),
    "SyncMaterialLot": (
        lambda t: envelope("SyncMaterialLot", lot_body(t, "SALT", "2", "KGM")),
        "ConfirmBOD",
        200,
    ),
    "SyncMaterialLot (unknown material)": (
        lambda t: envelope("SyncMaterialLot", lot_body(t, f"NO-{t}", "2", "KGM")),
        "ConfirmBOD",
        422,
    ),
    "SyncMaterialInformation": (
        lambda t: envelope(
            "SyncMaterialInformation",
            f"<MaterialInformation><MaterialDefinition><ID>M-{t}</ID>{unit_prop('kg')}"
            f"</MaterialDefinition>{lot_body(t, f'M-{t}', '1', 'TNE')}</MaterialInformation>",
        ),
        "ConfirmBOD",
        200,
    ),
    "malformed (XSD-invalid)": (
        lambda t: example("process-operations-schedule.xml", t).replace(
            "<Priority>5</Priority>", "<Priority>high</Priority>"
        ),
        "ConfirmBOD",
        400,
    ),
}


@pytest.mark.parametrize("kind", list(MESSAGES))
async def test_every_answer_echoes_the_message_and_validates(stack: Stack, kind: str) -> None:
    build, answer, status = MESSAGES[kind]
    tag = f"EC-{uuid.uuid4().hex[:8]}"
    sender, bod_id = f"ERP-{tag}", f"BOD-{tag}"
    body = stamp(build(tag), sender, bod_id)
    if kind.startswith("malformed"):
        assert b"<Priority>high" in body
    # Master data that drives machines is the admin's to sync (issue 11); the rest the ERP's.
    machines = ("SyncProcessSegment", "SyncEquipment", "SyncOperationsDefinition", "SyncWorkMaster")
    async with client(stack, "admin" if kind.startswith(machines) else "erp") as http:
        r = await post_xml(http, body)
    assert r.status_code == status, r.text
    doc = valid(r.content)
    assert etree.QName(doc).localname == answer
    echoes = doc.findall(f".//{NS}OriginalApplicationArea")
    assert echoes
    for echo in echoes:
        assert echo.findtext(f"{NS}BODID") == bod_id
        assert echo.findtext(f"{NS}Sender/{NS}LogicalID") == sender
        assert echo.findtext(f"{NS}CreationDateTime") == CREATED
    assert doc.findtext(f"{NS}ApplicationArea/{NS}BODID") != bod_id  # the answer's own id


async def test_sync_operations_schedule_processes_new_and_changes_known(stack: Stack) -> None:
    tag = f"SY-{uuid.uuid4().hex[:6]}"
    first = stamp(as_sync(example("process-operations-schedule.xml", tag)), "ERP", f"{tag}-a")
    async with client(stack, "erp") as erp:
        r = await post_xml(erp, first)
        assert r.status_code == 200, r.text
        assert etree.QName(valid(r.content)).localname == "AcknowledgeOperationsSchedule"
        ids = order_ids(stack, [f"{tag}-1", f"{tag}-2"])
        assert len(ids) == 2

        # The same requests again: both known, so both changed (or refused once running).
        again = stamp(
            first.replace(b"<Priority>5</Priority>", b"<Priority>7</Priority>"), "ERP", f"{tag}-b"
        )
        r = await post_xml(erp, again)
        assert r.status_code in (200, 409), r.text
        doc = valid(r.content)
        assert etree.QName(doc).localname == "RespondOperationsSchedule"
        codes = doc.findall(f".//{NS}ResponseCriteria/{NS}ChangeStatus/{NS}Code")
        assert len(codes) == 2

        # One known, one new: one Acknowledge over both.
        mixed = again.replace(f"{tag}-2".encode(), f"{tag}-3".encode())
        r = await post_xml(erp, stamp(mixed, "ERP", f"{tag}-c"))
        assert r.status_code in (200, 409), r.text
        doc = valid(r.content)
        assert etree.QName(doc).localname == "AcknowledgeOperationsSchedule"
        expressions = [
            e.text for e in doc.findall(f".//{NS}ResponseCriteria/{NS}ResponseExpression")
        ]
        assert any(f"{tag}-3" in (e or "") for e in expressions)
        assert any(f"{tag}-1" in (e or "") for e in expressions)
        assert f"{tag}-3" in order_ids(stack, [f"{tag}-3"])
        for order_id in order_ids(stack, [f"{tag}-1", f"{tag}-2", f"{tag}-3"]).values():
            await order_final(erp, order_id, 90)


def lot_count(stack: Stack) -> int:
    with stack.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(MaterialLot)) or 0)


async def test_lots_synced_by_the_erp_are_consumed_by_its_order(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:6]
    lot_id = f"LOT-BAG6-ACME-{tag}"
    stock = (FIXTURES / "third-party-material-lot.xml").read_text()
    stock = stock.replace("LOT-ACME-FLOUR-1", f"LOT-ACME-FLOUR-{tag}")
    stock = stock.replace("LOT-ACME-SALT-1", lot_id).replace(
        "<erp:MaterialDefinitionID>SALT<", "<erp:MaterialDefinitionID>BAG-6PK<"
    )
    # 2 dozen bags: converted to the material's unit, 24 ea; and released.
    stock = stock.replace("2500", "2").replace(">GRM<", ">DZN<")
    stock = stock.replace(
        "<erp:Status>Quality Inspection</erp:Status>", "<erp:Status>Available</erp:Status>"
    )
    async with client(stack, "erp") as erp, client(stack, "auditor") as auditor:
        before = lot_count(stack)
        bad = stock.replace(">FLOUR-WHEAT<", f">NO-SUCH-{tag}<")
        refused = await post_xml(erp, stamp(bad, "ACME-ERP-WM", f"LOT-{tag}-bad"))
        assert refused.status_code == 422, refused.text
        assert etree.QName(valid(refused.content)).localname == "ConfirmBOD"
        assert f"unknown material 'NO-SUCH-{tag}'" in refused.text
        assert lot_count(stack) == before  # all or nothing

        r = await post_xml(erp, stamp(stock, "ACME-ERP-WM", f"LOT-{tag}-1"))
        assert r.status_code == 200, r.text
        assert lot_count(stack) == before + 2
        again = await post_xml(erp, stamp(stock, "ACME-ERP-WM", f"LOT-{tag}-2"))
        assert again.status_code == 200
        with stack.sessions() as s:
            synced = s.scalars(select(MaterialLot).where(MaterialLot.external_id == lot_id)).one()
            assert (synced.quantity, synced.unit, synced.disposition) == (
                Decimal(24),
                "ea",
                "Released",
            )
            events = s.scalars(
                select(AuditEvent.action).where(AuditEvent.object_id == lot_id)
            ).all()
            assert events == ["lot.created"]  # the second message changed nothing

        order = third_party("third-party-schedule.xml", f"AL-{tag}").replace(
            b"LOT-BAG6-0002", lot_id.encode()
        )
        r = await post_xml(erp, order)
        assert r.status_code == 200, r.text
        ids = order_ids(stack, [f"AL-{tag}"])
        done = await order_final(erp, ids[f"AL-{tag}"], 90)
        assert done["state"] == "Completed"
        produced = done["produced_lots"][0]["lot"]
        back = (await auditor.get(f"/api/v1/genealogy/lots/{produced}/backward")).json()
        assert lot_id in {node["lot"] for node in back["lots"]}
        forward = (await auditor.get(f"/api/v1/genealogy/lots/{lot_id}/forward")).json()
        assert produced in {node["lot"] for node in forward["lots"]}
        with stack.sessions() as s:
            left = s.scalar(select(MaterialLot.quantity).where(MaterialLot.external_id == lot_id))
            assert left == 12
