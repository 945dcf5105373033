"""OPC 10031-4 job control end to end: the PLC simulator on a free loopback port, spoken to
over OPC UA by JobControlClient (and once by a bare asyncua client, to pin the address space
other OPC UA tools see)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError

from adapters.opcua.client import JobControlClient, raise_for_status
from adapters.opcua.model import JOBCONTROL_NS_URI, PACKML_EXECUTE, PACKML_HELD, PACKML_IDLE
from adapters.opcua.simulator import SIM_NAMESPACE_URI, PlcSimulator, SimUnit
from mes.machines import (
    InvalidJobOrderStatusError,
    InvalidRequestError,
    JobControlError,
    JobOrderData,
    JobState,
    MachineUnreachableError,
    MaterialRequirement,
    RecipeParameter,
    ReturnStatus,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)

CYCLE_S = 0.4
MEASURED = {"Temperature": (180.0, "°C"), "Torque": (12.5, "N·m")}
# One unit per test that runs jobs, so no test waits behind another's job. Units whose test
# acts on a running job run longer, so a slow CI machine cannot finish the job first.
UNITS = {
    "Filler": CYCLE_S,
    "Mixer": CYCLE_S,
    "Oven": CYCLE_S,
    "Press": 0.6,
    "Packer": 2.0,
    "Labeler": 2.0,
    "Capper": CYCLE_S,
    "Sorter": CYCLE_S,
    # wait_for_change: a job waits behind another for a whole cycle, long against its ticks.
    "Proofer": 1.0,
    "Slicer": CYCLE_S,
    "Cooler": CYCLE_S,
}


@dataclass
class Plc:
    url: str
    sim: PlcSimulator


@pytest.fixture(scope="session")
async def plc() -> AsyncIterator[Plc]:
    units = [SimUnit(n, cycle_time_s=c, measured=MEASURED) for n, c in UNITS.items()]
    async with PlcSimulator(units, port=0) as sim:
        yield Plc(sim.url, sim)


def cake_order(
    job_order_id: str, *, lot: str = "", qty: float = 12, priority: int = 0
) -> JobOrderData:
    return JobOrderData(
        job_order_id=job_order_id,
        work_master_id="WM-BAKE",
        description="bake a tray",
        priority=priority,
        parameters=[RecipeParameter("OvenTemperature", 180.0, "°C")],
        material_requirements=[
            MaterialRequirement("FLOUR", "Consumed", 2.5, "kg", "LOT-FLOUR-7"),
            MaterialRequirement("SUGAR", "Consumed", 0.75, "kg", "LOT-SUGAR-3"),
            MaterialRequirement("CAKE", "Produced", qty, "pcs", lot),
        ],
    )


async def wait_for_state(
    plc: JobControlClient, job_order_id: str, state: JobState, timeout_s: float = 3.0
) -> None:
    async with asyncio.timeout(timeout_s):
        while True:  # the job state lives on the machine: polling is the protocol
            if await plc.job_state(job_order_id) is state:
                return
            await asyncio.sleep(0.02)


def server_subscriptions(plc: Plc) -> int:
    """Subscriptions alive on the simulator's server (asyncua publishes no count of them)."""
    server = plc.sim._server
    assert server is not None
    return len(server.iserver.subscription_service.subscriptions)


async def subscribed(plc: Plc, count: int, timeout_s: float = 2.0) -> None:
    """Wait until the simulator's server holds ``count`` subscriptions."""
    async with asyncio.timeout(timeout_s):
        while True:
            if server_subscriptions(plc) == count:
                return
            await asyncio.sleep(0.01)


def count_reads(client: JobControlClient) -> list[int]:
    """Count the client's JobOrderList reads (one element per read)."""
    reads: list[int] = []
    read = client.list_jobs

    async def counted() -> list[tuple[str, JobState]]:
        reads.append(1)
        return await read()

    client.list_jobs = counted  # type: ignore[method-assign]
    return reads


