"""The machine port: the activities open every controller session through
``adapters.machines.connect``, which picks the adapter by the endpoint's protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from adapters.machines import CONNECTORS, connect
from adapters.modbus.client import ModbusJobClient
from adapters.opcua.client import JobControlClient
from mes.machines import Endpoint, EquipmentAdapter, InvalidRequestError, MachineConnector


def test_opcua_is_the_first_protocol_and_its_client_is_an_equipment_adapter() -> None:
    session = connect(Endpoint("opcua", "opc.tcp://127.0.0.1:1/", "Line1/Mixer"))
    assert isinstance(session, JobControlClient)
    adapter: EquipmentAdapter = session  # the type checker holds the client to the port
    assert adapter is session
    assert set(CONNECTORS) == {"opcua", "modbus"}


def test_modbus_is_the_second_protocol() -> None:
    settings = {
        "job": {"address": 100},
        "coils": {"start": 0, "recipe_valid": 1},
        "inputs": {"state": 0, "processed": 2, "defective": 4},
    }
    session = connect(Endpoint("modbus", "modbus://127.0.0.1:502", "Press", settings=settings))
    assert isinstance(session, ModbusJobClient)
    adapter: EquipmentAdapter = session
    assert adapter is session


def test_an_unknown_protocol_is_refused_for_good() -> None:
    with pytest.raises(InvalidRequestError, match="'profinet' is not supported") as caught:
        connect(Endpoint("profinet", "profinet://127.0.0.1", "Press"))
    assert caught.value.retryable is False


async def test_a_connector_given_for_a_protocol_is_the_one_used() -> None:
    opened: list[tuple[str, str]] = []

    @asynccontextmanager
    async def fake(endpoint: Endpoint) -> AsyncIterator[EquipmentAdapter]:
        opened.append((endpoint.url, endpoint.machine))
        yield JobControlClient(endpoint.url, endpoint.machine)

    connectors: dict[str, MachineConnector] = {"test": fake}
    session: AbstractAsyncContextManager[EquipmentAdapter] = connect(
        Endpoint("test", "test://here", "Oven"), connectors
    )
    async with session as adapter:
        assert isinstance(adapter, JobControlClient)
    assert opened == [("test://here", "Oven")]
