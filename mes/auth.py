"""API tokens: one role each, shown once, stored as a SHA-256 hash, revocable.

Tokens are 256-bit random strings, so a plain SHA-256 (no salt, no slow hash) is enough to
make a stolen table useless; it also lets a request find its token by one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

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


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, role: str, actor: str = audit.SYSTEM) -> str:
    """Create a token for ``name`` with ``role``; returns the token (never stored in clear)."""
    try:
        parsed = Role(role)
    except ValueError:
        raise invalid("role", f"unknown role {role!r}; one of {', '.join(Role)}") from None
    if not name or len(name) > 100:
        raise invalid("name", "a name of 1 to 100 characters is required")
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=parsed, token_hash=_digest(token)))
    audit.record(
        session,
        actor=actor,
        action="token.created",
        object_type="api_token",
        object_id=name,
        after={"role": str(parsed)},
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a token named {name!r} exists") from None
    return token


def list_tokens(session: Session) -> list[TokenInfo]:
    """All tokens, revoked ones included (without their secrets, which are not stored)."""
    return [
        TokenInfo(t.name, t.role, t.created_at, t.revoked_at)
        for t in session.scalars(select(ApiToken).order_by(ApiToken.name))
    ]


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
    return TokenInfo(tok.name, tok.role, tok.created_at, tok.revoked_at)


def authenticate(session: Session, token: str) -> Principal | None:
    """The caller a token belongs to, or None for an unknown or revoked token."""
    if not token.startswith(PREFIX):
        return None
    tok = session.scalar(select(ApiToken).where(ApiToken.token_hash == _digest(token)))
    if tok is None or tok.revoked_at is not None:
        return None
    return Principal(tok.name, Role(tok.role))
