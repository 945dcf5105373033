"""One OPC UA session per PLC endpoint, shared by every activity of a worker.

Opening a session costs a connect, a secure channel, CreateSession/ActivateSession and a
browse for the machine's nodes (~8.5 ms of CPU, far more on a secured endpoint); a read on
an open session costs ~0.3 ms. And a PLC allows a handful of sessions, not one per job.
So the worker keeps one session per endpoint (URL and security settings: two endpoints
that differ only in their certificates or user are two sessions) and every activity for a
machine behind it uses that session; waiting jobs share one subscription per machine
(``JobControlClient.attach``).

A session is never reused once it is broken: one the client library reports disconnected
is replaced before use, and an activity that finds the machine unreachable (a timeout, a
closed link, a session the server forgot after a reboot) takes it out of the pool, so the
next activity connects afresh. A session taken out is closed when its last user is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState

from adapters.opcua.client import JobControlClient
from mes.machines import (
    Endpoint,
    EquipmentAdapter,
    MachineSecurityError,
    MachineUnreachableError,
)

logger = logging.getLogger(__name__)

#: What makes two endpoints the same session: URL, security policy, settings (as JSON).
PoolKey = tuple[str, str, str]


def pool_key(endpoint: Endpoint) -> PoolKey:
    """The session an endpoint's machine is reached through."""
    settings = json.dumps(endpoint.settings, sort_keys=True, default=str)
    return (endpoint.url, endpoint.security, settings)


class _Session:
    """One open session and the machines found on it (each found once)."""

    def __init__(self, client: Client, endpoint: Endpoint, timeout_s: float) -> None:
        self.client = client
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._machines: dict[str, asyncio.Task[JobControlClient]] = {}
        self.users = 0
        self.dropped = False

    @property
    def usable(self) -> bool:
        return not self.dropped and self.client.uaclient.state is UaClientState.CONNECTED

    async def machine(self, name: str) -> JobControlClient:
        """The job control of machine ``name`` on this session, browsed on first use."""
        task = self._machines.get(name)
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = asyncio.ensure_future(self._attach(name))
            self._machines[name] = task
        return await asyncio.shield(task)

    async def _attach(self, name: str) -> JobControlClient:
        e = self._endpoint
        plc = JobControlClient(
            e.url, name, self._timeout_s, security=e.security, settings=e.settings
        )
        await plc.attach(self.client)
        return plc

    async def close(self) -> None:
        for task in self._machines.values():
            task.cancel()
        # A dead link must not hold up shutdown or hide the error that dropped it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s):
                await self.client.disconnect()


class SessionPool:
    """The worker's OPC UA sessions, one per endpoint; ``session`` is a machine connector.

    Call ``close`` when the worker stops. Concurrent first uses of an endpoint wait for one
    connect; a connect that fails fails them all (the next use tries again).
    """

    def __init__(self, timeout_s: float = 10) -> None:
        self.timeout_s = timeout_s
        self._open: dict[PoolKey, _Session] = {}
        self._connecting: dict[PoolKey, asyncio.Future[_Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.connects = 0  # sessions opened so far (a reconnect counts)

    @property
    def sessions(self) -> int:
        """How many sessions are open now, those still finishing after a drop included."""
        return len(self._open) + len(self._closing)

    def session(self, endpoint: Endpoint) -> AbstractAsyncContextManager[EquipmentAdapter]:
        """The machine of ``endpoint`` on the endpoint's shared session."""
        return self._use(endpoint)

    @contextlib.asynccontextmanager
    async def _use(self, endpoint: Endpoint) -> AsyncIterator[EquipmentAdapter]:
        key = pool_key(endpoint)
        session = await self._acquire(key, endpoint)
        try:
            yield await session.machine(endpoint.machine)
        except BaseException as exc:
            if _breaks_session(exc) or not session.usable:
                self._drop(key, session, exc)
            raise
        finally:
            session.users -= 1
            if session.dropped and session.users == 0:
                self._close_later(session)

    async def _acquire(self, key: PoolKey, endpoint: Endpoint) -> _Session:
        while True:
            session = self._open.get(key)
            if session is not None:
                if session.usable:
                    session.users += 1
                    return session
                self._drop(key, session, None)
            connecting = self._connecting.get(key)
            if connecting is None:
                connecting = asyncio.ensure_future(self._connect(key, endpoint))
                self._connecting[key] = connecting
                # Retrieved here so a connect nobody waits for any more logs nothing.
                connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.shield(connecting)

    async def _connect(self, key: PoolKey, endpoint: Endpoint) -> _Session:
        try:
            opener = JobControlClient(
                endpoint.url,
                endpoint.machine,
                self.timeout_s,
                security=endpoint.security,
                settings=endpoint.settings,
            )
            client = await opener.open_session(watchdog_s=self.timeout_s)
            session = _Session(client, endpoint, self.timeout_s)
            self._open[key] = session
            self.connects += 1
            return session
        finally:
            del self._connecting[key]

    def _drop(self, key: PoolKey, session: _Session, exc: BaseException | None) -> None:
        """Take ``session`` out of the pool; it closes once its last user is done."""
        if session.dropped:
            return
        session.dropped = True
        if self._open.get(key) is session:
            del self._open[key]
        logger.info("%s: dropping the OPC UA session (%r); the next use reconnects", key[0], exc)
        if session.users == 0:
            self._close_later(session)

    def _close_later(self, session: _Session) -> None:
        task = asyncio.ensure_future(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every session (the worker is stopping)."""
        for connecting in list(self._connecting.values()):
            connecting.cancel()
        sessions, self._open = list(self._open.values()), {}
        for session in sessions:
            session.dropped = True
        await asyncio.gather(
            *(s.close() for s in sessions), *list(self._closing), return_exceptions=True
        )


def _breaks_session(exc: BaseException) -> bool:
    """Whether an error says the session itself is no good (rather than the request)."""
    # A refused job order, the activity's own errors or its cancellation leave it as it is;
    # anything else is caught by the state check (``_Session.usable``).
    return isinstance(exc, MachineUnreachableError | MachineSecurityError)
