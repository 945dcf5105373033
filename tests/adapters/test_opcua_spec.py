"""OPC 10031-4 method results and MaxDownloadableJobOrders, at the OPC UA level and through
JobControlClient: against our PLC simulator and against an independent minimal server built
from the official nodeset (tests/adapters/independent_jobcontrol.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.ua.status_codes import StatusCodes

from adapters.opcua.client import JobControlClient
from adapters.opcua.model import JOBCONTROL_NS_URI, empty_comment
from adapters.opcua.simulator import SIM_NAMESPACE_URI, PlcSimulator, SimUnit
from mes.machines import (
    InvalidJobOrderStatusError,
    InvalidRequestError,
    JobCapacity,
    JobOrderData,
    JobState,
    MaterialRequirement,
    ReturnStatus,
    UnableToAcceptJobOrderError,
    UnknownJobOrderError,
)
from tests.adapters.independent_jobcontrol import IndependentJobControlServer

# Jobs on these units never finish by themselves within a test: the tests end them.
LONG_S = 60.0


def order(job_order_id: str, qty: float = 4) -> JobOrderData:
    return JobOrderData(
        job_order_id=job_order_id,
        work_master_id="WM-FILL",
        material_requirements=[
            MaterialRequirement("WATER", "Consumed", 1.5, "l", "LOT-W-1"),
            MaterialRequirement("BOTTLE", "Produced", qty, "pcs"),
        ],
    )


@dataclass
class Raw:
    """A plain asyncua client on the simulator, with one unit's job-control nodes."""

    client: Client
    jc: int
    control: Node
    results: Node

    async def call(self, obj: Node, method: str, *args: ua.Variant) -> ua.CallMethodResult:
        """Call without asyncua's Good-only check, returning the whole result."""
        node = await obj.get_child(f"{self.jc}:{method}")
        request = ua.CallMethodRequest(
            ObjectId=obj.nodeid, MethodId=node.nodeid, InputArguments=list(args)
        )
        (result,) = await self.client.uaclient.call([request])
        return result

    async def job_order(self, job_order_id: str) -> Any:
        """An ISA95JobOrderDataType (the generated class, found through the type's id)."""
        cls = ua.uatypes.extension_objects_by_datatype[ua.NodeId(ua.Int32(3008), ua.Int16(self.jc))]
        return cls(JobOrderID=job_order_id)


def comment() -> ua.Variant:
    return ua.Variant([], ua.VariantType.LocalizedText)


def text(value: str) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.String)


def outputs(result: ua.CallMethodResult) -> list[Any]:
    return [v.Value for v in result.OutputArguments or []]


# One unit per test that stores jobs, so the module can share one simulator.
UNITS = ("Raw", "Refused", "Capped", "Typed")


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[PlcSimulator]:
    units = [SimUnit(name, cycle_time_s=LONG_S) for name in UNITS]
    async with PlcSimulator(units, port=0, max_job_orders=2) as simulator:
        yield simulator


@contextlib.asynccontextmanager
async def raw_client(sim: PlcSimulator, unit: str) -> AsyncIterator[Raw]:
    async with Client(sim.url) as client:
        await client.load_data_type_definitions()
        jc = await client.get_namespace_index(JOBCONTROL_NS_URI)
        own = await client.get_namespace_index(SIM_NAMESPACE_URI)
        base = [f"{own}:{unit}", f"{own}:JobManagement"]
        control = await client.nodes.objects.get_child([*base, f"{own}:JobOrderControl"])
        results = await client.nodes.objects.get_child([*base, f"{own}:JobOrderResults"])
        yield Raw(client, jc, control, results)


@pytest.fixture
async def raw(sim: PlcSimulator) -> AsyncIterator[Raw]:
    async with raw_client(sim, "Raw") as connected:
        yield connected


# -- the simulator at the OPC UA level -------------------------------------------------------


