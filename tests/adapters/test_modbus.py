"""The Modbus adapter against the legacy machine simulator: a real pymodbus server on a free
loopback port, no mocks. Word orders, the recipe download, idempotent start, counts by
counter deltas (modulo 2**32), what the port refuses, and the register map's checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.modbus.client import ModbusJobClient
from adapters.modbus.registers import RegisterMap, decode, encode
from adapters.modbus.simulator import LegacyMachine, ModbusSimulator
from mes.b2mml.parsing import B2MMLError
from mes.machines import (
    CommandNotSupportedError,
    InvalidRequestError,
    JobOrderData,
    JobState,
    MachineUnreachableError,
    MaterialRequirement,
    RecipeParameter,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)
from mes.masterdata import parse_plant, read_master_data_file
from mes.masterdata.checks import MasterDataError
from tests.b2mml.test_endpoint_security import equipment
from tests.b2mml.test_sync import plant_of

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
LABELLER = (
    "equipment[0] (SPRINGFIELD).children[0] (SPRINGFIELD-BAKERY).children[0] (LINE-1)"
    ".children[2] (WU-LABELLER-1)"
)


def settings(word_order: str = "ABCD", **changes: Any) -> dict[str, Any]:
    """A register map as a plant file's endpoint settings."""
    base: dict[str, Any] = {
        "word_order": word_order,
        "timeout_s": 1.0,
        "setpoints": [
            {"parameter": "Quantity", "address": 0, "type": "uint32"},
            {"parameter": "Speed", "address": 2, "type": "float32"},
            {"parameter": "Offset", "address": 4, "type": "int32", "scale": 0.01},
            {"parameter": "Temp", "address": 7, "type": "int16", "scale": 0.1},
        ],
        "job": {"address": 100, "length": 20},
        "coils": {"start": 0, "stop": 1, "reset": 2, "recipe_valid": 3, "pause": 4},
        "inputs": {"state": 10, "processed": 12, "defective": 14},
        "status": {"ready": 0},
    }
    return base | changes


def order(job: str = "JO-1", quantity: float = 5, **params: float) -> JobOrderData:
    values = {"Speed": 1.25, "Offset": -123.45, "Temp": 21.5} | params
    return JobOrderData(
        job,
        "WM-LABEL",
        parameters=[RecipeParameter(k, v) for k, v in values.items()],
        material_requirements=[
            MaterialRequirement("BREAD", "Consumed", quantity, "ea", "LOT-BREAD-1"),
            MaterialRequirement("LABEL", "Consumed", quantity, "ea", "LOT-LABEL-1"),
            MaterialRequirement("BREAD-LBL", "Produced", quantity, "ea"),
        ],
    )


async def wait_state(client: ModbusJobClient, job: str, state: JobState) -> None:
    async with asyncio.timeout(10):
        while await client.job_state(job) != state:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("word_order", ORDERS)
def test_values_round_trip_in_every_word_order(word_order: str) -> None:
    for type_, value in (("float32", -1234.5), ("int32", -2_000_000_000), ("uint32", 4e9)):
        assert decode(encode(value, type_, word_order), type_, word_order) == value
    # Byte positions: 0x01020304 as A B C D.
    words = {"ABCD": [0x0102, 0x0304], "CDAB": [0x0304, 0x0102], "BADC": [0x0201, 0x0403]}
    words["DCBA"] = [0x0403, 0x0201]
    assert encode(0x01020304, "uint32", word_order) == words[word_order]


@pytest.mark.parametrize("word_order", ORDERS)
async def test_setpoints_and_counters_round_trip_against_the_simulator(word_order: str) -> None:
    """The MES writes float32/int32/uint32/int16 setpoints the machine reads as sent, and reads
    the machine's uint32 counters right, across the wrap at 2**32."""
    registers = RegisterMap.model_validate(settings(word_order))
    machine = LegacyMachine(registers, cycle_time_s=0.1, counter_start=2**32 - 2)
    async with (
        ModbusSimulator(machine) as sim,
        ModbusJobClient(sim.url, "L1", settings(word_order)) as plc,
    ):
        await plc.store_and_start(order(quantity=70000, Speed=-3.5e-3, Offset=-21474836.47))
        assert machine.setpoint("Quantity") == 70000
        assert machine.setpoint("Speed") == pytest.approx(-3.5e-3, rel=1e-7)
        assert machine.setpoint("Offset") == pytest.approx(-21474836.47)
        assert machine.setpoint("Temp") == pytest.approx(21.5)
        await wait_state(plc, "JO-1", JobState.ENDED)
        response = await plc.job_response("JO-1")
    assert machine.processed == (2**32 - 2 + 70000) % 2**32  # wrapped
    assert response.processed_count == 70000
    assert response.defective_count == 0


async def test_a_device_with_another_word_order_reads_other_values() -> None:
    """Why the word order is a setting: the same registers mean another number."""
    registers = RegisterMap.model_validate(settings("ABCD"))
    machine = LegacyMachine(registers, cycle_time_s=5, word_order="CDAB")
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", settings()) as plc:
        await plc.store_and_start(order(Speed=1.25))
        assert machine.setpoint("Speed") != pytest.approx(1.25)


