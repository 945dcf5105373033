"""Which adapter speaks to a work unit's controller: chosen by its endpoint's protocol.

The activities open every machine session through ``connect``; each protocol's client
implements ``mes.machines.EquipmentAdapter``. A new protocol is one entry in ``CONNECTORS``.
A worker uses ``pooled``: its OPC UA sessions come from one ``SessionPool``, one per
endpoint, instead of one per activity.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

from adapters.modbus.client import ModbusJobClient
from adapters.opcua.client import JobControlClient
from adapters.opcua.pool import SessionPool
from mes.machines import Endpoint, EquipmentAdapter, InvalidRequestError, MachineConnector


def _opcua(endpoint: Endpoint) -> AbstractAsyncContextManager[EquipmentAdapter]:
    return JobControlClient(
        endpoint.url, endpoint.machine, security=endpoint.security, settings=endpoint.settings
    )


def _modbus(endpoint: Endpoint) -> AbstractAsyncContextManager[EquipmentAdapter]:
    return ModbusJobClient(endpoint.url, endpoint.machine, endpoint.settings)


#: Endpoint protocol (``equipment.protocol``) → how to open a session with it.
CONNECTORS: Mapping[str, MachineConnector] = {"opcua": _opcua, "modbus": _modbus}


def pooled(
    pool: SessionPool, connectors: Mapping[str, MachineConnector] = CONNECTORS
) -> Mapping[str, MachineConnector]:
    """``connectors`` with OPC UA sessions taken from ``pool`` (shared, kept open)."""
    return {**connectors, "opcua": pool.session}


def connect(
    endpoint: Endpoint, connectors: Mapping[str, MachineConnector] = CONNECTORS
) -> AbstractAsyncContextManager[EquipmentAdapter]:
    """A session with the endpoint's machine; InvalidRequestError for an unknown protocol."""
    try:
        opener = connectors[endpoint.protocol]
    except KeyError:
        raise InvalidRequestError(
            f"protocol {endpoint.protocol!r} is not supported "
            f"(known: {', '.join(sorted(connectors))})"
        ) from None
    return opener(endpoint)
