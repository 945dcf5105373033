"""Which adapter speaks to a work unit's controller: chosen by its endpoint's protocol.

The activities open every machine session through ``connect``; each protocol's client
implements ``mes.machines.EquipmentAdapter``. A new protocol is one entry in ``CONNECTORS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

from adapters.opcua.client import JobControlClient
from mes.machines import EquipmentAdapter, InvalidRequestError, MachineConnector


def _opcua(url: str, machine: str) -> AbstractAsyncContextManager[EquipmentAdapter]:
    return JobControlClient(url, machine)


#: Endpoint protocol (``equipment.protocol``) → how to open a session with it.
CONNECTORS: Mapping[str, MachineConnector] = {"opcua": _opcua}


def connect(
    protocol: str,
    url: str,
    machine: str,
    connectors: Mapping[str, MachineConnector] = CONNECTORS,
) -> AbstractAsyncContextManager[EquipmentAdapter]:
    """A session with ``machine`` at ``url``; InvalidRequestError for an unknown protocol."""
    try:
        opener = connectors[protocol]
    except KeyError:
        raise InvalidRequestError(
            f"protocol {protocol!r} is not supported (known: {', '.join(sorted(connectors))})"
        ) from None
    return opener(url, machine)