async def test_download_start_retry_and_response() -> None:
    """Refused unless idle; a retry never starts twice; the MES builds the job response:
    counts by delta, consumed lots as required, the produced lot as planned."""
    registers = RegisterMap.model_validate(settings())
    machine = LegacyMachine(registers, cycle_time_s=0.4, defect_rate=0.5, seed=1)
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", settings()) as plc:
        assert (await plc.capacity()).free == 1
        job = order("JO-A", 20)
        await plc.store_and_start(job)
        await plc.store_and_start(job)  # a retry after a lost reply
        assert machine.starts == 1
        assert machine.coils[registers.coils.recipe_valid]
        assert (await plc.capacity()).free == 0
        with pytest.raises(UnableToAcceptJobOrderError, match="holds job 'JO-A'"):
            await plc.store_and_start(order("JO-B"))
        with pytest.raises(UnknownJobOrderError):
            await plc.job_state("JO-B")
        await wait_state(plc, "JO-A", JobState.ENDED)
        await plc.store_and_start(job)  # a retry after the end: still once
        assert machine.starts == 1
        response = await plc.job_response("JO-A", job)
        assert response.state is JobState.ENDED
        assert response.processed_count == 20
        assert 0 < response.defective_count < 20
        assert response.start_time is not None
        assert response.end_time is not None
        actuals = {
            (a.material_definition_id, a.use, a.lot_id, a.quantity)
            for a in response.material_actuals
        }
        assert actuals == {
            ("BREAD", "Consumed", "LOT-BREAD-1", 20),
            ("LABEL", "Consumed", "LOT-LABEL-1", 20),
            ("BREAD-LBL", "Produced", "JO-A-OUT", 20),
        }
        await plc.clear("JO-A")
        assert machine.state == registers.states.idle
        assert (await plc.capacity()).free == 1
        # The next job counts from its own start.
        await plc.store_and_start(order("JO-B", 3))
        await wait_state(plc, "JO-B", JobState.ENDED)
        assert (await plc.job_response("JO-B")).processed_count == 3
        assert machine.starts == 2


async def test_refuses_a_machine_that_is_not_idle() -> None:
    registers = RegisterMap.model_validate(settings())
    machine = LegacyMachine(registers, cycle_time_s=5)
    machine.coils[registers.coils.recipe_valid] = True
    machine.command(registers.coils.start, True)  # started at its panel, no job record
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", settings()) as plc:
        with pytest.raises(UnableToAcceptJobOrderError, match="not idle"):
            await plc.store_and_start(order())
        assert machine.starts == 1


async def test_recipe_errors_are_refused_before_anything_starts() -> None:
    machine = LegacyMachine(RegisterMap.model_validate(settings()), cycle_time_s=5)
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", settings()) as plc:
        with pytest.raises(InvalidRequestError, match="setpoint Temp: 4000 does not fit int16"):
            await plc.store_and_start(order(Temp=4000))
        missing = JobOrderData("JO-2", "WM", parameters=[RecipeParameter("Speed", 1)])
        with pytest.raises(InvalidRequestError, match="setpoint Offset: not in the job's recipe"):
            await plc.store_and_start(missing)
        assert machine.starts == 0


async def test_pause_resume_abort_where_the_map_has_coils() -> None:
    registers = RegisterMap.model_validate(settings())
    machine = LegacyMachine(registers, cycle_time_s=1.0)
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", settings()) as plc:
        job = order("JO-P", 10)
        await plc.store_and_start(job)
        await plc.pause("JO-P")
        assert await plc.job_state("JO-P") is JobState.INTERRUPTED
        await plc.resume("JO-P")
        assert await plc.job_state("JO-P") is JobState.RUNNING
        await asyncio.sleep(0.3)
        await plc.abort("JO-P")
        response = await plc.job_response("JO-P", job)
        assert response.state is JobState.ABORTED
        assert 0 < response.processed_count < 10
        share = response.processed_count / 10
        assert {a.use for a in response.material_actuals} == {"Consumed"}
        assert all(a.quantity == pytest.approx(10 * share) for a in response.material_actuals)

    bare = settings(coils={"start": 0, "recipe_valid": 3})
    machine = LegacyMachine(RegisterMap.model_validate(bare), cycle_time_s=1.0)
    async with ModbusSimulator(machine) as sim, ModbusJobClient(sim.url, "L1", bare) as plc:
        await plc.store_and_start(order("JO-Q"))
        for command in (plc.pause, plc.resume, plc.abort, plc.cancel, plc.revoke_start):
            with pytest.raises(CommandNotSupportedError):
                await command("JO-Q")


