"""ERP callbacks: where the MES will send them (the URL policy) and how an ERP knows they are
the MES's (the signature).

**URL policy.** A callback URL is a request the MES makes on an admin's say-so, from inside
the plant network; pointed at the wrong address it reads cloud credentials or pokes at a
database port. So, always refused: link-local addresses (169.254.0.0/16, fe80::/10, which
hold the cloud metadata services), the metadata addresses and names themselves
(169.254.169.254, fd00:ec2::254, metadata.google.internal), unspecified (0.0.0.0, ::) and
multicast addresses. Refused unless ``MES_CALLBACK_ALLOW`` (a comma-separated list of CIDRs)
covers them: loopback and every other non-public address (RFC 1918, fc00::/7, CGNAT, …).
``https`` is required except to loopback. The URL is checked when an admin sets it (the
host as written) and again at each delivery after DNS resolution; the delivery then
connects to the address that was checked, so a name that changes its answer in between
(DNS rebinding) reaches nothing new.

**Signature.** Each ERP client has a secret (``new_secret``). Every callback carries
``X-MES-Timestamp`` (Unix seconds) and ``X-MES-Signature: sha256=<hex>``, the HMAC-SHA256
with that secret over ``"{timestamp}." + body``; ``verify_signature`` is how the ERP checks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TIMESTAMP_HEADER = "X-MES-Timestamp"
SIGNATURE_HEADER = "X-MES-Signature"
#: How far a callback's timestamp may be from the receiver's clock (replay window).
SIGNATURE_TOLERANCE_S = 300
#: What the embedded stack (``mes dev``, ``mes demo``, the tests) allows: its own receiver.
LOOPBACK = ("127.0.0.0/8", "::1/128")

_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "instance-data"})
_ALLOW_HINT = "(MES_CALLBACK_ALLOW can allow it)"


class CallbackRefused(ValueError):
    """A callback URL the policy refuses; the message says why."""


class CallbackPolicy:
    """Which addresses callbacks may go to besides public ones: ``allow`` lists CIDRs.

    Link-local, metadata, unspecified and multicast addresses stay refused whatever it lists.
    """

    __slots__ = ("allow",)

    def __init__(self, allow: tuple[IPNetwork, ...] = ()) -> None:
        self.allow = allow

    def __repr__(self) -> str:
        return f"CallbackPolicy(allow={[str(n) for n in self.allow]})"

    @classmethod
    def allowing(cls, cidrs: Iterable[str]) -> CallbackPolicy:
        """A policy from CIDR strings (``"10.0.0.0/8"``, ``"::1/128"``); bad ones raise."""
        try:
            return cls(tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs))
        except ValueError as e:
            raise ValueError(f"MES_CALLBACK_ALLOW: {e}") from None

    def refusal(self, address: IPAddress) -> str | None:
        """Why a callback may not go to ``address``, or None when it may."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address in _METADATA_ADDRESSES:
            return f"{address} is a cloud metadata address"
        if address.is_unspecified:
            return f"{address} is the unspecified address"
        if address.is_link_local:
            return f"{address} is a link-local address"
        if address.is_multicast:
            return f"{address} is a multicast address"
        if any(address in net for net in self.allow if net.version == address.version):
            return None
        if address.is_loopback:
            return f"{address} is a loopback address {_ALLOW_HINT}"
        if not address.is_global:
            return f"{address} is a private address {_ALLOW_HINT}"
        return None

    def check_url(self, url: str) -> None:
        """Refuse a URL by its scheme and its host as written (before any DNS lookup).

        Raises ``CallbackRefused`` saying why.
        """
        scheme, host = _scheme_and_host(url)
        if host in _METADATA_NAMES:
            raise CallbackRefused(f"{host} is a cloud metadata service")
        address = _literal(host)
        if address is not None:
            reason = self.refusal(address)
            if reason:
                raise CallbackRefused(reason)
        if scheme != "https" and not (
            host == "localhost" or (address is not None and address.is_loopback)
        ):
            raise CallbackRefused("https is required (plain http only to loopback)")

    async def resolve(self, url: str) -> list[IPAddress]:
        """The addresses ``url``'s host resolves to, each one checked; raise
        ``CallbackRefused`` when any is refused (or plain http goes beyond loopback), and
        ``OSError`` when the name does not resolve."""
        self.check_url(url)
        scheme, host = _scheme_and_host(url)
        address = _literal(host)
        if address is not None:
            found = [address]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
            found = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        for a in found:
            reason = self.refusal(a)
            if reason:
                raise CallbackRefused(f"{host} resolves to {a}: {reason}")
            if scheme != "https" and not a.is_loopback:
                raise CallbackRefused(f"{host} resolves to {a}: https is required beyond loopback")
        return found


#: The default: public addresses only, over https.
PUBLIC_ONLY = CallbackPolicy()


def _scheme_and_host(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".").lower()
    if scheme not in ("http", "https") or not host:
        raise CallbackRefused("not an http(s) URL with a host")
    return scheme, host


def _literal(host: str) -> IPAddress | None:
    if host == "localhost" or host.endswith(".localhost"):
        return ipaddress.ip_address("127.0.0.1")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# --- signatures -------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret: 32 random bytes, hex."""
    return secrets.token_hex(32)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-MES-Signature`` value: ``sha256=`` and the HMAC of ``"{timestamp}." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two headers that sign ``body`` now."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify_signature(
    secret: str,
    timestamp: str | None,
    signature_header: str | None,
    body: bytes,
    now: float | None = None,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> str | None:
    """Why a callback's signature does not hold (None when it does): as an ERP checks it."""
    if not timestamp or not signature_header:
        return "the callback is not signed"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return f"{TIMESTAMP_HEADER} is not a Unix time"
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > tolerance_s:
        return f"{TIMESTAMP_HEADER} is {age:.0f} s off (more than {tolerance_s:.0f} s)"
    expected = signature(secret, timestamp, body).encode()
    if not hmac.compare_digest(expected, signature_header.encode("utf-8", "replace")):
        return "the signature does not match the body"
    return None


__all__ = [
    "LOOPBACK",
    "PUBLIC_ONLY",
    "SIGNATURE_HEADER",
    "SIGNATURE_TOLERANCE_S",
    "TIMESTAMP_HEADER",
    "CallbackPolicy",
    "CallbackRefused",
    "new_secret",
    "signature",
    "signed_headers",
    "verify_signature",
]
