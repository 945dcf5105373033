"""B2MML Sync master data: decoded into plant data and loaded partially, on SQLite."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mes.audit import verify
from mes.b2mml import B2MMLError, SyncMasterData, decode
from mes.masterdata import (
    MasterDataError,
    equipment_tree,
    list_products,
    load_plant,
    load_plant_file,
    parse_plant,
    read_master_data_file,
)
from mes.models import (
    AuditEvent,
    Equipment,
    MaterialDefinition,
    TestSpecification,
    WorkMaster,
)
from tests.b2mml.conftest import EXAMPLES
from tests.test_masterdata import snapshot


def sync(noun: str, body: str, bod_id: str = "bod-1") -> bytes:
    """A Sync message for ``noun`` whose DataArea holds ``body``."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Sync{noun} xmlns="http://www.mesa.org/xml/B2MML" releaseID="7.01">
  <ApplicationArea>
    <Sender><LogicalID>ERP</LogicalID><ConfirmationCode>OnError</ConfirmationCode></Sender>
    <CreationDateTime>2030-02-01T00:00:00Z</CreationDateTime>
    <BODID>{bod_id}</BODID>
  </ApplicationArea>
  <DataArea><Sync/>{body}</DataArea>
</Sync{noun}>""".encode()


def plant_of(data: bytes) -> dict[str, Any]:
    message = decode(data)
    assert isinstance(message, SyncMasterData)
    return message.plant


def load(db: sessionmaker[Session], data: bytes) -> str:
    """Decode and load one Sync message as the B2MML route would: partially."""
    plant = parse_plant(plant_of(data), partial=True)
    with db.begin() as s:
        return str(load_plant(s, plant, partial=True))


def value(text: str, unit: str | None = None, key: str | None = None) -> str:
    return (
        f"<Value><ValueString>{text}</ValueString>"
        + (f"<UnitOfMeasure>{unit}</UnitOfMeasure>" if unit else "")
        + (f"<Key>{key}</Key>" if key else "")
        + "</Value>"
    )


MATERIALS = sync(
    "MaterialDefinition",
    f"""
    <MaterialDefinition><ID>DOUGH-PROOFED</ID><Description>Proofed dough</Description>
      <MaterialDefinitionProperty><ID>UnitOfMeasure</ID>{value("kg")}</MaterialDefinitionProperty>
      <MaterialClassID>Intermediate</MaterialClassID></MaterialDefinition>
    <MaterialDefinition><ID>BREAD-PROOFED</ID>
      <MaterialDefinitionProperty><ID>uom</ID><Value><ValueString/>
        <UnitOfMeasure>ea</UnitOfMeasure></Value></MaterialDefinitionProperty>
      <MaterialClassID>FinishedGood</MaterialClassID></MaterialDefinition>""",
)
SEGMENT = sync(
    "ProcessSegment",
    "<ProcessSegment><ID>PROOF</ID><Description>Proof</Description></ProcessSegment>",
)
# A new prover under the stored LINE-1 (HierarchyScope), with its controller endpoint.
EQUIPMENT = sync(
    "Equipment",
    f"""
    <Equipment><ID>WU-PROVER-1</ID><Description>Proofing cabinet</Description>
      <HierarchyScope><EquipmentID>SPRINGFIELD</EquipmentID><EquipmentLevel>Site</EquipmentLevel>
        <HierarchyScopeChild><EquipmentID>LINE-1</EquipmentID>
          <EquipmentLevel>ProductionLine</EquipmentLevel></HierarchyScopeChild></HierarchyScope>
      <EquipmentLevel>WorkUnit</EquipmentLevel>
      <EquipmentProperty><ID>ControllerProtocol</ID>{value("opcua")}</EquipmentProperty>
      <EquipmentProperty><ID>ControllerURL</ID>{value("opc.tcp://127.0.0.1:4840/")}</EquipmentProperty>
    </Equipment>""",
)
WORK_MASTER = sync(
    "WorkMaster",
    f"""
    <WorkMaster><ID>WM-PROOF-LOAF</ID><Description>Proof loaves</Description>
      <ParameterSpecification><ID>ProofTime</ID>{value("2400", "s")}{value("1800", key="Min")}
        {value("3600", key="Max")}</ParameterSpecification>
      <ParameterSpecification><ID>Humidity</ID>{value("75", "%")}
        <ParameterChild><ID>Minimum</ID>{value("60")}</ParameterChild></ParameterSpecification>
      <EquipmentSpecification><ID>E1</ID><EquipmentID>WU-PROVER-1</EquipmentID>
        <EquipmentSpecificationProperty><ID>IdealCycleTime</ID>{value("2000", "ms")}
        </EquipmentSpecificationProperty></EquipmentSpecification>
      <ProcessSegmentID>PROOF</ProcessSegmentID>
    </WorkMaster>""",
)


def spec(id_: str, material: str, use: str, quantity: str, unit: str) -> str:
    return f"""<MaterialSpecification><ID>{id_}</ID>
      <MaterialDefinitionID>{material}</MaterialDefinitionID><MaterialUse>{use}</MaterialUse><Quantity><QuantityString>{quantity}</QuantityString>
      <UnitOfMeasure>{unit}</UnitOfMeasure></Quantity></MaterialSpecification>"""


ROUTING = sync(
    "OperationsDefinition",
    f"""
    <OperationsDefinition><ID>OD-BREAD-PROOFED</ID><Description>Proofed loaf</Description>
      <OperationsType>Production</OperationsType>
      <OperationsSegment><ID>MIX</ID><ProcessSegmentID>MIX</ProcessSegmentID>
        <WorkMasterSourceID>WM-MIX-WHITE</WorkMasterSourceID>
        {spec("1", "FLOUR-WHEAT", "Consumed", "0.3", "kg")}
        {spec("2", "DOUGH-WHITE", "Produced", "0.52", "kg")}</OperationsSegment>
      <OperationsSegment><ID>PROOF</ID><ProcessSegmentID>PROOF</ProcessSegmentID>
        <WorkMasterSourceID>WM-PROOF-LOAF</WorkMasterSourceID>
        {spec("1", "DOUGH-WHITE", "Consumed", "0.52", "kg")}
        {spec("2", "DOUGH-PROOFED", "Produced", "0.52", "kg")}</OperationsSegment>
      <OperationsSegment><ID>BAKE</ID><ProcessSegmentID>BAKE</ProcessSegmentID>
        <WorkMasterSourceID>WM-BAKE-LOAF</WorkMasterSourceID>
        {spec("1", "DOUGH-PROOFED", "Consumed", "0.52", "kg")}
        {spec("2", "BREAD-PROOFED", "Produced", "1", "ea")}</OperationsSegment>
    </OperationsDefinition>""",
)


# --- decoding ---------------------------------------------------------------------------------


def test_each_noun_maps_to_its_plant_section() -> None:
    assert plant_of(MATERIALS)["materials"] == [
        {
            "id": "DOUGH-PROOFED",
            "description": "Proofed dough",
            "material_class": "Intermediate",
            "unit": "kg",
        },
        {"id": "BREAD-PROOFED", "material_class": "FinishedGood", "unit": "ea"},
    ]
    assert plant_of(SEGMENT) == {"process_segments": [{"id": "PROOF", "description": "Proof"}]}
    assert plant_of(EQUIPMENT)["equipment"] == [
        {
            "id": "WU-PROVER-1",
            "description": "Proofing cabinet",
            "level": "WorkUnit",
            "endpoint": {"protocol": "opcua", "url": "opc.tcp://127.0.0.1:4840/"},
            "parent": "LINE-1",
        }
    ]
    assert plant_of(WORK_MASTER)["work_masters"] == [
        {
            "id": "WM-PROOF-LOAF",
            "description": "Proof loaves",
            "process_segment": "PROOF",
            "parameters": [
                {"name": "ProofTime", "default": 2400.0, "min": 1800.0, "max": 3600.0, "unit": "s"},
                {"name": "Humidity", "default": 75.0, "min": 60.0, "unit": "%"},
            ],
            "work_units": [{"equipment": "WU-PROVER-1", "ideal_cycle_time_s": 2.0}],
        }
    ]
    (routing,) = plant_of(ROUTING)["routings"]
    assert (routing["id"], routing["product"]) == ("OD-BREAD-PROOFED", "BREAD-PROOFED")
    assert [(s["id"], s["work_master"]) for s in routing["steps"]] == [
        ("MIX", "WM-MIX-WHITE"),
        ("PROOF", "WM-PROOF-LOAF"),
        ("BAKE", "WM-BAKE-LOAF"),
    ]
    assert routing["steps"][1]["materials"] == [
        {"material": "DOUGH-WHITE", "use": "Consumed", "quantity": Decimal("0.52"), "unit": "kg"},
        {"material": "DOUGH-PROOFED", "use": "Produced", "quantity": Decimal("0.52"), "unit": "kg"},
    ]


def test_material_class_sync() -> None:
    data = sync("MaterialClass", "<MaterialClass><ID>Seeds</ID></MaterialClass>")
    assert plant_of(data) == {"material_classes": [{"id": "Seeds"}]}


def test_equipment_of_one_message_nest_by_hierarchy_scope() -> None:
    data = sync(
        "Equipment",
        """
        <Equipment><ID>LINE-3</ID><EquipmentLevel>ProductionLine</EquipmentLevel></Equipment>
        <Equipment><ID>WU-SLICER-3</ID>
          <HierarchyScope><EquipmentID>LINE-3</EquipmentID>
            <EquipmentLevel>ProductionLine</EquipmentLevel>
            <HierarchyScopeChild><EquipmentID>WU-SLICER-3</EquipmentID>
              <EquipmentLevel>WorkUnit</EquipmentLevel></HierarchyScopeChild></HierarchyScope>
          <EquipmentLevel>WorkUnit</EquipmentLevel>
          <EquipmentChild><ID>WU-SLICER-3-BLADE</ID><EquipmentLevel>Unit</EquipmentLevel>
          </EquipmentChild></Equipment>""",
    )
    assert plant_of(data)["equipment"] == [
        {
            "id": "LINE-3",
            "level": "ProductionLine",
            "children": [
                {
                    "id": "WU-SLICER-3",
                    "level": "WorkUnit",
                    "children": [{"id": "WU-SLICER-3-BLADE", "level": "Unit"}],
                }
            ],
        }
    ]


@pytest.mark.parametrize(
    ("data", "reasons"),
    [
        (
            sync(
                "MaterialLot",
                "<MaterialLot><ID>L</ID><Disposition>Other</Disposition></MaterialLot>",
            ),
            [
                "MaterialLot L: no MaterialDefinitionID (the material it is a lot of)",
                "MaterialLot L: no Quantity that is the lot's amount (found none)",
                "MaterialLot L: Disposition 'Other' is not a disposition the MES knows "
                "(Released: UnRestricted, Released, Available, …; Restricted: Restricted, "
                "Quarantine, Blocked, …; Rejected: Rejected, Closed, Scrapped)",
            ],
        ),
        (
            sync(
                "Equipment",
                "<Equipment><ID>E</ID><EquipmentChild><ID>F</ID></EquipmentChild></Equipment>",
            ),
            ["Equipment E: no EquipmentLevel", "Equipment F: no EquipmentLevel"],
        ),
        (
            sync(
                "OperationsDefinition",
                f"""<OperationsDefinition><ID>OD</ID>
              <OperationsSegment><ID>S</ID>{spec("1", "A", "Consumed", "1", "kg")}
              <MaterialSpecification><ID>2</ID><MaterialUse>Produced</MaterialUse>
              </MaterialSpecification></OperationsSegment></OperationsDefinition>""",
            ),
            [
                "OperationsDefinition OD.OperationsSegment S: no WorkMasterSourceID (the work "
                "master that runs it)",
                "OperationsDefinition OD.OperationsSegment S.MaterialSpecification 2: "
                "no MaterialDefinitionID",
                "OperationsDefinition OD.OperationsSegment S.MaterialSpecification 2: no Quantity",
            ],
        ),
        (
            sync(
                "OperationsDefinition",
                f"""<OperationsDefinition><ID>OD</ID>
              <OperationsSegment><ID>S</ID><WorkMasterSourceID>W</WorkMasterSourceID>
              {spec("1", "A", "Consumed", "1", "kg")}</OperationsSegment>
              </OperationsDefinition>""",
            ),
            [
                "OperationsDefinition OD: its last OperationsSegment must specify exactly one "
                "Produced material, the product (found 0)"
            ],
        ),
        (
            sync(
                "WorkMaster",
                f"""<WorkMaster><ID>W</ID>
              <ParameterSpecification><ID>T</ID>{value("hot")}</ParameterSpecification>
              <ParameterSpecification><ID>U</ID>{value("1", key="Max")}</ParameterSpecification>
              <EquipmentSpecification><ID>E</ID><EquipmentClassID>Ovens</EquipmentClassID>
              </EquipmentSpecification>
              <EquipmentSpecification><ID>F</ID><EquipmentID>WU-OVEN-1</EquipmentID>
              <EquipmentSpecificationProperty><ID>IdealCycleTime</ID>{value("2", "furlong")}
              </EquipmentSpecificationProperty></EquipmentSpecification>
              </WorkMaster>""",
            ),
            [
                "WorkMaster W: no ProcessSegmentID",
                "WorkMaster W.ParameterSpecification T.default: 'hot' is not a number",
                "WorkMaster W.ParameterSpecification U: no default Value",
                "WorkMaster W.EquipmentSpecification E: no EquipmentID (equipment classes are not "
                "supported)",
                "WorkMaster W.EquipmentSpecification F.IdealCycleTime: unit 'furlong' is not a "
                "time unit (s, ms, min, h)",
            ],
        ),
    ],
)
def test_unmappable_master_data_is_refused(data: bytes, reasons: list[str]) -> None:
    with pytest.raises(B2MMLError) as caught:
        decode(data)
    assert caught.value.reasons == reasons
    assert caught.value.bod_id == "bod-1"


# --- partial loads on a database holding the sample plant -------------------------------------


def test_one_noun_at_a_time_builds_a_new_routing(plant_db: sessionmaker[Session]) -> None:
    # Each message refers to what the ones before stored, and to the sample plant.
    for data in (MATERIALS, SEGMENT, EQUIPMENT, WORK_MASTER, ROUTING):
        load(plant_db, data)

    with plant_db() as s:
        product = next(p for p in list_products(s) if p["id"] == "BREAD-PROOFED")
        line_1 = equipment_tree(s)[0]["children"][0]["children"][0]
    assert product["routing"] == "OD-BREAD-PROOFED"
    assert [(st["id"], st["work_master"], st["work_units"]) for st in product["steps"]] == [
        ("MIX", "WM-MIX-WHITE", ["WU-MIXER-1", "WU-MIXER-2"]),
        ("PROOF", "WM-PROOF-LOAF", ["WU-PROVER-1"]),
        ("BAKE", "WM-BAKE-LOAF", ["WU-OVEN-1", "WU-OVEN-2"]),
    ]
    prover = next(u for u in line_1["children"] if u["id"] == "WU-PROVER-1")
    assert prover["endpoint"] == {
        "protocol": "opcua",
        "url": "opc.tcp://127.0.0.1:4840/",
        "machine": "WU-PROVER-1",
        "security": "None",
    }

    # Loading the same messages again changes nothing.
    before = snapshot(plant_db)
    for data in (MATERIALS, SEGMENT, EQUIPMENT, WORK_MASTER, ROUTING):
        assert "created 0, updated 0" in load(plant_db, data)
    assert snapshot(plant_db) == before


def test_sync_keeps_what_b2mml_cannot_carry(plant_db: sessionmaker[Session]) -> None:
    # WU-OVEN-1 without HierarchyScope or controller properties: parent and endpoint stay.
    oven = sync(
        "Equipment",
        "<Equipment><ID>WU-OVEN-1</ID><Description>Tunnel oven, relined</Description>"
        "<EquipmentLevel>WorkUnit</EquipmentLevel></Equipment>",
    )
    # WM-BAKE-LOAF: new parameters and units; its test specification stays.
    bake = sync(
        "WorkMaster",
        f"""<WorkMaster><ID>WM-BAKE-LOAF</ID>
          <ParameterSpecification><ID>OvenTemp</ID>{value("225", "degC")}</ParameterSpecification>
          <EquipmentSpecification><ID>E</ID><EquipmentID>WU-OVEN-2</EquipmentID>
          <EquipmentSpecificationProperty><ID>IdealCycleTime</ID>
          <Quantity><QuantityString>0.025</QuantityString><UnitOfMeasure>min</UnitOfMeasure>
          </Quantity></EquipmentSpecificationProperty></EquipmentSpecification>
          <ProcessSegmentID>BAKE</ProcessSegmentID></WorkMaster>""",
    )
    load(plant_db, oven)
    load(plant_db, bake)

    with plant_db() as s:
        row = s.scalars(select(Equipment).filter_by(external_id="WU-OVEN-1")).one()
        assert row.description == "Tunnel oven, relined"
        assert row.parent is not None
        assert row.parent.external_id == "LINE-1"
        assert row.endpoint is not None
        assert row.endpoint.machine == "WU-OVEN-1"
        wm = s.scalars(select(WorkMaster).filter_by(external_id="WM-BAKE-LOAF")).one()
        assert [(p.name, p.default, p.unit) for p in wm.parameters] == [("OvenTemp", 225, "degC")]
        assert [(e.equipment.external_id, e.ideal_cycle_time_s) for e in wm.equipment] == [
            ("WU-OVEN-2", 1.5)
        ]
        specs = s.scalars(select(TestSpecification.external_id).filter_by(work_master_id=wm.id))
        assert list(specs) == ["TS-BAKE-LOAF-CORETEMP"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            sync(
                "WorkMaster",
                f"""<WorkMaster><ID>WM-NEW</ID>
              <ParameterSpecification><ID>T</ID>{value("1")}</ParameterSpecification>
              <EquipmentSpecification><ID>E</ID><EquipmentID>WU-NOPE</EquipmentID>
              <EquipmentSpecificationProperty><ID>IdealCycleTime</ID>{value("1")}
              </EquipmentSpecificationProperty></EquipmentSpecification>
              <ProcessSegmentID>MIX</ProcessSegmentID></WorkMaster>""",
            ),
            "work_masters[0] (WM-NEW).work_units[0] (WU-NOPE): unknown equipment 'WU-NOPE'",
        ),
        (
            sync(
                "MaterialDefinition",
                f"""<MaterialDefinition><ID>FLOUR-WHEAT</ID>
              <MaterialDefinitionProperty><ID>UnitOfMeasure</ID>{value("t")}
              </MaterialDefinitionProperty></MaterialDefinition>""",
            ),
            "materials[0] (FLOUR-WHEAT): unit 't' would mislabel 3 stored lot(s) counted in 'kg'",
        ),
        (
            sync(
                "Equipment",
                """<Equipment><ID>SPRINGFIELD</ID>
              <HierarchyScope><EquipmentID>LINE-2</EquipmentID>
              <EquipmentLevel>ProductionLine</EquipmentLevel></HierarchyScope>
              <EquipmentLevel>Site</EquipmentLevel></Equipment>""",
            ),
            "equipment[0] (SPRINGFIELD): its parent LINE-2 lies under it; that is a loop",
        ),
        (
            ROUTING,
            "routings[0] (OD-BREAD-PROOFED): unknown product 'BREAD-PROOFED'",
        ),
    ],
)
def test_a_bad_sync_names_the_entry_and_writes_nothing(
    plant_db: sessionmaker[Session], data: bytes, problem: str
) -> None:
    before = snapshot(plant_db)

    with pytest.raises(MasterDataError) as caught:
        load(plant_db, data)

    assert caught.value.problems[0] == problem
    assert snapshot(plant_db) == before


# --- files: `mes load FILE.xml` ---------------------------------------------------------------


def test_load_plant_file_takes_a_sync_message(plant_db: sessionmaker[Session]) -> None:
    plant, partial = read_master_data_file(EXAMPLES / "sync-material-definition.xml")
    assert partial
    assert [m.id for m in plant.materials] == ["SEEDS-SESAME", "SALT"]

    report = load_plant_file(plant_db, EXAMPLES / "sync-material-definition.xml")

    assert (report.created, report.updated) == (1, 1)
    with plant_db() as s:
        rows = s.scalars(select(MaterialDefinition).order_by(MaterialDefinition.external_id))
        found = {m.external_id: (m.description, m.unit) for m in rows}
    assert found["SEEDS-SESAME"] == ("Sesame seeds, hulled", "kg")
    assert found["SALT"] == ("Fine sea salt", "kg")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (
            "orders.xml",
            (EXAMPLES / "process-operations-schedule.xml").read_bytes(),
            "orders.xml: holds a ProcessOperationsSchedule, not a B2MML Sync master data message",
        ),
        ("broken.xml", b"<SyncEquipment", "broken.xml: not well-formed XML: line 1"),
        (
            "bad.xml",
            sync(
                "MaterialLot",
                "<MaterialLot><ID>L</ID><MaterialDefinitionID>FLOUR-WHEAT</MaterialDefinitionID>"
                "<Quantity><QuantityString>-5</QuantityString><UnitOfMeasure>kg</UnitOfMeasure>"
                "</Quantity></MaterialLot>",
            ),
            "bad.xml: MaterialLot L: quantity -5 kg is negative",
        ),
    ],
)
def test_unfit_xml_files_are_master_data_errors(
    tmp_path: Path, name: str, content: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MasterDataError) as caught:
        read_master_data_file(path)
    assert caught.value.problems[0].startswith(problem)


def test_a_load_with_an_actor_is_audited(plant_db: sessionmaker[Session]) -> None:
    plant = parse_plant(plant_of(MATERIALS), partial=True)

    for _ in range(2):  # the second load changes nothing and records nothing
        with plant_db.begin() as s:
            load_plant(s, plant, partial=True, actor="erp:springfield")

    with plant_db() as s:
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.actor == "erp:springfield").order_by(AuditEvent.seq)
        ).all()
        assert [(e.actor, e.action, e.object_type, e.object_id) for e in events] == [
            ("erp:springfield", "master_data.created", "material_definition", "DOUGH-PROOFED"),
            ("erp:springfield", "master_data.created", "material_definition", "BREAD-PROOFED"),
        ]
        assert events[1].after is not None
        assert events[1].after["external_id"] == "BREAD-PROOFED"
        assert events[1].after["unit"] == "ea"
        assert verify(s).intact
