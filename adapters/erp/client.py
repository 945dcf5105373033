"""Deliver one report-back callback (``SyncOperationsPerformance``, B2MML or JSON) to an ERP.

:func:`deliver` makes exactly one attempt; retrying, backoff and ordering belong to the
caller (a Temporal activity and its retry policy). What this module decides is whether a
failure is worth retrying, so the caller neither gives up on an ERP that is only down nor
hammers one that has refused the message for good. Every callback is signed
(``mes.callbacks``: ``X-MES-Timestamp``, ``X-MES-Signature``) and goes only to an address the
callback policy allows, checked after DNS resolution and connected to as checked.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from mes.callbacks import CallbackPolicy, CallbackRefused, signed_headers

# Statuses that mean "not now" rather than "not this": 408 Request Timeout, 425 Too Early,
# 429 Too Many Requests; every 5xx is added in _is_retryable_status.
_RETRYABLE_4XX = frozenset({408, 425, 429})
_EXCERPT_CHARS = 200


class DeliveryError(Exception):
    """A callback was not accepted by the ERP.

    ``retryable`` tells the caller whether the same message may succeed later (the ERP is
    unreachable, slow, overloaded or failing) or never will (the ERP refused it: a 4xx other
    than 408/425/429, a redirect, a malformed URL). ``status`` is the HTTP status when the
    ERP answered at all, ``body_excerpt`` the start of its answer, and ``retry_after_s`` the
    delay the ERP asked for in ``Retry-After`` (seconds, never negative), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        body_excerpt: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.body_excerpt = body_excerpt
        self.retry_after_s = retry_after_s


async def deliver(
    url: str,
    body: bytes,
    content_type: str,
    message_id: str,
    order_number: str,
    *,
    signing_secret: str,
    policy: CallbackPolicy,
    timeout_s: float = 10,
    client: httpx.AsyncClient | None = None,
) -> int:
    """POST one signed callback to the ERP and return its 2xx status.

    The request carries ``Content-Type``, ``X-Message-Id`` (the message's unique id, the
    B2MML ``BODID``, so the ERP can drop a copy it already has: a retry after a lost answer
    sends the same id), ``X-Order-Number`` and the signature headers (HMAC-SHA256 with
    ``signing_secret`` over the timestamp and the body). The URL's host is resolved and every
    address checked against ``policy`` first; the request then goes to the first address
    (the ``Host`` header and, for https, the TLS server name stay the URL's host).
    ``timeout_s`` bounds connecting, each read and each write. Pass ``client`` to reuse its
    connection pool; otherwise a client is opened for this one call.

    Raises :class:`DeliveryError`: ``retryable=True`` for connection errors, DNS failures,
    timeouts, 408, 425, 429 and 5xx; ``retryable=False`` for any other non-2xx answer, a URL
    that cannot be used and an address the policy refuses.
    """
    try:
        target = httpx.URL(url)
        addresses = await policy.resolve(url)
    except CallbackRefused as e:
        raise DeliveryError(f"not sent to {url}: {e}", retryable=False) from e
    except (ValueError, httpx.InvalidURL) as e:
        raise DeliveryError(f"cannot send to {url}: {e}", retryable=False) from e
    except OSError as e:
        # The name does not resolve (now): DNS may well answer later.
        raise DeliveryError(f"ERP at {url} unreachable: {e}", retryable=True) from e
    headers = {
        "Host": target.netloc.decode("ascii"),
        "Content-Type": content_type,
        "X-Message-Id": message_id,
        "X-Order-Number": order_number,
        **signed_headers(signing_secret, body),
    }
    pinned = target.copy_with(host=str(addresses[0]))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        if client is None:
            async with httpx.AsyncClient(timeout=timeout_s) as own:
                response = await own.post(
                    pinned, content=body, headers=headers, extensions=extensions
                )
        else:
            response = await client.post(
                pinned, content=body, headers=headers, timeout=timeout_s, extensions=extensions
            )
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as e:
        # Our side is wrong (a URL without http(s), a header value with a newline): no
        # number of retries fixes that, so say so instead of retrying for hours.
        raise DeliveryError(f"cannot send to {url}: {e}", retryable=False) from e
    except httpx.TransportError as e:
        # Refused, reset, timeouts, a server that hung up mid-answer: the ERP may well
        # be back later, and the message id makes a repeat harmless.
        raise DeliveryError(
            f"ERP at {url} unreachable: {type(e).__name__}: {e}", retryable=True
        ) from e

    status = response.status_code
    if 200 <= status < 300:
        return status
    retryable = _is_retryable_status(status)
    excerpt = _excerpt(response.text)
    raise DeliveryError(
        f"ERP at {url} answered {status} {response.reason_phrase}"
        + (f": {excerpt}" if excerpt else ""),
        retryable=retryable,
        status=status,
        body_excerpt=excerpt,
        retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
    )


class ErpClients:
    """One HTTP client per ERP, kept open for the worker's life: a new client costs a TLS
    context (~26 ms of CPU) and a new connection per delivery.

    An ERP is the scheme, host and port of its callback URL. The address pinning of
    :func:`deliver` holds: every delivery still resolves and checks the host, and posts to
    the address it checked; the client keeps its connections per address, so a connection
    is reused only for the same ERP host (the TLS server name it was verified for) at the
    same checked address. Call ``aclose`` when the worker stops.
    """

    def __init__(self, timeout_s: float = 10) -> None:
        self._timeout_s = timeout_s
        self._clients: dict[tuple[str, str, int | None], httpx.AsyncClient] = {}

    def for_url(self, url: str) -> httpx.AsyncClient | None:
        """The client of the ERP ``url`` goes to; None for a URL that names none (then
        :func:`deliver` says what is wrong with it)."""
        try:
            target = httpx.URL(url)
        except (ValueError, httpx.InvalidURL):
            return None
        key = (target.scheme, target.host, target.port)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = httpx.AsyncClient(timeout=self._timeout_s)
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _is_retryable_status(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_4XX


def _excerpt(text: str) -> str:
    # One line, short: it ends up in a log line and a Temporal failure message.
    flat = " ".join(text.split())
    if len(flat) <= _EXCERPT_CHARS:
        return flat
    return flat[: _EXCERPT_CHARS - 1] + "…"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or None.

    Both forms are accepted: delay-seconds (``"120"``) and an HTTP-date, measured from
    ``now`` (default: the current UTC time). A date in the past gives 0; an unparseable
    value gives None, as if the header were absent.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; an obsolete form without a zone is read as UTC too.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


__all__ = ["DeliveryError", "ErpClients", "deliver", "parse_retry_after"]