async def test_a_missing_argument_answers_bad_arguments_missing(raw: Raw) -> None:
    result = await raw.call(raw.control, "Start", text("JO-X"))
    assert result.StatusCode.value == StatusCodes.BadArgumentsMissing
    assert outputs(result) == []
    result = await raw.call(raw.control, "Store")
    assert result.StatusCode.value == StatusCodes.BadArgumentsMissing
    result = await raw.call(raw.results, "RequestJobResponseByJobOrderID")
    assert result.StatusCode.value == StatusCodes.BadArgumentsMissing


async def test_an_extra_argument_answers_bad_too_many_arguments(raw: Raw) -> None:
    result = await raw.call(raw.control, "Start", text("JO-X"), comment(), text("more"))
    assert result.StatusCode.value == StatusCodes.BadTooManyArguments
    assert outputs(result) == []


async def test_a_wrongly_typed_argument_answers_bad_type_mismatch(raw: Raw) -> None:
    result = await raw.call(raw.control, "Start", ua.Variant(7, ua.VariantType.Int32), comment())
    assert result.StatusCode.value == StatusCodes.BadTypeMismatch
    assert outputs(result) == []
    assert [r.value for r in result.InputArgumentResults] == [
        StatusCodes.BadTypeMismatch,
        StatusCodes.Good,
    ]
    # A JobOrderID where the ISA95JobOrderDataType belongs.
    result = await raw.call(raw.control, "Store", text("JO-X"), comment())
    assert result.StatusCode.value == StatusCodes.BadTypeMismatch
    # A scalar Comment where the method declares an array (ValueRank 1).
    scalar = ua.Variant(ua.LocalizedText("hi"), ua.VariantType.LocalizedText)
    result = await raw.call(raw.control, "Start", text("JO-X"), scalar)
    assert result.StatusCode.value == StatusCodes.BadTypeMismatch
    assert [r.value for r in result.InputArgumentResults] == [
        StatusCodes.Good,
        StatusCodes.BadTypeMismatch,
    ]
    # Nothing was stored by any of it.
    job_order_list = await raw.control.get_child(f"{raw.jc}:JobOrderList")
    assert await job_order_list.read_value() in (None, [])


async def test_a_refused_call_answers_uncertain_with_return_status_bits(sim: PlcSimulator) -> None:
    async with raw_client(sim, "Refused") as raw:
        await _refused_calls(raw)


async def _refused_calls(raw: Raw) -> None:
    result = await raw.call(raw.control, "Start", text("NO-SUCH-JOB"), comment())
    assert result.StatusCode.value == StatusCodes.Uncertain
    assert outputs(result) == [ReturnStatus.UNKNOWN_JOB_ORDER_ID]

    result = await raw.call(raw.control, "Start", text(""), comment())
    assert result.StatusCode.value == StatusCodes.Uncertain
    assert outputs(result) == [ReturnStatus.INVALID_REQUEST]

    job = ua.Variant(await raw.job_order("JO-UNC"), ua.VariantType.ExtensionObject)
    result = await raw.call(raw.control, "Store", job, comment())
    assert result.StatusCode.value == StatusCodes.Good
    assert outputs(result) == [ReturnStatus.NO_ERROR]
    result = await raw.call(raw.control, "Resume", text("JO-UNC"), comment())
    assert result.StatusCode.value == StatusCodes.Uncertain
    assert outputs(result) == [ReturnStatus.INVALID_JOB_ORDER_STATUS]

    result = await raw.call(raw.results, "RequestJobResponseByJobOrderID", text("NO-SUCH-JOB"))
    assert result.StatusCode.value == StatusCodes.Uncertain
    # The JobResponse is a null ExtensionObject; the ReturnStatus says why.
    assert outputs(result)[-1] == ReturnStatus.UNKNOWN_JOB_ORDER_ID
    result = await raw.call(raw.results, "RequestJobResponseByJobOrderID", text("JO-UNC"))
    assert result.StatusCode.value == StatusCodes.Good
    response, status = outputs(result)
    assert (response.JobOrderID, status) == ("JO-UNC", ReturnStatus.NO_ERROR)


async def test_max_downloadable_job_orders_refuses_a_store_until_clear_makes_room(
    sim: PlcSimulator,
) -> None:
    async with raw_client(sim, "Capped") as raw:
        await _capped_stores(raw)


