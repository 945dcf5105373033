"""A token found valid is remembered for a few seconds (no database round trip per request);
a revocation through this process is seen at once, one made elsewhere within the window, and
an expiry always."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from mes import auth
from mes.db import make_engine, make_sessionmaker
from mes.migrate import upgrade
from mes.models import ApiToken, Role, utcnow

time_now = time.monotonic


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()
    auth.forget_recent()


def test_a_revocation_here_is_seen_at_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        token = auth.create_token(s, "here", "auditor")
        assert auth.authenticate(s, token) == auth.Principal("here", Role.AUDITOR)
        assert auth.recently_authenticated(token) == auth.Principal("here", Role.AUDITOR)
        auth.revoke_token(s, "here")
        assert auth.recently_authenticated(token) is None
        assert auth.authenticate(s, token) is None


def test_a_revocation_elsewhere_is_seen_within_the_window(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    with sessions() as s:
        token = auth.create_token(s, "elsewhere", "auditor")
        assert auth.authenticate(s, token) is not None
        # Another process (mes token revoke) writes the revocation.
        s.execute(update(ApiToken).values(revoked_at=utcnow()))
        s.commit()
        assert auth.recently_authenticated(token) is not None  # still inside the window
        monkeypatch.setattr(
            time, "monotonic", lambda: time_now() + auth.RECENT_SECONDS
        )  # the window has passed
        assert auth.recently_authenticated(token) is None
        assert auth.authenticate(s, token) is None


def test_an_expiry_is_checked_every_time(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    with sessions() as s:
        token = auth.create_token(
            s, "brief", "auditor", expires_at=utcnow() + timedelta(seconds=30)
        )
        assert auth.authenticate(s, token) is not None
        assert auth.recently_authenticated(token) is not None
        later = utcnow() + timedelta(minutes=1)
        monkeypatch.setattr(auth, "utcnow", lambda: later)
        assert auth.recently_authenticated(token) is None
