"""Plant master data: the example file, idempotent loading, read helpers and bad files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mes.db import make_engine, make_sessionmaker
from mes.masterdata import (
    MasterDataError,
    Plant,
    equipment_tree,
    list_products,
    load_plant,
    load_plant_file,
    parse_plant,
    read_plant_file,
)
from mes.migrate import upgrade
from mes.models import (
    Base,
    MaterialLot,
    OperationsDefinition,
    OperationsRequest,
    SegmentRequirement,
    TestSpecification,
    WorkMaster,
)
from mes.samples import plant_resource

# The packaged sample plant; the tests run from the source tree, where it is a plain file.
EXAMPLE = Path(str(plant_resource()))
WORK_UNITS = ["WU-MIXER-1", "WU-MIXER-2", "WU-OVEN-1", "WU-OVEN-2", "WU-PACKER-2"]
#: The legacy machine of the sample plant, reached over Modbus TCP.
MODBUS_UNIT, MODBUS_URL = "WU-LABELLER-1", "modbus://127.0.0.1:5020"

Data = dict[str, Any]


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Migrated databases made once and copied per test: migrating each time costs more."""
    folder = tmp_path_factory.mktemp("templates")
    empty, loaded = folder / "empty.db", folder / "loaded.db"
    upgrade(f"sqlite:///{empty}")
    shutil.copyfile(empty, loaded)
    engine = make_engine(f"sqlite:///{loaded}")
    load_plant_file(make_sessionmaker(engine), EXAMPLE)
    engine.dispose()  # the last connection closing folds the WAL back into the file
    return {"empty": empty, "loaded": loaded}