async def test_store_and_start_runs_to_ended_with_a_job_response(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Filler") as client:
        await client.store_and_start(cake_order("JO-1"))
        await wait_for_state(client, "JO-1", JobState.RUNNING, timeout_s=1.0)
        assert (await client.job_response("JO-1")).packml_state == PACKML_EXECUTE

        seen: list[JobState] = []
        final = await client.wait_until_final("JO-1", poll_s=0.05, on_poll=seen.append)
        response = await client.job_response("JO-1")

    assert final is JobState.ENDED
    assert seen[0] is JobState.RUNNING
    assert seen[-1] is JobState.ENDED
    assert response.state is JobState.ENDED
    assert response.start_time is not None
    assert response.end_time is not None
    assert (response.end_time - response.start_time).total_seconds() >= CYCLE_S * 0.9
    actuals = {(a.use, a.material_definition_id): a for a in response.material_actuals}
    assert actuals[("Produced", "CAKE")].lot_id == "JO-1-OUT"
    assert actuals[("Produced", "CAKE")].quantity == 12
    assert actuals[("Produced", "CAKE")].unit == "pcs"
    assert actuals[("Consumed", "FLOUR")].lot_id == "LOT-FLOUR-7"
    assert actuals[("Consumed", "FLOUR")].quantity == 2.5
    assert actuals[("Consumed", "SUGAR")].lot_id == "LOT-SUGAR-3"
    assert actuals[("Consumed", "SUGAR")].quantity == 0.75
    measured = {m.name: m for m in response.data}
    assert set(measured) == set(MEASURED)
    for name, (nominal, unit) in MEASURED.items():
        assert measured[name].unit == unit
        assert measured[name].value == pytest.approx(nominal, rel=0.021)
    assert (response.processed_count, response.defective_count) == (12, 0)
    assert response.packml_state == PACKML_IDLE


async def test_produced_lot_from_the_order_is_kept(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Filler") as client:
        await client.store_and_start(cake_order("JO-LOT", lot="CAKE-2024-001", qty=3))
        assert await client.wait_until_final("JO-LOT", poll_s=0.05) is JobState.ENDED
        produced = [
            a for a in (await client.job_response("JO-LOT")).material_actuals if a.use == "Produced"
        ]
    assert [(a.lot_id, a.quantity) for a in produced] == [("CAKE-2024-001", 3)]


async def test_store_and_start_is_idempotent_on_job_order_id(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Mixer") as client:
        await client.store_and_start(cake_order("JO-RETRY"))
        await client.store_and_start(cake_order("JO-RETRY"))  # a retry after a lost reply
        jobs = [job_id for job_id, _ in await client.list_jobs()]
        assert jobs.count("JO-RETRY") == 1
        assert await client.wait_until_final("JO-RETRY", poll_s=0.05) is JobState.ENDED
        # A retry arriving after the job ended still creates nothing.
        await client.store_and_start(cake_order("JO-RETRY"))
        assert await client.list_jobs() == [("JO-RETRY", JobState.ENDED)]
        await client.clear("JO-RETRY")


async def test_store_then_start_and_store_and_start_of_a_stored_job_starts_it(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Mixer") as client:
        await client.store(cake_order("JO-STORED"))
        assert await client.job_state("JO-STORED") is JobState.NOT_ALLOWED_TO_START
        await client.store_and_start(cake_order("JO-STORED"))
        assert await client.wait_until_final("JO-STORED", poll_s=0.05) is JobState.ENDED
        assert [j for j, _ in await client.list_jobs()].count("JO-STORED") == 1


async def test_unknown_job_order_id(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Oven") as client:
        with pytest.raises(UnknownJobOrderError):
            await client.job_state("NO-SUCH-JOB")
        with pytest.raises(UnknownJobOrderError) as raised:
            await client.pause("NO-SUCH-JOB")
        assert raised.value.status == ReturnStatus.UNKNOWN_JOB_ORDER_ID
        assert not raised.value.retryable
        with pytest.raises(UnknownJobOrderError):
            await client.job_response("NO-SUCH-JOB")


async def test_pause_stops_the_clock_and_resume_finishes_the_job(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Press") as client:
        await client.store_and_start(cake_order("JO-PAUSE"))
        await wait_for_state(client, "JO-PAUSE", JobState.RUNNING, timeout_s=1.0)
        await client.pause("JO-PAUSE")
        assert await client.job_state("JO-PAUSE") is JobState.INTERRUPTED
        assert (await client.job_response("JO-PAUSE")).packml_state == PACKML_HELD
        with pytest.raises(InvalidJobOrderStatusError):
            await client.pause("JO-PAUSE")

        await asyncio.sleep(UNITS["Press"] + 0.1)  # longer than the job needs, but paused
        assert await client.job_state("JO-PAUSE") is JobState.INTERRUPTED

        await client.resume("JO-PAUSE")
        assert await client.job_state("JO-PAUSE") is JobState.RUNNING
        assert await client.wait_until_final("JO-PAUSE", poll_s=0.05) is JobState.ENDED
        response = await client.job_response("JO-PAUSE")
    assert response.start_time is not None
    assert response.end_time is not None
    assert (response.end_time - response.start_time).total_seconds() >= 2 * UNITS["Press"]


async def test_stop_ends_the_job_with_a_partial_quantity(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Packer") as client:
        await client.store_and_start(cake_order("JO-STOP", qty=100))
        await wait_for_state(client, "JO-STOP", JobState.RUNNING, timeout_s=1.0)
        await asyncio.sleep(0.3)
        await client.stop("JO-STOP")
        assert await client.job_state("JO-STOP") is JobState.ENDED
        response = await client.job_response("JO-STOP")
    produced = next(a for a in response.material_actuals if a.use == "Produced")
    assert 0 < produced.quantity < 100
    assert response.processed_count == produced.quantity


async def test_abort_then_clear(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Labeler") as client:
        await client.store_and_start(cake_order("JO-ABORT"))
        await wait_for_state(client, "JO-ABORT", JobState.RUNNING, timeout_s=1.0)
        await client.abort("JO-ABORT")
        assert await client.job_state("JO-ABORT") is JobState.ABORTED
        assert await client.wait_until_final("JO-ABORT", poll_s=0.05) is JobState.ABORTED
        response = await client.job_response("JO-ABORT")
        assert response.state is JobState.ABORTED
        assert [a.use for a in response.material_actuals if a.use == "Produced"] == []
        assert response.packml_state == PACKML_IDLE

        await client.clear("JO-ABORT")
        with pytest.raises(UnknownJobOrderError):
            await client.job_state("JO-ABORT")


async def test_cancel_a_stored_job_that_never_started(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Capper") as client:
        await client.store(cake_order("JO-CANCEL"))
        await asyncio.sleep(CYCLE_S / 2)
        assert await client.job_state("JO-CANCEL") is JobState.NOT_ALLOWED_TO_START
        with pytest.raises(InvalidJobOrderStatusError):
            await client.clear("JO-CANCEL")  # Clear is for ended jobs only
        await client.cancel("JO-CANCEL")
        assert "JO-CANCEL" not in dict(await client.list_jobs())


async def test_waiting_jobs_start_by_priority_then_arrival(plc: Plc) -> None:
    async with JobControlClient(plc.url, "Sorter") as client:
        await client.store_and_start(cake_order("JO-FIRST"))
        await wait_for_state(client, "JO-FIRST", JobState.RUNNING, timeout_s=1.0)
        await client.store_and_start(cake_order("JO-LOW", priority=1))
        await client.store_and_start(cake_order("JO-HIGH", priority=9))
        assert await client.job_state("JO-LOW") is JobState.ALLOWED_TO_START
        assert await client.wait_until_final("JO-FIRST", poll_s=0.02) is JobState.ENDED
        await wait_for_state(client, "JO-HIGH", JobState.RUNNING, timeout_s=1.0)
        assert await client.job_state("JO-LOW") is JobState.ALLOWED_TO_START
        for job in ("JO-HIGH", "JO-LOW"):
            await client.abort(job)


async def test_wait_for_change_is_woken_by_the_subscription(plc: Plc) -> None:
    baseline = server_subscriptions(plc)
    async with JobControlClient(plc.url, "Proofer") as client:
        await client.store_and_start(cake_order("JO-AHEAD"))
        await wait_for_state(client, "JO-AHEAD", JobState.RUNNING, timeout_s=1.0)
        await client.store_and_start(cake_order("JO-BEHIND"))
        assert await client.job_state("JO-BEHIND") is JobState.ALLOWED_TO_START
        reads = count_reads(client)

        # Ticks far beyond the wait: only a notification can end it in time.
        ticks: list[JobState] = []
        async with asyncio.timeout(UNITS["Proofer"] + 2):
            state = await client.wait_for_change(
                "JO-BEHIND", JobState.ALLOWED_TO_START, on_tick=ticks.append, tick_s=60
            )
        assert state is JobState.RUNNING
        assert len(reads) == 1  # the first look; the change came pushed, not polled
        assert ticks == []
        assert server_subscriptions(plc) == baseline
        assert await client.job_state("JO-AHEAD") is JobState.ENDED
        reads.clear()

        # Ticks well inside the cycle: on_tick sees the unchanged state while it waits.
        async with asyncio.timeout(UNITS["Proofer"] + 2):
            state = await client.wait_for_change(
                "JO-BEHIND", JobState.RUNNING, on_tick=ticks.append, tick_s=0.1, publish_ms=50
            )
        assert state is JobState.ENDED
        assert len(ticks) >= 3
        assert set(ticks) == {JobState.RUNNING}
        # The first look and one read per tick: no busy loop in between.
        assert len(reads) <= 1 + len(ticks) + 1
        assert server_subscriptions(plc) == baseline


async def test_wait_for_change_returns_at_once_when_the_state_already_differs(plc: Plc) -> None:
    baseline = server_subscriptions(plc)
    async with JobControlClient(plc.url, "Slicer") as client:
        await client.store(cake_order("JO-DIFFERS"))
        ticks: list[JobState] = []
        async with asyncio.timeout(1.0):
            state = await client.wait_for_change(
                "JO-DIFFERS", JobState.ALLOWED_TO_START, on_tick=ticks.append, tick_s=0.01
            )
        assert state is JobState.NOT_ALLOWED_TO_START
        assert ticks == []
        assert server_subscriptions(plc) == baseline
        with pytest.raises(UnknownJobOrderError):
            await client.wait_for_change("NO-SUCH-JOB", JobState.RUNNING)
        await client.cancel("JO-DIFFERS")


async def test_wait_for_change_raises_when_the_job_is_cancelled_meanwhile(plc: Plc) -> None:
    baseline = server_subscriptions(plc)
    async with JobControlClient(plc.url, "Slicer") as client:
        await client.store(cake_order("JO-GONE"))
        waiting = asyncio.create_task(
            client.wait_for_change("JO-GONE", JobState.NOT_ALLOWED_TO_START, tick_s=60)
        )
        await subscribed(plc, baseline + 1)
        async with JobControlClient(plc.url, "Slicer") as other:
            await other.cancel("JO-GONE")
        with pytest.raises(UnknownJobOrderError) as raised:
            async with asyncio.timeout(2.0):
                await waiting
        assert raised.value.status == ReturnStatus.UNKNOWN_JOB_ORDER_ID
        assert server_subscriptions(plc) == baseline


async def test_a_cancelled_wait_deletes_its_subscription(plc: Plc) -> None:
    baseline = server_subscriptions(plc)
    async with JobControlClient(plc.url, "Cooler") as client:
        await client.store(cake_order("JO-PARKED"))
        waiting = asyncio.create_task(
            client.wait_for_change("JO-PARKED", JobState.NOT_ALLOWED_TO_START, tick_s=60)
        )
        await subscribed(plc, baseline + 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Deleted by the wait itself, not by the session closing.
        assert server_subscriptions(plc) == baseline
        await client.cancel("JO-PARKED")


async def test_wait_for_change_polls_a_server_without_subscriptions(
    plc: Plc, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*_args: object, **_kwargs: object) -> None:
        # asyncua leaves UaStatusCodeError.__init__ unannotated.
        raise UaStatusCodeError(StatusCodes.BadServiceUnsupported)  # type: ignore[no-untyped-call]

    baseline = server_subscriptions(plc)
    async with JobControlClient(plc.url, "Cooler") as client:
        assert client._client is not None
        monkeypatch.setattr(client._client, "create_subscription", refuse)
        await client.store(cake_order("JO-POLLED"))
        ticks: list[JobState] = []
        waiting = asyncio.create_task(
            client.wait_for_change(
                "JO-POLLED", JobState.NOT_ALLOWED_TO_START, on_tick=ticks.append, tick_s=0.2
            )
        )
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await client.start("JO-POLLED")
        async with asyncio.timeout(2.0):
            state = await waiting
        assert state in (JobState.ALLOWED_TO_START, JobState.RUNNING)
        assert set(ticks) == {JobState.NOT_ALLOWED_TO_START}
        assert server_subscriptions(plc) == baseline
        await client.abort("JO-POLLED")


async def test_wait_for_change_on_a_machine_that_goes_away_is_a_retryable_error() -> None:
    sim = PlcSimulator([SimUnit("Lonely", cycle_time_s=CYCLE_S)], port=0)
    await sim.start()
    try:
        async with JobControlClient(sim.url, "Lonely", timeout_s=2) as client:
            await client.store(cake_order("JO-ORPHAN"))
            waiting = asyncio.create_task(
                client.wait_for_change("JO-ORPHAN", JobState.NOT_ALLOWED_TO_START, tick_s=60)
            )
            await asyncio.sleep(0.3)
            await sim.stop()
            with pytest.raises(MachineUnreachableError) as raised:
                async with asyncio.timeout(5.0):
                    await waiting
            assert raised.value.retryable
    finally:
        await sim.stop()


async def test_a_plain_asyncua_client_finds_the_job_by_the_standard_browse_names(
    plc: Plc,
) -> None:
    async with JobControlClient(plc.url, "Oven") as client:
        await client.store(cake_order("JO-RAW"))

    async with Client(plc.url) as raw:
        await raw.load_data_type_definitions()
        jc = await raw.get_namespace_index(JOBCONTROL_NS_URI)
        sim = await raw.get_namespace_index(SIM_NAMESPACE_URI)
        control = await raw.nodes.objects.get_child(
            [f"{sim}:Oven", f"{sim}:JobManagement", f"{sim}:JobOrderControl"]
        )
        job_order_list = await control.get_child(f"{jc}:JobOrderList")
        entries = {e.JobOrder.JobOrderID: e for e in await job_order_list.read_value()}
        entry = entries["JO-RAW"]
        assert entry.State[0].StateNumber == JobState.NOT_ALLOWED_TO_START
        assert entry.State[0].StateText.Text == "NotAllowedToStart"
        assert [m.MaterialLotID for m in entry.JobOrder.MaterialRequirements][:2] == [
            "LOT-FLOUR-7",
            "LOT-SUGAR-3",
        ]
        assert entry.JobOrder.WorkMasterID[0].ID == "WM-BAKE"

        # Storing a known JobOrderID again is refused: Uncertain (asyncua's call_method
        # raises on anything but Good) with UnableToAcceptJobOrder (bit 4), one job left.
        store = await control.get_child(f"{jc}:Store")
        request = ua.CallMethodRequest(
            ObjectId=control.nodeid,
            MethodId=store.nodeid,
            InputArguments=[
                ua.Variant(entry.JobOrder, ua.VariantType.ExtensionObject),
                ua.Variant([], ua.VariantType.LocalizedText),
            ],
        )
        (result,) = await raw.uaclient.call([request])
        assert result.StatusCode.is_uncertain()
        assert [v.Value for v in result.OutputArguments] == [
            ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER
        ]
        ids = [e.JobOrder.JobOrderID for e in await job_order_list.read_value()]
        assert ids.count("JO-RAW") == 1

        results = await raw.nodes.objects.get_child(
            [f"{sim}:Oven", f"{sim}:JobManagement", f"{sim}:JobOrderResults"]
        )
        response, status = await results.call_method(
            f"{jc}:RequestJobResponseByJobOrderID", "JO-RAW"
        )
        assert status == ReturnStatus.NO_ERROR
        assert response.JobOrderID == "JO-RAW"
        state = await raw.nodes.objects.get_child(
            [f"{sim}:Oven", f"{sim}:PackML", f"{sim}:Status", f"{sim}:StateCurrent"]
        )
        assert await state.read_value() == PACKML_IDLE

        await control.call_method(
            f"{jc}:Cancel", "JO-RAW", ua.Variant([], ua.VariantType.LocalizedText)
        )


async def test_an_unreachable_machine_is_a_retryable_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"opc.tcp://127.0.0.1:{port}/"
    with pytest.raises(MachineUnreachableError) as raised:
        async with JobControlClient(url, "Filler", timeout_s=2):
            pass
    assert raised.value.retryable


async def test_an_unknown_machine_is_not_retryable(plc: Plc) -> None:
    with pytest.raises(JobControlError) as raised:
        async with JobControlClient(plc.url, "NoSuchMachine"):
            pass
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (ReturnStatus.UNKNOWN_JOB_ORDER_ID, UnknownJobOrderError),
        (ReturnStatus.INVALID_JOB_ORDER_STATUS, InvalidJobOrderStatusError),
        (ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER, UnableToAcceptJobOrderError),
        (1 << 32, InvalidRequestError),
        (1 << 40, JobControlError),
    ],
)
def test_raise_for_status_maps_return_status_bits(status: int, error: type[Exception]) -> None:
    raise_for_status(ReturnStatus.NO_ERROR)
    with pytest.raises(error):
        raise_for_status(status)
