"""A small ERP that receives report-back callbacks (``mes sim erp``, via ``mes.launch``).

:class:`ErpReceiver` is a real HTTP server (a Litestar app run by uvicorn inside the caller's
event loop) with three routes:

- ``POST /callbacks`` records every callback, whatever its content type, and answers 200.
  The ``X-Message-Id`` header (the B2MML ``BODID``) is how the ERP recognises a copy: a
  message id seen before is recorded with ``duplicate=True`` and still answered 200, as a
  real ERP acknowledges a copy it drops, so the sender stops retrying it. A callback without
  a body or without ``X-Message-Id`` is refused with 400: the MES must never send one.
- ``GET /messages`` lists what was received as JSON (the body as text);
  ``GET /messages?order=<order number>`` only that order's.

Given the ERP client's ``signing_secret``, it checks each callback's signature as a real ERP
should (``mes.callbacks.verify_signature``: ``X-MES-Signature`` over ``X-MES-Timestamp`` and
the body, the timestamp within 5 minutes): a callback whose signature does not hold is
recorded with ``signature_valid=False`` (and never counts for duplicate detection) and
answered 401. Without a secret nothing is checked (``signature_valid`` is None).

With ``store`` every callback is appended to a JSON-lines file before it is acknowledged, and
a receiver started on the same file picks up its history, sequence numbers and duplicate
detection. An ERP outage is simulated by stopping the receiver and starting it again on the
same port, never by a switch inside it: the sender then sees exactly what a real outage
shows it, a refused connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Self

import uvicorn
from litestar import Litestar, Request, Response, get, post
from litestar.params import QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_400_BAD_REQUEST, HTTP_401_UNAUTHORIZED

from mes.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

logger = logging.getLogger(__name__)

CALLBACK_PATH = "/callbacks"
MESSAGES_PATH = "/messages"
# B2MML performance documents of a long order run to a few hundred kB; 8 MiB leaves room
# and still refuses (413) a runaway sender before it fills the disk.
MAX_BODY_BYTES = 8 * 1024 * 1024
_SHOWN_BODY_CHARS = 100


@dataclass(frozen=True)
class ReceivedMessage:
    """One callback as the ERP received it.

    ``seq`` numbers callbacks from 1 in arrival order, across restarts on the same store;
    ``duplicate`` is True when an earlier callback had the same ``message_id`` (the ERP
    drops it). ``order_number`` is None when the sender gave no ``X-Order-Number``.
    ``signature_valid`` says whether its signature held (None: the receiver had no secret
    to check it with).
    """

    seq: int
    received_at: datetime
    message_id: str
    order_number: str | None
    content_type: str
    body: bytes
    duplicate: bool
    signature_valid: bool | None = None

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced), as shown to people."""
        return self.body.decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        """The message as ``GET /messages`` shows it: the body as text."""
        return {
            "seq": self.seq,
            "received_at": self.received_at.isoformat(),
            "message_id": self.message_id,
            "order_number": self.order_number,
            "content_type": self.content_type,
            "duplicate": self.duplicate,
            "signature_valid": self.signature_valid,
            "body": self.text,
        }

    def _to_record(self) -> dict[str, Any]:
        # Unlike to_json the stored line must give back the exact bytes, so a body that is
        # not UTF-8 is kept as base64 rather than replaced.
        record = self.to_json()
        try:
            record["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            del record["body"]
            record["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return record

    @classmethod
    def _from_record(cls, record: dict[str, Any]) -> ReceivedMessage:
        if "body_base64" in record:
            body = base64.b64decode(record["body_base64"], validate=True)
        else:
            body = str(record["body"]).encode("utf-8")
        order = record.get("order_number")
        return cls(
            seq=int(record["seq"]),
            received_at=datetime.fromisoformat(record["received_at"]),
            message_id=str(record["message_id"]),
            order_number=None if order is None else str(order),
            content_type=str(record.get("content_type", "")),
            body=body,
            duplicate=bool(record.get("duplicate", False)),
            signature_valid=record.get("signature_valid"),
        )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host.

    uvicorn's own ``capture_signals`` replaces the process's SIGINT/SIGTERM handlers while it
    serves, which would take Ctrl+C away from pytest and from ``mes sim erp``'s caller; here
    the host stops the server through :meth:`ErpReceiver.stop` or by cancelling.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ErpReceiver:
    """An HTTP server that plays the ERP receiving report-back callbacks.

    Use ``async with ErpReceiver(store=path) as erp:`` and give the MES ``erp.url`` as the
    callback URL; ``erp.messages`` then holds every callback received. ``port`` 0 picks a
    free port when first started; later starts of the same receiver reuse it, so the sender's
    URL stays valid across a simulated outage. One receiver at a time per ``store``.
    ``on_message`` is called with each callback once it is recorded. With ``signing_secret``
    (settable later, once the MES has issued it) every callback's signature is checked.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store: Path | None = None,
        on_message: Callable[[ReceivedMessage], None] | None = None,
        signing_secret: str | None = None,
    ) -> None:
        self.signing_secret = signing_secret
        self._host = host
        self._port = port
        self._store = store
        self._on_message = on_message
        self._messages: list[ReceivedMessage] = []
        self._seen_ids: set[str] = set()
        self._loaded = False
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The TCP port (the real one once started, even when 0 was asked for)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``, known once the receiver has been started."""
        if self._port == 0:
            raise RuntimeError("the ERP receiver has not been started yet")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def url(self) -> str:
        """The callback URL to configure in the MES, e.g. ``http://127.0.0.1:8001/callbacks``."""
        return self.base_url + CALLBACK_PATH

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every callback received, duplicates included, in arrival order (a copy)."""
        return list(self._messages)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    async def start(self) -> None:
        """Load the store's history (first start only), bind the port and serve."""
        if self._server is not None:
            return
        if not self._loaded:
            if self._store is not None:
                self._store.parent.mkdir(parents=True, exist_ok=True)
            self._load_store()
            self._loaded = True
        # Binding here rather than inside uvicorn makes a busy port fail this call with a
        # plain OSError, and tells us the real port before the first request can arrive.
        sock = _bind(self._host, self._port)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            _build_app(self),
            lifespan="off",
            # None keeps uvicorn from re-configuring the host process's logging.
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"erp-receiver:{self._port}")
        try:
            while not server.started:
                if task.done():
                    # serve() ended before listening: surface its error rather than hang.
                    await task
                    raise RuntimeError("the ERP receiver stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            # Failed or cancelled while starting: leave no server task or socket behind.
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            sock.close()
            raise
        self._server, self._task = server, task

    async def stop(self) -> None:
        """Stop listening and close connections; the recorded messages are kept."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is None or task is None:
            return
        # uvicorn notices within 0.1 s, stops accepting, closes idle keep-alive connections
        # and lets requests in flight finish (at most timeout_graceful_shutdown).
        server.should_exit = True
        await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _record(
        self,
        body: bytes,
        message_id: str,
        order_number: str | None,
        content_type: str,
        signature_valid: bool | None = None,
    ) -> ReceivedMessage:
        """Record one callback and return it.

        The store line is written before the message counts as received, so a 200 always
        means the message survives a restart.
        """
        message = ReceivedMessage(
            seq=self._messages[-1].seq + 1 if self._messages else 1,
            received_at=datetime.now(UTC),
            message_id=message_id,
            order_number=order_number,
            content_type=content_type,
            body=body,
            duplicate=message_id in self._seen_ids,
            signature_valid=signature_valid,
        )
        if self._store is not None:
            line = json.dumps(message._to_record(), ensure_ascii=False) + "\n"
            # Opened per message: a line is on disk (as far as the OS is concerned) before
            # the 200 goes out, and nothing stays open if the receiver is killed.
            with self._store.open("a", encoding="utf-8") as f:
                f.write(line)
        self._messages.append(message)
        if signature_valid is not False:
            self._seen_ids.add(message_id)
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                # A broken display must not turn an accepted message into a 500 and a retry.
                logger.exception("on_message failed for callback %d", message.seq)
        return message

    def _load_store(self) -> None:
        if self._store is None or not self._store.exists():
            return
        raw = self._store.read_text(encoding="utf-8")
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                message = ReceivedMessage._from_record(json.loads(line))
            except (ValueError, KeyError, TypeError, binascii.Error) as e:
                # A line cut short by a crash must not cost the rest of the history.
                logger.warning("skipping unreadable line %d of %s: %s", n, self._store, e)
                continue
            self._messages.append(message)
            if message.signature_valid is not False:
                self._seen_ids.add(message.message_id)
        self._messages.sort(key=lambda m: m.seq)
        if raw and not raw.endswith("\n"):
            # Without this the next line would be glued onto the cut-short one.
            with self._store.open("a", encoding="utf-8") as f:
                f.write("\n")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Lets a restarted receiver take its port back at once, though connections of the
        # previous run may still be in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _build_app(receiver: ErpReceiver) -> Litestar:
    @post(CALLBACK_PATH, status_code=HTTP_200_OK)
    async def receive_callback(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        body = await request.body()
        message_id = request.headers.get("x-message-id", "").strip()
        if not body:
            return _refuse("the callback has no body")
        if not message_id:
            return _refuse("the X-Message-Id header is missing: the ERP cannot drop duplicates")
        problem = None
        if receiver.signing_secret is not None:
            problem = verify_signature(
                receiver.signing_secret,
                request.headers.get(TIMESTAMP_HEADER),
                request.headers.get(SIGNATURE_HEADER),
                body,
            )
        message = receiver._record(
            body,
            message_id=message_id,
            order_number=request.headers.get("x-order-number", "").strip() or None,
            content_type=request.headers.get("content-type", ""),
            signature_valid=None if receiver.signing_secret is None else problem is None,
        )
        if problem is not None:
            return Response({"detail": problem}, status_code=HTTP_401_UNAUTHORIZED)
        return Response(
            {"seq": message.seq, "message_id": message.message_id, "duplicate": message.duplicate}
        )

    @get(MESSAGES_PATH)
    async def list_messages(
        order: Annotated[str | None, QueryParameter(description="Only this order's")] = None,
    ) -> list[dict[str, Any]]:
        return [m.to_json() for m in receiver.messages if order is None or m.order_number == order]

    return Litestar(
        [receive_callback, list_messages],
        request_max_body_size=MAX_BODY_BYTES,
        # A test fixture, not a service: no schema pages, and the host's logging untouched.
        openapi_config=None,
        logging_config=None,
    )


def _refuse(reason: str) -> Response[dict[str, Any]]:
    return Response({"detail": reason}, status_code=HTTP_400_BAD_REQUEST)


def format_message(message: ReceivedMessage) -> str:
    """One line for a terminal: seq, time, order, message id, content type, body start."""
    shown = " ".join(message.text.split())
    if len(shown) > _SHOWN_BODY_CHARS:
        shown = shown[: _SHOWN_BODY_CHARS - 1] + "…"
    flag = " DUPLICATE (dropped)" if message.duplicate else ""
    if message.signature_valid is not None:
        flag += " signed" if message.signature_valid else " BAD SIGNATURE (refused)"
    at = message.received_at.astimezone().isoformat(sep=" ", timespec="milliseconds")
    return (
        f"#{message.seq} {at} order={message.order_number or '-'} id={message.message_id}"
        f" [{message.content_type or '-'}]{flag} {shown}"
    )


__all__ = [
    "CALLBACK_PATH",
    "MAX_BODY_BYTES",
    "MESSAGES_PATH",
    "ErpReceiver",
    "ReceivedMessage",
    "format_message",
]