async def _capped_stores(raw: Raw) -> None:
    limit = await raw.control.get_child(f"{raw.jc}:MaxDownloadableJobOrders")
    assert await limit.read_value() == 2
    assert (await limit.read_data_type_as_variant_type()) == ua.VariantType.UInt16

    async def store(job_order_id: str, method: str = "Store") -> ua.CallMethodResult:
        job = ua.Variant(await raw.job_order(job_order_id), ua.VariantType.ExtensionObject)
        return await raw.call(raw.control, method, job, comment())

    assert (await store("JO-A")).StatusCode.value == StatusCodes.Good
    assert (await store("JO-B", "StoreAndStart")).StatusCode.value == StatusCodes.Good
    for method in ("Store", "StoreAndStart"):
        refused = await store("JO-C", method)
        assert refused.StatusCode.value == StatusCodes.Uncertain
        assert outputs(refused) == [ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER]

    # Clear is for ended jobs only: a stored one stays and takes its room.
    result = await raw.call(raw.control, "Clear", text("JO-A"), comment())
    assert result.StatusCode.value == StatusCodes.Uncertain
    assert outputs(result) == [ReturnStatus.INVALID_JOB_ORDER_STATUS]
    assert (await store("JO-C")).StatusCode.value == StatusCodes.Uncertain

    assert (await raw.call(raw.control, "Abort", text("JO-A"), comment())).StatusCode.is_good()
    # Aborted jobs still count until cleared.
    assert (await store("JO-C")).StatusCode.value == StatusCodes.Uncertain
    assert (await raw.call(raw.control, "Clear", text("JO-A"), comment())).StatusCode.is_good()
    assert (await store("JO-C")).StatusCode.value == StatusCodes.Good


def test_max_job_orders_must_fit_a_uint16() -> None:
    with pytest.raises(ValueError, match="max_job_orders"):
        PlcSimulator([SimUnit("U")], max_job_orders=0)
    with pytest.raises(ValueError, match="max_job_orders"):
        PlcSimulator([SimUnit("U", max_job_orders=70_000)])


async def test_a_unit_limit_overrides_the_simulator_default() -> None:
    units = [SimUnit("Small", max_job_orders=1), SimUnit("Default")]
    async with PlcSimulator(units, max_job_orders=3) as simulator:
        for name, limit in (("Small", 1), ("Default", 3)):
            async with JobControlClient(simulator.url, name) as client:
                assert await client.capacity() == JobCapacity(limit, 0)


# -- the client's typed errors against the simulator --------------------------------------


async def test_client_maps_bad_results_to_invalid_request(sim: PlcSimulator) -> None:
    async with JobControlClient(sim.url, "Typed") as client:
        with pytest.raises(InvalidRequestError) as raised:
            await client._call(client._controller(), "Start", ua.Variant(7, ua.VariantType.Int32))
        assert "BadArgumentsMissing" in str(raised.value)
        assert not raised.value.retryable
        assert raised.value.status == ReturnStatus.INVALID_REQUEST

        with pytest.raises(InvalidRequestError) as raised:
            await client._call(
                client._controller(), "Start", ua.Variant(7, ua.VariantType.Int32), empty_comment()
            )
        assert "BadTypeMismatch" in str(raised.value)
        assert "argument 1: BadTypeMismatch" in str(raised.value)
        assert not raised.value.retryable


async def test_client_maps_uncertain_return_status_to_typed_errors(sim: PlcSimulator) -> None:
    async with JobControlClient(sim.url, "Typed") as client:
        assert await client.capacity() == JobCapacity(2, 0)
        with pytest.raises(UnknownJobOrderError):
            await client.start("NO-SUCH-JOB")
        with pytest.raises(InvalidRequestError) as invalid:
            await client.start("")
        assert invalid.value.status == ReturnStatus.INVALID_REQUEST

        await client.store(order("JO-1"))
        await client.store_and_start(order("JO-2"))
        capacity = await client.capacity()
        assert capacity == JobCapacity(2, 2)
        assert capacity.free == 0
        with pytest.raises(UnableToAcceptJobOrderError) as refused:
            await client.store(order("JO-3"))
        assert refused.value.retryable
        assert refused.value.status == ReturnStatus.UNABLE_TO_ACCEPT_JOB_ORDER

        with pytest.raises(InvalidJobOrderStatusError) as bad_state:
            await client.clear("JO-1")
        assert not bad_state.value.retryable
        await client.abort("JO-1")
        await client.clear("JO-1")  # an aborted job clears
        assert (await client.capacity()).free == 1
        await client.store(order("JO-3"))

        await client.stop("JO-2")  # JO-2 runs (the unit is free): Stop ends it
        assert await client.job_state("JO-2") is JobState.ENDED
        await client.clear("JO-2")  # an ended job clears
        assert await client.list_jobs() == [("JO-3", JobState.NOT_ALLOWED_TO_START)]


