"""API tokens: one role each, shown once, stored as a SHA-256 hash, revocable, and with an
optional expiry (an expired token is refused as a revoked one is).

Tokens are 256-bit random strings, so a plain SHA-256 (no salt, no slow hash) is enough to
make a stolen table useless; it also lets a request find its token by one indexed lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mes import audit
from mes.errors import Conflict, NotFound, invalid
from mes.models import ApiToken, Role, utcnow

PREFIX = "mes_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"{self.name} ({self.role})"

    @property
    def order_scope(self) -> str | None:
        """The ERP client whose orders alone this caller sees and changes: an ERP token sees
        the orders it sent (``OperationsRequest.source`` is its name); every other role sees
        all (None)."""
        return self.name if self.role == Role.ERP else None


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= utcnow()


_LIFETIME = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
_LIFETIME_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_lifetime(text: str) -> timedelta:
    """``30d`` → 30 days: a whole number and one of s, m (minutes), h, d, w."""
    found = _LIFETIME.match(text.strip())
    if found is None:
        raise invalid(
            "expires_in", f"{text!r} is not a lifetime such as 90m, 12h, 30d or 4w (s, m, h, d, w)"
        )
    return timedelta(**{_LIFETIME_UNITS[found[2]]: int(found[1])})


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session,
    name: str,
    role: str,
    actor: str = audit.SYSTEM,
    expires_at: datetime | None = None,
) -> str:
    """Create a token for ``name`` with ``role``, valid until ``expires_at`` (a time to come;
    None: until revoked); returns the token (never stored in clear)."""
    try:
        parsed = Role(role)
    except ValueError:
        raise invalid("role", f"unknown role {role!r}; one of {', '.join(Role)}") from None
    if not name or len(name) > 100:
        raise invalid("name", "a name of 1 to 100 characters is required")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise invalid("expires_at", "give a time zone (Z or an offset such as +01:00)")
        if expires_at <= utcnow():
            raise invalid("expires_at", f"{expires_at.isoformat()} is not in the future")
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=parsed, token_hash=_digest(token), expires_at=expires_at))
    audit.record(
        session,
        actor=actor,
        action="token.created",
        object_type="api_token",
        object_id=name,
        after={
            "role": str(parsed),
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a token named {name!r} exists") from None
    return token


def _info(t: ApiToken) -> TokenInfo:
    return TokenInfo(t.name, t.role, t.created_at, t.revoked_at, t.expires_at)


def list_tokens(session: Session) -> list[TokenInfo]:
    """All tokens, revoked and expired ones included (without their secrets, which are not
    stored)."""
    return [_info(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.name))]


def revoke_token(session: Session, name: str, actor: str = audit.SYSTEM) -> TokenInfo:
    """Revoke the token called ``name``; revoking twice is harmless."""
    tok = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if tok is None:
        raise NotFound("token", name)
    if tok.revoked_at is None:
        tok.revoked_at = utcnow()
        audit.record(
            session,
            actor=actor,
            action="token.revoked",
            object_type="api_token",
            object_id=name,
            before={"revoked": False},
            after={"revoked": True},
        )
        session.commit()
    forget_recent(name)
    return _info(tok)


def authenticate(session: Session, token: str) -> Principal | None:
    """The caller a token belongs to, or None for an unknown, revoked or expired token.

    A token found valid is remembered for ``RECENT_SECONDS`` (``recently_authenticated``)."""
    if not token.startswith(PREFIX):
        return None
    digest = _digest(token)
    generation = _generation
    tok = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if tok is None or tok.revoked_at is not None or _info(tok).expired:
        return None
    principal = Principal(tok.name, Role(tok.role))
    if generation == _generation:  # no revocation since the read began
        _remember(digest, principal, tok.expires_at)
    return principal


# --- tokens found valid a moment ago ---------------------------------------------------------

#: How long a token found valid is taken as valid without asking the database again. A token
#: revoked through this process (the API or ``revoke_token``) is refused at once; one revoked
#: elsewhere (``mes token revoke``, another API process) within this many seconds. An expiry
#: is checked on every request.
RECENT_SECONDS = 5.0
_RECENT_MAX = 1024

#: SHA-256 of a token → (its principal, its expiry, until when it is taken as valid).
_recent: dict[str, tuple[Principal, datetime | None, float]] = {}
#: Counts ``forget_recent`` calls: a token read before a revocation is not remembered after it.
_generation = 0


def _remember(digest: str, principal: Principal, expires_at: datetime | None) -> None:
    if len(_recent) >= _RECENT_MAX:
        _recent.clear()
    _recent[digest] = (principal, expires_at, time.monotonic() + RECENT_SECONDS)


def recently_authenticated(token: str) -> Principal | None:
    """The caller of a token found valid less than ``RECENT_SECONDS`` ago and not expired
    since, without a database round trip; None means: ask ``authenticate``."""
    digest = _digest(token)
    found = _recent.get(digest)
    if found is None:
        return None
    principal, expires_at, until = found
    if time.monotonic() >= until or (expires_at is not None and expires_at <= utcnow()):
        _recent.pop(digest, None)
        return None
    return principal


def forget_recent(name: str | None = None) -> None:
    """Forget the tokens of ``name`` (all tokens: None) found valid a moment ago, so that the
    next request asks the database."""
    global _generation
    _generation += 1
    for digest, (principal, _, _) in list(_recent.items()):
        if name is None or principal.name == name:
            _recent.pop(digest, None)