def _copy_of(template: Path, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    target = tmp_path / "t.db"
    shutil.copyfile(template, target)
    engine = make_engine(f"sqlite:///{target}")
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def db(templates: dict[str, Path], tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh, migrated, empty database."""
    yield from _copy_of(templates["empty"], tmp_path)


@pytest.fixture
def plant_db(templates: dict[str, Path], tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh database holding the example plant."""
    yield from _copy_of(templates["loaded"], tmp_path)


def example() -> Data:
    data: Data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return data


def write(tmp_path: Path, data: Data, name: str = "plant.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def snapshot(sf: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every MES table but the audit trail's, in primary key order.

    (A load that changes something appends audit events; tests/test_audit.py covers them.)
    """
    with sf() as s:
        return {
            t.name: [tuple(r) for r in s.execute(select(t).order_by(*t.primary_key.columns))]
            for t in Base.metadata.sorted_tables
            if t.name not in ("audit_event", "audit_chain_head")
        }


def row_counts(sf: sessionmaker[Session]) -> dict[str, int]:
    return {name: len(rows) for name, rows in snapshot(sf).items()}


def expected_rows(plant: Plant) -> dict[str, int]:
    """The rows a plant file makes in an empty database, table by table."""
    equipment: list[Any] = []
    stack = list(plant.equipment)
    while stack:
        node = stack.pop()
        equipment.append(node)
        stack.extend(node.children)
    steps = [step for r in plant.routings for step in r.steps]
    wms = plant.work_masters
    return {
        "equipment": len(equipment),
        "controller_endpoint": sum(1 for e in equipment if e.endpoint is not None),
        "material_class": len(plant.material_classes),
        "material_definition": len(plant.materials),
        "material_lot": len(plant.lots),
        "process_segment": len(plant.process_segments),
        "work_master": len(wms),
        "work_master_parameter": sum(len(w.parameters) for w in wms),
        "work_master_equipment": sum(len(w.work_units) for w in wms),
        "test_specification": sum(len(w.test_specifications) for w in wms),
        "operations_definition": len(plant.routings),
        "operations_segment": len(steps),
        "operations_material_spec": sum(len(step.materials) for step in steps),
    }


# --- the example ------------------------------------------------------------------------------


def test_example_describes_the_springfield_bakery() -> None:
    plant = read_plant_file(EXAMPLE)

    site = plant.equipment[0]
    assert (site.id, site.level) == ("SPRINGFIELD", "Site")
    lines = site.children[0].children
    assert [line.id for line in lines] == ["LINE-1", "LINE-2"]
    units = {u.id: u for line in lines for u in line.children}
    assert sorted(units) == sorted([*WORK_UNITS, MODBUS_UNIT])
    for wu_id, unit in units.items():
        assert unit.level == "WorkUnit"
        assert unit.endpoint is not None
        if wu_id == MODBUS_UNIT:
            assert (unit.endpoint.protocol, unit.endpoint.url) == ("modbus", MODBUS_URL)
            continue
        assert (unit.endpoint.protocol, unit.endpoint.machine) == ("opcua", wu_id)
        assert unit.endpoint.url == "opc.tcp://127.0.0.1:4840/"

    measured = {
        w.id: {(t.property, t.low, t.high, t.unit) for t in w.test_specifications}
        for w in plant.work_masters
    }
    assert measured["WM-MIX-WHITE"] == {("DoughTemperature", 22, 28, "degC")}
    assert measured["WM-BAKE-LOAF"] == {("CoreTemperature", 92, 99, "degC")}
    assert {r.product: [s.id for s in r.steps] for r in plant.routings} == {
        "BREAD-WHITE": ["MIX", "BAKE"],
        "ROLL-6PK": ["MIX", "BAKE", "PACK"],
        "BREAD-WHITE-LBL": ["MIX", "BAKE", "LABEL"],
    }
    lots_per_raw = {
        m.id: [lot.id for lot in plant.lots if lot.material == m.id]
        for m in plant.materials
        if m.material_class == "Raw"
    }
    assert all(len(lots) >= 2 for lots in lots_per_raw.values()), lots_per_raw


def test_json_plant_file_reads_like_yaml(tmp_path: Path) -> None:
    path = tmp_path / "plant.json"
    path.write_text(json.dumps(example()), encoding="utf-8")
    assert read_plant_file(path) == read_plant_file(EXAMPLE)


# --- loading ----------------------------------------------------------------------------------


def test_loading_twice_changes_nothing(db: sessionmaker[Session]) -> None:
    first = load_plant_file(db, EXAMPLE)
    expected = expected_rows(read_plant_file(EXAMPLE))
    counts = row_counts(db)
    assert {t: counts[t] for t in expected} == expected
    assert first.created == sum(expected.values())
    assert (first.updated, first.unchanged, first.deleted) == (0, 0, 0)
    before = snapshot(db)

    second = load_plant_file(db, EXAMPLE)

    assert (second.created, second.updated, second.deleted) == (0, 0, 0)
    assert second.unchanged == first.created
    assert str(second) == f"created 0, updated 0, unchanged {first.created}, deleted 0"
    assert snapshot(db) == before


def test_reload_keeps_the_quantity_production_left_in_a_lot(
    plant_db: sessionmaker[Session],
) -> None:
    with plant_db.begin() as s:
        lot = s.scalars(select(MaterialLot).filter_by(external_id="LOT-FLOUR-0001")).one()
        lot.quantity = Decimal("123.5")  # as if production had consumed most of it

    report = load_plant_file(plant_db, EXAMPLE)

    assert (report.created, report.updated) == (0, 0)
    with plant_db() as s:
        lot = s.scalars(select(MaterialLot).filter_by(external_id="LOT-FLOUR-0001")).one()
        assert lot.quantity == 123.5


def add_proofing_step(data: Data) -> None:
    """Edit the example: a prover on LINE-1 and a PROOF step between MIX and BAKE of bread."""
    line_1 = data["equipment"][0]["children"][0]["children"][0]
    line_1["children"].append(
        {
            "id": "WU-PROVER-1",
            "level": "WorkUnit",
            "endpoint": {"protocol": "opcua", "url": "opc.tcp://127.0.0.1:4840/"},
        }
    )
    data["process_segments"].append({"id": "PROOF"})
    data["materials"].append({"id": "DOUGH-PROOFED", "unit": "kg"})
    data["work_masters"].append(
        {
            "id": "WM-PROOF-LOAF",
            "process_segment": "PROOF",
            "parameters": [{"name": "ProofTime", "default": 2400, "min": 1800, "max": 3600}],
            "work_units": [{"equipment": "WU-PROVER-1", "ideal_cycle_time_s": 2.0}],
        }
    )
    bread = data["routings"][0]
    bread["steps"].insert(
        1,
        {
            "id": "PROOF",
            "work_master": "WM-PROOF-LOAF",
            "materials": [
                {"material": "DOUGH-WHITE", "use": "Consumed", "quantity": 0.52},
                {"material": "DOUGH-PROOFED", "use": "Produced", "quantity": 0.52},
            ],
        },
    )
    bread["steps"][2]["materials"][0]["material"] = "DOUGH-PROOFED"


def test_edits_are_synchronised_and_can_be_undone(plant_db: sessionmaker[Session]) -> None:
    original = snapshot(plant_db)
    data = example()
    mix_white, bake_loaf = data["work_masters"][0], data["work_masters"][1]
    del mix_white["parameters"][1]  # MixSpeed
    bake_loaf["parameters"][0]["default"] = 230  # OvenTemp
    del bake_loaf["work_units"][0]  # WU-OVEN-1
    add_proofing_step(data)

    with plant_db.begin() as s:
        edit = load_plant(s, parse_plant(data))

    # Created: prover + endpoint, PROOF segment, DOUGH-PROOFED, work master + parameter + work
    # unit, the PROOF step + its 2 specs, BAKE's new input. Updated: OvenTemp, BAKE's sequence.
    # Deleted: MixSpeed, the WU-OVEN-1 link, BAKE's old input.
    assert (edit.created, edit.updated, edit.deleted) == (11, 2, 3)
    with plant_db() as s:
        bread = next(p for p in list_products(s) if p["id"] == "BREAD-WHITE")
        assert [(st["sequence"], st["id"], st["work_units"]) for st in bread["steps"]] == [
            (1, "MIX", ["WU-MIXER-1", "WU-MIXER-2"]),
            (2, "PROOF", ["WU-PROVER-1"]),
            (3, "BAKE", ["WU-OVEN-2"]),
        ]
        od = s.scalars(select(OperationsDefinition).filter_by(external_id="OD-BREAD-WHITE")).one()
        bake = od.segments[2]
        assert {(m.material_definition.external_id, m.use) for m in bake.materials} == {
            ("DOUGH-PROOFED", "Consumed"),
            ("BREAD-WHITE", "Produced"),
        }
        wm = od.segments[0].work_master
        assert [p.name for p in wm.parameters] == ["MixTime"]
        assert next(p.default for p in bake.work_master.parameters if p.name == "OvenTemp") == 230

    undo = load_plant_file(plant_db, EXAMPLE)

    assert (undo.created, undo.updated, undo.deleted) == (3, 2, 4)
    after = snapshot(plant_db)
    with plant_db() as s:
        bread = next(p for p in list_products(s) if p["id"] == "BREAD-WHITE")
        assert [(st["sequence"], st["id"]) for st in bread["steps"]] == [(1, "MIX"), (2, "BAKE")]
    # Top-level objects the file no longer names stay (history may refer to them), with their
    # own lists: WM-PROOF-LOAF keeps its parameter and work unit.
    grown = {"equipment", "controller_endpoint", "process_segment", "material_definition"}
    grown |= {"work_master", "work_master_parameter", "work_master_equipment"}
    for table, rows in original.items():
        assert len(after[table]) == len(rows) + (table in grown), table


def test_opcua_url_points_every_work_unit_at_one_server(db: sessionmaker[Session]) -> None:
    def urls() -> set[str]:
        with db() as s:
            tree = equipment_tree(s)
        lines = tree[0]["children"][0]["children"]
        return {wu["endpoint"]["url"] for line in lines for wu in line["children"]}

    load_plant_file(db, EXAMPLE, opcua_url="opc.tcp://127.0.0.1:48999/")
    assert urls() == {"opc.tcp://127.0.0.1:48999/", MODBUS_URL}

    report = load_plant_file(db, EXAMPLE)
    assert (report.created, report.updated) == (0, len(WORK_UNITS))
    assert urls() == {"opc.tcp://127.0.0.1:4840/", MODBUS_URL}


# --- read helpers -----------------------------------------------------------------------------


def test_list_products(plant_db: sessionmaker[Session]) -> None:
    with plant_db() as s:
        products = list_products(s)

    assert products == [
        {
            "id": "BREAD-WHITE",
            "description": "White loaf 500 g",
            "unit": "ea",
            "routing": "OD-BREAD-WHITE",
            "steps": [
                {
                    "sequence": 1,
                    "id": "MIX",
                    "work_master": "WM-MIX-WHITE",
                    "work_units": ["WU-MIXER-1", "WU-MIXER-2"],
                },
                {
                    "sequence": 2,
                    "id": "BAKE",
                    "work_master": "WM-BAKE-LOAF",
                    "work_units": ["WU-OVEN-1", "WU-OVEN-2"],
                },
            ],
        },
        {
            "id": "BREAD-WHITE-LBL",
            "description": "White loaf 500 g, labelled for retail",
            "unit": "ea",
            "routing": "OD-BREAD-WHITE-LBL",
            "steps": [
                {
                    "sequence": 1,
                    "id": "MIX",
                    "work_master": "WM-MIX-WHITE",
                    "work_units": ["WU-MIXER-1", "WU-MIXER-2"],
                },
                {
                    "sequence": 2,
                    "id": "BAKE",
                    "work_master": "WM-BAKE-LOAF",
                    "work_units": ["WU-OVEN-1", "WU-OVEN-2"],
                },
                {
                    "sequence": 3,
                    "id": "LABEL",
                    "work_master": "WM-LABEL-LOAF",
                    "work_units": ["WU-LABELLER-1"],
                },
            ],
        },
        {
            "id": "ROLL-6PK",
            "description": "Six white rolls in a bag",
            "unit": "ea",
            "routing": "OD-ROLL-6PK",
            "steps": [
                {
                    "sequence": 1,
                    "id": "MIX",
                    "work_master": "WM-MIX-ROLL",
                    "work_units": ["WU-MIXER-1", "WU-MIXER-2"],
                },
                {
                    "sequence": 2,
                    "id": "BAKE",
                    "work_master": "WM-BAKE-ROLL",
                    "work_units": ["WU-OVEN-2"],
                },
                {
                    "sequence": 3,
                    "id": "PACK",
                    "work_master": "WM-PACK-ROLL6",
                    "work_units": ["WU-PACKER-2"],
                },
            ],
        },
    ]
    json.dumps(products)


def test_equipment_tree(plant_db: sessionmaker[Session]) -> None:
    with plant_db() as s:
        tree = equipment_tree(s)

    assert [(n["id"], n["level"]) for n in tree] == [("SPRINGFIELD", "Site")]
    area = tree[0]["children"][0]
    assert (area["id"], area["level"]) == ("SPRINGFIELD-BAKERY", "Area")
    assert "endpoint" not in tree[0]
    assert "endpoint" not in area
    shape = {
        line["id"]: [(wu["id"], wu["level"], wu["children"]) for wu in line["children"]]
        for line in area["children"]
    }
    assert shape == {
        "LINE-1": [
            ("WU-LABELLER-1", "WorkUnit", []),
            ("WU-MIXER-1", "WorkUnit", []),
            ("WU-OVEN-1", "WorkUnit", []),
        ],
        "LINE-2": [
            ("WU-MIXER-2", "WorkUnit", []),
            ("WU-OVEN-2", "WorkUnit", []),
            ("WU-PACKER-2", "WorkUnit", []),
        ],
    }
    packer = area["children"][1]["children"][2]
    assert packer["endpoint"] == {
        "protocol": "opcua",
        "url": "opc.tcp://127.0.0.1:4840/",
        "machine": "WU-PACKER-2",
        "security": "None",
    }
    json.dumps(tree)


# --- bad files --------------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Data], None]:
    def mutate(data: Data) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: tuple[Any, ...]) -> Callable[[Data], None]:
    def mutate(data: Data) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _duplicate_salt(data: Data) -> None:
    data["materials"].append(dict(data["materials"][2]))


PACKER = ("equipment", 0, "children", 0, "children", 1, "children", 2)
BAD_FILES = [
    pytest.param(
        _set(("routings", 0, "steps", 0, "materials", 0, "material"), "FLOUR-RYE"),
        "routings[0] (OD-BREAD-WHITE).steps[0] (MIX).materials[0] (FLOUR-RYE): "
        "unknown material 'FLOUR-RYE'",
        id="unknown-material",
    ),
    pytest.param(
        _duplicate_salt,
        "materials[12] (SALT): duplicate id, first at materials[2]",
        id="duplicate-id",
    ),
    pytest.param(
        _set(("work_masters", 1, "parameters", 0, "default"), 300),
        "work_masters[1] (WM-BAKE-LOAF).parameters[0] (OvenTemp): "
        "default 300 is outside [180, 250]",
        id="default-outside-limits",
    ),
    pytest.param(
        _set(("work_masters", 0, "parameters", 1, "min"), 250),
        "work_masters[0] (WM-MIX-WHITE).parameters[1] (MixSpeed): min 250 is above max 200",
        id="min-above-max",
    ),
    pytest.param(
        _delete(("materials", 0, "unit")),
        "materials[0] (FLOUR-WHEAT).unit: Field required",
        id="missing-field",
    ),
    pytest.param(
        _delete((*PACKER, "endpoint", "url")),
        "equipment[0] (SPRINGFIELD).children[0] (SPRINGFIELD-BAKERY).children[1] (LINE-2)"
        ".children[2] (WU-PACKER-2).endpoint.url: Field required",
        id="missing-nested-field",
    ),
    pytest.param(
        _set(("lots", 1, "quantity"), "plenty"),
        "lots[1] (LOT-FLOUR-0001).quantity: Input should be a valid number",
        id="wrong-type",
    ),
    pytest.param(
        _set(("materials", 0, "colour"), "white"),
        "materials[0] (FLOUR-WHEAT).colour: Extra inputs are not permitted",
        id="unknown-key",
    ),
    pytest.param(
        _set((*PACKER, "level"), "Robot"),
        "equipment[0] (SPRINGFIELD).children[0] (SPRINGFIELD-BAKERY).children[1] (LINE-2)"
        ".children[2] (WU-PACKER-2).level: Input should be 'Enterprise', 'Site'",
        id="unknown-level",
    ),
    pytest.param(
        _set(("work_masters", 0, "work_units", 0, "equipment"), "LINE-1"),
        "work_masters[0] (WM-MIX-WHITE).work_units[0] (LINE-1): "
        "LINE-1 is a ProductionLine, not a WorkUnit",
        id="work-unit-not-a-work-unit",
    ),
    pytest.param(
        _delete((*PACKER, "endpoint")),
        "work_masters[4] (WM-PACK-ROLL6).work_units[0] (WU-PACKER-2): "
        "WU-PACKER-2 has no endpoint, so no job could be sent to it",
        id="work-unit-without-endpoint",
    ),
    pytest.param(
        _set(("work_masters", 2, "work_units", 0, "equipment"), "WU-MIXER-9"),
        "work_masters[2] (WM-MIX-ROLL).work_units[0] (WU-MIXER-9): unknown equipment 'WU-MIXER-9'",
        id="unknown-equipment",
    ),
    pytest.param(
        _set(("routings", 1, "steps", 2, "work_master"), "WM-PACK-ROLL12"),
        "routings[1] (OD-ROLL-6PK).steps[2] (PACK): unknown work_master 'WM-PACK-ROLL12'",
        id="unknown-work-master",
    ),
    pytest.param(
        _set(("work_masters", 3, "process_segment"), "ROAST"),
        "work_masters[3] (WM-BAKE-ROLL): unknown process_segment 'ROAST'",
        id="unknown-process-segment",
    ),
    pytest.param(
        _set(("routings", 0, "steps", 1, "materials", 1, "material"), "ROLL-BAKED"),
        "routings[0] (OD-BREAD-WHITE).steps[1] (BAKE): the last step must produce BREAD-WHITE",
        id="last-step-does-not-produce-product",
    ),
    pytest.param(
        _set(("lots", 1, "unit"), "ea"),
        "lots[1] (LOT-FLOUR-0001): unit 'ea' does not convert to FLOUR-WHEAT's unit 'kg' "
        "(give the material a conversion for it)",
        id="lot-unit-mismatch",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_FILES)
def test_bad_file_names_the_entry_and_writes_nothing(
    plant_db: sessionmaker[Session],
    tmp_path: Path,
    mutate: Callable[[Data], None],
    message: str,
) -> None:
    before = snapshot(plant_db)
    data = example()
    # Valid new entries ahead of the error: they must not be written either.
    data["material_classes"].insert(0, {"id": "Spare", "description": "Spare parts"})
    data["lots"].insert(0, {"id": "LOT-SALT-0099", "material": "SALT", "quantity": 10})
    mutate(data)

    with pytest.raises(MasterDataError) as caught:
        load_plant_file(plant_db, write(tmp_path, data))

    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(message)
    assert str(caught.value) == caught.value.problems[0]
    assert snapshot(plant_db) == before


def test_bad_file_leaves_an_empty_database_empty(db: sessionmaker[Session], tmp_path: Path) -> None:
    before = snapshot(db)  # empty but for what migrations seed (the audit chain's head)
    data = example()
    data["work_masters"][4]["parameters"][0]["default"] = 12  # PackCount is fixed at 6

    with pytest.raises(MasterDataError, match=r"parameters\[0\] \(PackCount\): default 12"):
        load_plant_file(db, write(tmp_path, data))

    assert snapshot(db) == before
    assert row_counts(db)["material_definition"] == 0


def test_every_problem_is_reported(tmp_path: Path) -> None:
    data = example()
    data["work_masters"][1]["parameters"][0]["default"] = 300
    data["routings"][0]["steps"][0]["materials"][0]["material"] = "FLOUR-RYE"

    with pytest.raises(MasterDataError) as caught:
        parse_plant(data)

    assert len(caught.value.problems) == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("plant.yaml", "materials: [\n", "plant.yaml: not valid YAML"),
        ("plant.yaml", "materials:\n  - id: A\n    id: B\n    unit: kg\n", "duplicate key 'id'"),
        ("plant.yaml", "- id: A\n", "the top level must be a mapping"),
        ("plant.json", "{", "plant.json: not valid JSON"),
        ("plant.toml", "", "unknown plant file type"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MasterDataError, match=message):
        read_plant_file(path)


# --- checks against what is stored ------------------------------------------------------------


def test_lot_cannot_change_material(plant_db: sessionmaker[Session]) -> None:
    before = snapshot(plant_db)
    data = example()
    data["material_classes"].insert(0, {"id": "Spare"})
    data["lots"][0]["material"] = "SALT"  # LOT-FLOUR-0001, same unit, still a valid file

    with plant_db() as s:
        with pytest.raises(MasterDataError, match=r"lots\[0\] \(LOT-FLOUR-0001\): exists"):
            load_plant(s, parse_plant(data))
        # Checked before the first write: nothing even reached the session.
        assert [*s.new, *s.dirty, *s.deleted] == []

    assert snapshot(plant_db) == before


def test_step_used_by_an_order_cannot_be_removed(plant_db: sessionmaker[Session]) -> None:
    with plant_db.begin() as s:
        od = s.scalars(select(OperationsDefinition).filter_by(external_id="OD-BREAD-WHITE")).one()
        order = OperationsRequest(
            external_id="PO-1",
            operations_definition_id=od.id,
            material_definition_id=od.material_definition_id,
            quantity=10,
            unit="ea",
            due=datetime(2030, 1, 1, tzinfo=UTC),
            state="Released",
            request_hash="0" * 64,
            workflow_id="order-PO-1",
        )
        s.add(order)
        s.flush()
        for seg in od.segments:
            s.add(
                SegmentRequirement(
                    operations_request_id=order.id,
                    operations_segment_id=seg.id,
                    sequence=seg.sequence,
                    quantity=10,
                    unit="ea",
                    state="Waiting",
                )
            )
    before = snapshot(plant_db)
    data = example()
    data["routings"][0]["steps"][0]["id"] = "MIXING"  # MIX would be removed

    with plant_db() as s, pytest.raises(MasterDataError, match="step MIX is used by 1 order step"):
        load_plant(s, parse_plant(data))

    assert snapshot(plant_db) == before
    with plant_db() as s:
        assert s.scalar(select(func.count()).select_from(SegmentRequirement)) == 2


# --- partial loads (one noun at a time, as B2MML Sync messages carry) -------------------------


def load_partial(sf: sessionmaker[Session], data: Data) -> str:
    with sf.begin() as s:
        return str(load_plant(s, parse_plant(data, partial=True), partial=True))


def test_partial_load_refers_to_stored_objects(plant_db: sessionmaker[Session]) -> None:
    data: Data = {
        "materials": [{"id": "BREAD-SMALL", "material_class": "FinishedGood", "unit": "ea"}],
        "work_masters": [
            {
                "id": "WM-BAKE-SMALL",
                "process_segment": "BAKE",
                "parameters": [{"name": "OvenTemp", "default": 210, "min": 180, "max": 250}],
                "work_units": [{"equipment": "WU-OVEN-1", "ideal_cycle_time_s": 1.0}],
            }
        ],
        "routings": [
            {
                "id": "OD-BREAD-SMALL",
                "product": "BREAD-SMALL",
                "steps": [
                    {
                        "id": "MIX",
                        "work_master": "WM-MIX-WHITE",
                        "materials": [
                            {"material": "FLOUR-WHEAT", "use": "Consumed", "quantity": 0.15},
                            {"material": "DOUGH-WHITE", "use": "Produced", "quantity": 0.26},
                        ],
                    },
                    {
                        "id": "BAKE",
                        "work_master": "WM-BAKE-SMALL",
                        "materials": [
                            {"material": "DOUGH-WHITE", "use": "Consumed", "quantity": 0.26},
                            {"material": "BREAD-SMALL", "use": "Produced", "quantity": 1},
                        ],
                    },
                ],
            }
        ],
    }
    # As a complete plant file it refers to what it does not define.
    with pytest.raises(MasterDataError) as caught:
        parse_plant(data)
    assert "work_masters[0] (WM-BAKE-SMALL): unknown process_segment 'BAKE'" in (
        caught.value.problems
    )

    report = load_partial(plant_db, data)

    # The material, the work master with its parameter and unit, the routing with its two
    # steps and their four material specifications.
    assert report == "created 11, updated 0, unchanged 0, deleted 0"
    with plant_db() as s:
        small = next(p for p in list_products(s) if p["id"] == "BREAD-SMALL")
    assert [(st["work_master"], st["work_units"]) for st in small["steps"]] == [
        ("WM-MIX-WHITE", ["WU-MIXER-1", "WU-MIXER-2"]),
        ("WM-BAKE-SMALL", ["WU-OVEN-1"]),
    ]


def test_partial_equipment_hangs_under_stored_parent(plant_db: sessionmaker[Session]) -> None:
    load_partial(
        plant_db,
        {
            "equipment": [
                {
                    "id": "LINE-3",
                    "level": "ProductionLine",
                    "parent": "SPRINGFIELD-BAKERY",
                    "children": [{"id": "WU-SLICER-3", "level": "WorkUnit"}],
                },
                # Stored, without parent or endpoint keys: both stay as they are.
                {"id": "WU-OVEN-2", "level": "WorkUnit", "description": "Tunnel oven, 20 m"},
            ]
        },
    )

    with plant_db() as s:
        area = equipment_tree(s)[0]["children"][0]
    lines = {line["id"]: line for line in area["children"]}
    assert [u["id"] for u in lines["LINE-3"]["children"]] == ["WU-SLICER-3"]
    oven = next(u for u in lines["LINE-2"]["children"] if u["id"] == "WU-OVEN-2")
    assert oven["description"] == "Tunnel oven, 20 m"
    assert oven["endpoint"] is not None


def test_partial_given_lists_replace_what_is_stored(plant_db: sessionmaker[Session]) -> None:
    endpoint = {"protocol": "opcua", "url": "opc.tcp://127.0.0.1:4840/"}
    spare = {"id": "WU-SPARE", "level": "WorkUnit", "parent": "LINE-1", "endpoint": endpoint}
    load_partial(plant_db, {"equipment": [spare]})
    mix_white = example()["work_masters"][0]

    report = load_partial(
        plant_db,
        {
            "equipment": [{"id": "WU-SPARE", "level": "WorkUnit", "endpoint": None}],
            "work_masters": [{**mix_white, "test_specifications": []}],
        },
    )

    assert report.endswith("deleted 2")
    with plant_db() as s:
        line_1 = equipment_tree(s)[0]["children"][0]["children"][0]
        assert next(u for u in line_1["children"] if u["id"] == "WU-SPARE")["endpoint"] is None
        wm = s.scalars(select(WorkMaster).filter_by(external_id="WM-MIX-WHITE")).one()
        specs = s.scalars(select(TestSpecification).filter_by(work_master_id=wm.id)).all()
        assert specs == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"materials": [{"id": "M", "material_class": "Spices", "unit": "kg"}]},
            "materials[0] (M): unknown material_class 'Spices'",
        ),
        (
            {"equipment": [{"id": "WU-X", "level": "WorkUnit", "parent": "LINE-9"}]},
            "equipment[0] (WU-X): unknown parent 'LINE-9'",
        ),
        (
            {
                "equipment": [
                    {"id": "LINE-3", "level": "ProductionLine"},
                    {"id": "WU-X", "level": "WorkUnit", "parent": "LINE-3"},
                ]
            },
            "equipment[1] (WU-X): parent LINE-3 is in this file too; nest WU-X in its children",
        ),
        (
            {
                "equipment": [
                    {
                        "id": "LINE-3",
                        "level": "ProductionLine",
                        "children": [{"id": "WU-X", "level": "WorkUnit", "parent": "LINE-1"}],
                    }
                ]
            },
            "equipment[0] (LINE-3).children[0] (WU-X).parent: a nested entry's parent is the "
            "entry it is in",
        ),
        (
            {"equipment": [{"id": "LINE-1", "level": "ProductionLine", "parent": "WU-OVEN-1"}]},
            "equipment[0] (LINE-1): its parent WU-OVEN-1 lies under it; that is a loop",
        ),
        (
            {
                "equipment": [{"id": "WU-NEW", "level": "WorkUnit", "parent": "LINE-1"}],
                "work_masters": [
                    {
                        "id": "WM-NEW",
                        "process_segment": "MIX",
                        "work_units": [{"equipment": "WU-NEW", "ideal_cycle_time_s": 1}],
                    }
                ],
            },
            "work_masters[0] (WM-NEW).work_units[0] (WU-NEW): WU-NEW has no endpoint, so no "
            "job could be sent to it",
        ),
        (
            {"lots": [{"id": "LOT-X", "material": "FLOUR-WHEAT", "quantity": 1, "unit": "BAG"}]},
            "lots[0] (LOT-X): unit 'BAG' does not convert to FLOUR-WHEAT's unit 'kg' "
            "(give the material a conversion for it)",
        ),
        (
            {"equipment": [{"id": "WU-OVEN-1", "level": "WorkUnit", "endpoint": None}]},
            "equipment[0] (WU-OVEN-1): has no endpoint, but stored work master(s) WM-BAKE-LOAF "
            "run on it",
        ),
    ],
)
def test_bad_partial_load_names_the_entry_and_writes_nothing(
    plant_db: sessionmaker[Session], data: Data, problem: str
) -> None:
    before = snapshot(plant_db)
    data = {"material_classes": [{"id": "Spare"}], **data}  # valid, and not written either

    with pytest.raises(MasterDataError) as caught:
        load_partial(plant_db, data)

    assert caught.value.problems == [problem]
    assert snapshot(plant_db) == before


def test_parent_is_for_partial_loads_only() -> None:
    data = example()
    data["equipment"].append({"id": "LINE-3", "level": "ProductionLine", "parent": "SPRINGFIELD"})
    with pytest.raises(MasterDataError, match=r"equipment\[1\] \(LINE-3\)\.parent: only a partial"):
        parse_plant(data)


def test_xml_is_read_as_master_data_not_as_a_plant_file(tmp_path: Path) -> None:
    path = tmp_path / "sync.xml"
    path.write_text("<x/>", encoding="utf-8")
    with pytest.raises(MasterDataError, match="read it with read_master_data_file"):
        read_plant_file(path)