# -- an independent server built from the nodeset ------------------------------------------


async def test_client_against_an_independent_server_with_one_job_slot() -> None:
    async with (
        IndependentJobControlServer(max_job_orders=1) as server,
        JobControlClient(server.url, server.machine) as client,
    ):
        assert await client.capacity() == JobCapacity(1, 0)
        await client.store_and_start(order("JO-FIRST"))
        assert await client.list_jobs() == [("JO-FIRST", JobState.ALLOWED_TO_START)]
        assert await client.capacity() == JobCapacity(1, 1)

        with pytest.raises(UnableToAcceptJobOrderError):
            await client.store_and_start(order("JO-SECOND"))
        assert ("StoreAndStart", StatusCodes.Uncertain) in server.calls

        with pytest.raises(InvalidJobOrderStatusError):
            await client.clear("JO-FIRST")  # not ended yet
        await server.run("JO-FIRST")
        assert await client.job_state("JO-FIRST") is JobState.RUNNING
        await server.end("JO-FIRST")
        response = await client.job_response("JO-FIRST")
        assert response.state is JobState.ENDED
        produced = [a for a in response.material_actuals if a.use == "Produced"]
        assert [(a.material_definition_id, a.quantity) for a in produced] == [("BOTTLE", 4)]
        assert response.packml_state == 0  # no PackML on this machine

        await client.clear("JO-FIRST")
        assert await client.capacity() == JobCapacity(1, 0)
        await client.store_and_start(order("JO-SECOND"))
        assert await client.list_jobs() == [("JO-SECOND", JobState.ALLOWED_TO_START)]

        with pytest.raises(UnknownJobOrderError):
            await client.job_response("NO-SUCH-JOB")
        with pytest.raises(InvalidRequestError, match="BadTypeMismatch"):
            await client._call(client._controller(), "Start", 7, empty_comment())


async def test_independent_server_runs_jobs_by_itself_and_wait_for_change_follows() -> None:
    async with (
        IndependentJobControlServer(max_job_orders=2, run_s=0.3) as server,
        JobControlClient(server.url, server.machine) as client,
    ):
        await client.store_and_start(order("JO-AUTO", qty=2))
        async with asyncio.timeout(5):
            state = await client.wait_for_change("JO-AUTO", JobState.ALLOWED_TO_START)
            if state is JobState.RUNNING:
                state = await client.wait_for_change("JO-AUTO", JobState.RUNNING)
        assert state is JobState.ENDED
        response = await client.job_response("JO-AUTO")
        assert response.processed_count == 2  # from the produced quantity: no counts sent
        await client.clear("JO-AUTO")
        assert await client.list_jobs() == []


async def test_client_still_reads_error_bits_from_a_good_answer() -> None:
    """Servers that answer Good with the ReturnStatus error bits (before the v2 note)."""
    async with (
        IndependentJobControlServer(max_job_orders=1, legacy_status=True) as server,
        JobControlClient(server.url, server.machine) as client,
    ):
        await client.store(order("JO-OLD"))
        with pytest.raises(UnableToAcceptJobOrderError):
            await client.store(order("JO-NEW"))
        with pytest.raises(InvalidJobOrderStatusError):
            await client.clear("JO-OLD")
        with pytest.raises(UnknownJobOrderError):
            await client.pause("NO-SUCH-JOB")
        assert {code for _, code in server.calls} == {StatusCodes.Good}
