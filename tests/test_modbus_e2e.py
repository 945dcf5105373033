"""End to end through a legacy machine: an order whose routing ends on the Modbus labeller
runs on the real stack (HTTP, Temporal, PostgreSQL, the OPC UA and Modbus simulators); its
genealogy looks like any other, and a simulator restart mid-job counts nothing twice."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from adapters.modbus.registers import decode_text
from adapters.modbus.simulator import ModbusSimulator
from mes.launch import Stack
from mes.models import JobOrder, JobResponse, MaterialActual, MaterialLot
from tests.test_e2e import api, new_order, wait_final

pytestmark = pytest.mark.postgres
LABELLER = "WU-LABELLER-1"


def labeller(stack: Stack) -> ModbusSimulator:
    return stack.modbus[LABELLER]


def label_stock(stack: Stack) -> float:
    with stack.sessions() as s:
        lot = s.scalars(select(MaterialLot).where(MaterialLot.external_id == "LOT-LABEL-0001"))
        return float(lot.one().quantity)


def label_job_rows(stack: Stack, job_id: str) -> tuple[int, list[JobResponse], list[str]]:
    """(job orders, their job responses, the produced lots) of one job, by SQL."""
    with stack.sessions() as s:
        jobs = s.scalars(select(JobOrder).where(JobOrder.external_id == job_id)).all()
        responses = list(
            s.scalars(select(JobResponse).where(JobResponse.job_order_id.in_([j.id for j in jobs])))
        )
        produced = [
            a.material_lot.external_id
            for a in s.scalars(
                select(MaterialActual).where(
                    MaterialActual.job_response_id.in_([r.id for r in responses]),
                    MaterialActual.use == "Produced",
                )
            )
        ]
        s.expunge_all()
        return len(jobs), responses, produced


async def test_order_through_the_modbus_labeller_completes_with_genealogy(stack: Stack) -> None:
    machine = labeller(stack).machine
    starts, labels = machine.starts, label_stock(stack)
    async with api(stack) as http, api(stack, "auditor") as audit:
        body = new_order("BREAD-WHITE-LBL", 12)
        r = await http.post("/api/v1/production-orders", json=body)
        assert r.status_code == 202, r.text
        done = await wait_final(http, r.json()["id"])
        assert done["state"] == "Completed"
        steps = [(j["segment"], j["equipment"], j["state"]) for j in done["job_orders"]]
        assert steps[2] == ("LABEL", LABELLER, "Completed")
        assert [s[2] for s in steps] == ["Completed"] * 3
        (produced,) = done["produced_lots"]
        assert (produced["material"], produced["quantity"]) == ("BREAD-WHITE-LBL", 12)

        back = (await audit.get(f"/api/v1/genealogy/lots/{produced['lot']}/backward")).json()
        reached = {node["lot"]: node["depth"] for node in back["lots"]}
        bread = f"LOT-{body['order_number']}-02"
        assert reached["LOT-LABEL-0001"] == 1
        assert reached[bread] == 1
        assert {"LOT-FLOUR-0001", "LOT-SALT-0001", "LOT-YEAST-0001"} & set(reached)
        fwd = (await audit.get("/api/v1/genealogy/lots/LOT-LABEL-0001/forward")).json()
        assert produced["lot"] in {node["lot"] for node in fwd["lots"]}

    jobs, responses, lots = label_job_rows(stack, f"{body['order_number']}-03")
    assert jobs == 1
    assert [(r.processed_count, r.defective_count) for r in responses] == [(12, 0)]
    assert lots == [produced["lot"]]
    assert machine.starts == starts + 1
    assert label_stock(stack) == labels - 12
    # Cleared: the labeller is idle and free for the next job.
    assert machine.state == machine.map.states.idle


async def test_simulator_restart_mid_job_finishes_once_counting_once(stack: Stack) -> None:
    """The labeller's server goes away while the job runs and comes back on its port: the
    MES loses the connection, retries, and the job ends once, counted once (by SQL)."""
    sim = labeller(stack)
    machine = sim.machine
    starts, labels = machine.starts, label_stock(stack)
    cycle, machine.cycle_time_s = machine.cycle_time_s, 2.5
    try:
        async with api(stack) as http:
            body = new_order("BREAD-WHITE-LBL", 30)
            r = await http.post("/api/v1/production-orders", json=body)
            assert r.status_code == 202, r.text
            job_id = f"{body['order_number']}-03"
            record = slice(machine.map.job.address, machine.map.job.address + 52)
            async with asyncio.timeout(60):
                while not (
                    decode_text(machine.holding[record]) == job_id
                    and machine.state == machine.map.states.running
                ):
                    await asyncio.sleep(0.05)
            await sim.__aexit__(None, None, None)
            await asyncio.sleep(1.5)  # the MES's polls fail meanwhile
            await sim.__aenter__()
            done = await wait_final(http, r.json()["id"])
    finally:
        machine.cycle_time_s = cycle
    assert done["state"] == "Completed"
    jobs, responses, lots = label_job_rows(stack, job_id)
    assert jobs == 1
    assert [(r.processed_count, r.defective_count) for r in responses] == [(30, 0)]
    assert len(lots) == 1
    assert machine.starts == starts + 1
    assert label_stock(stack) == labels - 30