async def test_lost_connection_and_restart_mid_job_count_once() -> None:
    """The server goes away mid-job and comes back on its port (the machine's memory kept,
    as a PLC's retentive memory is): the MES sees it unreachable, then the job ends once,
    counted once."""
    registers = RegisterMap.model_validate(settings())
    machine = LegacyMachine(registers, cycle_time_s=0.6)
    sim = await ModbusSimulator(machine).__aenter__()
    try:
        async with ModbusJobClient(sim.url, "L1", settings()) as plc:
            await plc.store_and_start(order("JO-R", 30))
            await sim.__aexit__(None, None, None)
            with pytest.raises(MachineUnreachableError):
                await plc.job_state("JO-R")
        await asyncio.sleep(0.2)
        await sim.__aenter__()  # on the same port
        async with ModbusJobClient(sim.url, "L1", settings()) as plc:
            await plc.store_and_start(order("JO-R", 30))  # the dispatch retried: not again
            await wait_state(plc, "JO-R", JobState.ENDED)
            assert (await plc.job_response("JO-R")).processed_count == 30
            assert (await plc.job_response("JO-R")).processed_count == 30
    finally:
        await sim.__aexit__(None, None, None)
    assert (machine.starts, machine.ends, machine.processed) == (1, 1, 30)


async def test_unreachable_and_bad_settings_are_typed_errors() -> None:
    with pytest.raises(MachineUnreachableError):
        async with ModbusJobClient("modbus://127.0.0.1:1", "L1", settings()):
            pass
    with pytest.raises(InvalidRequestError, match="not a modbus://host:port URL"):
        ModbusJobClient("opc.tcp://127.0.0.1:4840", "L1", settings())
    with pytest.raises(InvalidRequestError, match="register map"):
        ModbusJobClient("modbus://127.0.0.1:502", "L1", {"coils": {}})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"setpoints": [{"parameter": "A", "address": 0, "type": "float64"}]},
            "settings.setpoints.0.type: Input should be 'int16', 'uint16', 'int32', 'uint32' "
            "or 'float32'",
        ),
        (
            {
                "setpoints": [
                    {"parameter": "A", "address": 0, "type": "float32"},
                    {"parameter": "B", "address": 1, "type": "int16"},
                ]
            },
            "settings.setpoints[1] (B) at holding registers 1 overlaps setpoints[0] (A) "
            "(holding registers 0-1)",
        ),
        (
            {"setpoints": [{"parameter": "A", "address": 65535, "type": "uint32"}]},
            "settings.setpoints[0] (A): holding registers 65535-65536 run past 65535",
        ),
        (
            {"coils": {"start": 70000, "recipe_valid": 1}},
            "settings.coils.start: Input should be less than or equal to 65535",
        ),
        (
            {"coils": {"start": 1, "recipe_valid": 1}},
            "settings.coils.recipe_valid at coils 1 overlaps coils.start (coils 1-1)",
        ),
        (
            {"inputs": {"state": 1, "processed": 0, "defective": 4}},
            "settings.inputs.state at input registers 1 overlaps inputs.processed "
            "(input registers 0-1)",
        ),
        ({"word_order": "BACD"}, "settings.word_order: Input should be 'ABCD'"),
        ({"job": {"address": 2}}, "settings.job at holding registers 2 overlaps setpoints[1]"),
        ({"colis": {}}, "settings.colis: Extra inputs are not permitted"),
    ],
)
def test_plant_file_map_checks_name_the_field(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    plant = yaml.safe_load(Path("mes/samples/plant.yaml").read_text())
    labeller = plant["equipment"][0]["children"][0]["children"][0]["children"][2]
    assert labeller["id"] == "WU-LABELLER-1"
    labeller["endpoint"]["settings"] = settings() | change
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(plant))
    with pytest.raises(MasterDataError) as refused:
        read_master_data_file(tmp_path / "plant.yaml")
    where = f"{LABELLER}.endpoint."
    assert any(p.startswith(where + problem) for p in refused.value.problems), refused.value


def test_endpoint_url_and_security_are_checked(tmp_path: Path) -> None:
    plant = yaml.safe_load(Path("mes/samples/plant.yaml").read_text())
    labeller = plant["equipment"][0]["children"][0]["children"][0]["children"][2]
    labeller["endpoint"] |= {"url": "tcp://plc:502", "security": "Basic256Sha256-Sign"}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(plant))
    with pytest.raises(MasterDataError) as refused:
        read_master_data_file(tmp_path / "plant.yaml")
    where = f"{LABELLER}.endpoint"
    assert refused.value.problems == [
        f"{where}.url: 'tcp://plc:502' is not a modbus://host:port URL",
        f"{where}.security: Modbus has no security; it must be None",
    ]


def test_b2mml_equipment_property_carries_the_register_map() -> None:
    endpoint = (("ControllerProtocol", "modbus"), ("ControllerURL", "modbus://plc:502"))
    data = equipment(*endpoint, ("ControllerRegisterMap", json.dumps(settings("DCBA"))))
    plant = parse_plant(plant_of(data), partial=True)
    loaded = plant.equipment[0].endpoint
    assert loaded is not None
    assert RegisterMap.model_validate(loaded.settings).word_order == "DCBA"
    with pytest.raises(B2MMLError, match="ControllerRegisterMap is not a JSON object"):
        plant_of(equipment(*endpoint, ("ControllerRegisterMap", "[1, 2")))
