"""Following a machine's PackML state and counters by OPC UA subscription (OPC 30050 tags).

:func:`follow_packml` connects to one machine, subscribes to ``PackML/Status/StateCurrent``,
``PackML/Admin/StopReason`` (optional), ``PackML/Admin/ProdProcessedCount`` and
``PackML/Admin/ProdDefectiveCount`` below ``Objects/<machine>`` (matched by browse name, in
any namespace), and hands what the server reports to ``emit`` (in order): first a :class:`Connected`
with the server's start time (a later start time means the controller restarted), then one
:class:`PackmlSample` per data change, starting with the current values. It returns only by
raising :class:`~mes.machines.MachineUnreachableError` once the connection is lost; the
caller decides when to connect again (``mes.collector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError

from adapters.opcua.security import secure_client
from mes.machines import MachineUnreachableError

logger = logging.getLogger(__name__)

#: Tag name -> browse path below the machine's ``PackML`` object. StopReason is optional.
PACKML_TAGS: dict[str, tuple[str, str]] = {
    "stop_reason": ("Admin", "StopReason"),
    "state": ("Status", "StateCurrent"),
    "processed": ("Admin", "ProdProcessedCount"),
    "defective": ("Admin", "ProdDefectiveCount"),
}
_OPTIONAL = {"stop_reason"}
#: Changes the server keeps per tag between two publishes.
QUEUE_SIZE = 100


@dataclass(frozen=True)
class Connected:
    """A new session with the machine; ``server_started`` is the server's StartTime."""

    server_started: datetime | None


@dataclass(frozen=True)
class PackmlSample:
    """One value of one tag (a key of :data:`PACKML_TAGS`) and when the server took it."""

    tag: str
    value: int
    at: datetime


PackmlEvent = Connected | PackmlSample


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _Watch:
    """Subscription handler: hands data changes to the queue and notices a broken link."""

    def __init__(self, emit: Callable[[PackmlEvent], None], tags: dict[ua.NodeId, str]) -> None:
        self.emit = emit
        self.tags = tags
        self.lost = asyncio.Event()

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        value = data.monitored_item.Value
        if value is None or (value.StatusCode is not None and not value.StatusCode.is_good()):
            return
        if not isinstance(val, int):
            logger.warning("%s: %r is not an integer; ignored", node.nodeid, val)
            return
        tag = self.tags[node.nodeid]
        at = _aware(value.SourceTimestamp or value.ServerTimestamp)
        self.emit(PackmlSample(tag, val, at))

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        # BadShutdown, BadTimeout: the subscription is gone with the session.
        self.lost.set()


async def _child(node: Node, name: str) -> Node | None:
    for desc in await node.get_children_descriptions():
        if desc.BrowseName.Name == name:
            return Node(node.session, desc.NodeId)
    return None


async def _tag_nodes(client: Client, url: str, machine: str) -> dict[str, Node]:
    node: Node | None = client.nodes.objects
    for name in [*machine.split("/"), "PackML"]:
        assert node is not None
        node = await _child(node, name)
        if node is None:
            raise MachineUnreachableError(f"{url}: no {name!r} on the way to {machine}/PackML")
    assert node is not None
    found: dict[str, Node] = {}
    for tag, (folder, name) in PACKML_TAGS.items():
        parent = await _child(node, folder)
        child = await _child(parent, name) if parent is not None else None
        if child is not None:
            found[tag] = child
        elif tag not in _OPTIONAL:
            raise MachineUnreachableError(f"{url}: no PackML/{folder}/{name} on {machine}")
    return found


async def follow_packml(
    url: str,
    machine: str,
    emit: Callable[[PackmlEvent], None],
    *,
    security: str = "None",
    settings: Mapping[str, Any] | None = None,
    publish_ms: int = 200,
    timeout_s: float = 10,
) -> None:
    """Subscribe to ``machine``'s PackML tags at ``url`` and feed ``emit`` until the link
    breaks (MachineUnreachableError) or the caller cancels."""
    client = Client(url, timeout=timeout_s, watchdog_intervall=1.0)
    lost = asyncio.Event()

    async def on_lost(exc: Exception) -> None:
        lost.set()

    client.connection_lost_callback = on_lost
    await secure_client(client, security, settings or {})
    try:
        async with asyncio.timeout(timeout_s):
            await client.connect()
    except (OSError, TimeoutError, UaError) as exc:
        client.disconnect_socket()
        raise MachineUnreachableError(f"{url}: cannot connect ({exc!r})") from exc
    try:
        async with asyncio.timeout(timeout_s):
            start = client.get_node(ua.NodeId(ua.Int32(ObjectIds.Server_ServerStatus_StartTime)))
            started = await start.read_value()
            nodes = await _tag_nodes(client, url, machine)
            emit(Connected(_aware(started) if started else None))
            watch = _Watch(emit, {n.nodeid: tag for tag, n in nodes.items()})
            subscription = await client.create_subscription(publish_ms, watch)
            # A queue per item: every state a publishing interval saw counts, not the last.
            await subscription.subscribe_data_change(list(nodes.values()), queuesize=QUEUE_SIZE)
        lost_wait = asyncio.create_task(lost.wait())
        watch_wait = asyncio.create_task(watch.lost.wait())
        try:
            await asyncio.wait([lost_wait, watch_wait], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost_wait.cancel()
            watch_wait.cancel()
    except (OSError, TimeoutError, UaError) as exc:
        raise MachineUnreachableError(f"{url}: {machine}: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.disconnect()
        client.disconnect_socket()
    raise MachineUnreachableError(f"{url}: connection to {machine} lost")


__all__ = ["PACKML_TAGS", "Connected", "PackmlEvent", "PackmlSample", "follow_packml"]
