"""A record that survives its database owner.

On PostgreSQL with real roles: the app role can only append to the audit trail and move its
head forward; the owner (here the superuser) can rewrite anything, and signed checkpoints
kept outside the database catch it: an edit with the later hashes recomputed, a cut tail,
a forged checkpoint line. The app itself (API and worker) runs as the app role.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from mes import audit
from mes import audit_checkpoints as checkpoints
from mes.cli import main
from mes.db import make_engine, make_sessionmaker
from mes.launch import Stack
from mes.migrate import AppRole, upgrade
from mes.models import AuditChainHead, AuditEvent
from tests.conftest import as_role, drop_role, fresh_pg_database

pytestmark = pytest.mark.postgres


def _write(sessions: sessionmaker[Session], n: int, actor: str = "app") -> None:
    for i in range(n):
        with sessions() as s:
            audit.record(
                s,
                actor=actor,
                action="test.event",
                object_type="thing",
                object_id=f"{actor}-{i}",
                after={"n": i},
            )
            s.commit()


@dataclass
class Db:
    owner_url: str
    owner: Engine
    app: sessionmaker[Session]
    key_file: Path
    checkpoint_file: Path

    def sign(self) -> checkpoints.Checkpoint | None:
        with self.app() as s:
            return checkpoints.write_checkpoint(
                s, checkpoints.load_signing_key(self.key_file), self.checkpoint_file
            )

    def verify(self, *, full: bool = False) -> audit.ChainReport:
        key = checkpoints.load_verify_key(self.key_file)
        with self.app() as s:
            return checkpoints.verify(s, self.checkpoint_file, key, full=full)

    def verify_chain_alone(self) -> audit.ChainReport:
        with self.app() as s:
            return audit.verify(s)


@pytest.fixture
def db(app_role: AppRole, tmp_path: Path) -> Iterator[Db]:
    """A fresh database migrated by its owner, the app's sessions as the app role, and 60
    events written by the app with a checkpoint signed every 10."""
    for url in fresh_pg_database("mes_roles"):
        upgrade(url, app_role=app_role)
        owner, app = make_engine(url), make_engine(as_role(url, app_role))
        key_file = tmp_path / "audit-key.pem"
        checkpoints.generate_key(key_file)
        d = Db(url, owner, make_sessionmaker(app), key_file, tmp_path / "checkpoints.jsonl")
        try:
            for _ in range(6):
                _write(d.app, 10)
                assert d.sign() is not None
            yield d
        finally:
            owner.dispose()
            app.dispose()


def _as_app_fails(d: Db, statement: str, match: str) -> None:
    with d.app() as s, pytest.raises(DBAPIError, match=match):
        s.execute(text(statement))


def test_the_app_role_may_only_append(db: Db, app_role: AppRole) -> None:
    with db.app() as s:
        assert s.scalar(text("SELECT current_user")) == app_role.name
    # Through the table's privileges, before any trigger.
    for statement in (
        "UPDATE audit_event SET reason = 'nothing happened' WHERE seq = 42",
        "DELETE FROM audit_event WHERE seq = 60",
        "TRUNCATE audit_event",
        "DELETE FROM audit_chain_head",
        "INSERT INTO audit_chain_head (id, seq, last_hash) VALUES (2, 0, 'x')",
        "UPDATE alembic_version SET version_num = '0001'",
    ):
        _as_app_fails(db, statement, "permission denied")
    # Owning nothing, it can change no table and no trigger ...
    for statement in (
        "ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only",
        "ALTER TABLE audit_chain_head DISABLE TRIGGER ALL",
        "DROP TRIGGER audit_chain_head_forward_only ON audit_chain_head",
    ):
        _as_app_fails(db, statement, "must be owner")
    # ... nor switch triggers off for its session.
    _as_app_fails(db, "SET session_replication_role = replica", "permission denied")
    # The head moves only forward, to the newest event.
    with db.app() as s:
        h59 = s.scalar(select(AuditEvent.hash).where(AuditEvent.seq == 59))
    for statement in (
        f"UPDATE audit_chain_head SET seq = 59, last_hash = '{h59}'",
        "UPDATE audit_chain_head SET last_hash = repeat('f', 64)",
        "UPDATE audit_chain_head SET seq = 61, last_hash = repeat('f', 64)",
        "UPDATE audit_chain_head SET seq = 0, last_hash = repeat('0', 64)",
    ):
        _as_app_fails(db, statement, "moves only forward")
    # What it may do, it still does: append (and sign), and use the ordinary tables.
    _write(db.app, 3)
    with db.app() as s:
        s.execute(text("UPDATE api_token SET revoked_at = NULL WHERE false"))
        head = s.get(AuditChainHead, 1)
        assert head is not None
        assert head.seq == 63
    assert db.verify().intact


def _rewrite(owner: Engine, statements: list[str], rehash_from: int | None) -> None:
    """What a database owner can do: switch the guards off, change rows, recompute every
    later hash with the plain SHA-256 of mes/audit.py, move the head, switch them back on."""
    with owner.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
        conn.execute(text("ALTER TABLE audit_chain_head DISABLE TRIGGER USER"))
        for statement in statements:
            conn.execute(text(statement))
        with Session(bind=conn) as s:
            events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
            prev = audit.GENESIS
            for ev in events:
                if rehash_from is not None and ev.seq >= rehash_from:
                    ev.prev_hash = prev
                    ev.hash = audit.event_hash(ev, prev)
                prev = ev.hash
            s.flush()
            s.execute(update(AuditChainHead).values(seq=events[-1].seq, last_hash=events[-1].hash))
            s.flush()
        conn.execute(text("ALTER TABLE audit_event ENABLE TRIGGER USER"))
        conn.execute(text("ALTER TABLE audit_chain_head ENABLE TRIGGER USER"))


def test_an_edit_with_recomputed_hashes_is_caught_by_the_checkpoints(db: Db) -> None:
    report = db.verify(full=True)
    assert report.intact, report.reason
    assert (report.checkpoints, report.anchored_seq, report.events) == (6, 60, 60)
    assert (report.full, report.started_after_seq) == (True, 0)
    # Incremental: every checkpoint's event still has its hash, nothing after the last one.
    report = db.verify()
    assert report.intact, report.reason
    assert (report.checkpoints, report.anchored_seq, report.events) == (6, 60, 0)
    assert (report.full, report.started_after_seq) == (False, 60)

    _rewrite(db.owner, ["UPDATE audit_event SET reason = 'edited' WHERE seq = 42"], rehash_from=42)
    # The hash chain alone cannot tell: the owner recomputed it.
    assert db.verify_chain_alone().intact
    for full in (True, False):
        report = db.verify(full=full)
        assert not report.intact
        # Checkpoints at 40 and 50: the change lies in 41..50, and 40 still vouches for 1..40.
        assert report.first_broken_seq == 41
        assert report.anchored_seq == 40
        assert report.reason is not None
        assert "events 41 to 50" in report.reason
        assert "recomputed" in report.reason
    # The incremental verify found the checkpoints of 50 and 60 no longer matching their
    # events and recomputed from the one before, 40 (events 41 to 50 only).
    assert (report.started_after_seq, report.events) == (40, 10)

    # The writer signs nothing more once the chain no longer leads to its last checkpoint.
    _write(db.app, 5)
    with pytest.raises(checkpoints.ChainNotSigned, match="differs from the checkpoint"):
        db.sign()


def test_an_edit_without_recomputing_is_caught_at_its_event(db: Db) -> None:
    _rewrite(db.owner, ["UPDATE audit_event SET reason = 'edited' WHERE seq = 42"], None)
    report = db.verify(full=True)
    assert not report.intact
    assert report.first_broken_seq == 42
    assert "content" in (report.reason or "")


def test_incremental_verify_catches_an_edit_after_the_last_checkpoint(db: Db) -> None:
    _write(db.app, 5)
    _rewrite(db.owner, ["UPDATE audit_event SET reason = 'edited' WHERE seq = 63"], None)
    report = db.verify()
    assert not report.intact
    assert (report.full, report.started_after_seq) == (False, 60)
    assert report.first_broken_seq == 63
    assert "content" in (report.reason or "")
    assert report.anchored_seq == 60


def test_an_edit_before_the_last_checkpoint(db: Db) -> None:
    """What the incremental verify can and cannot see before its start: the checkpoint's
    event is recomputed itself and every checkpoint's hash is compared with its event, but
    an older event edited without recomputing any hash is found by the full verify only."""
    _rewrite(db.owner, ["UPDATE audit_event SET reason = 'edited' WHERE seq = 42"], None)
    assert db.verify(full=True).first_broken_seq == 42
    report = db.verify()
    assert report.intact  # the documented limit: events 1..60 were not recomputed
    assert (report.started_after_seq, report.events) == (60, 0)

    # The start event itself is recomputed: an edit to it shows.
    _rewrite(db.owner, ["UPDATE audit_event SET reason = 'edited' WHERE seq = 60"], None)
    report = db.verify()
    assert not report.intact
    assert report.first_broken_seq == 60
    assert "content" in (report.reason or "")

    # An older checkpoint's event given a new hash (the later ones left alone): its own hash
    # check fails, and the walk starts from the checkpoint before it (20).
    _rewrite(db.owner, ["UPDATE audit_event SET hash = repeat('a', 64) WHERE seq = 30"], None)
    report = db.verify()
    assert not report.intact
    assert report.started_after_seq == 20
    assert report.first_broken_seq == 30


def test_a_cut_tail_with_the_head_moved_back_is_caught(db: Db) -> None:
    # Even the owner cannot move the head back while its trigger is on.
    with db.owner.begin() as conn, pytest.raises(DBAPIError, match="moves only forward"):
        conn.execute(text("UPDATE audit_chain_head SET seq = 54"))

    _rewrite(db.owner, ["DELETE FROM audit_event WHERE seq > 54"], rehash_from=None)
    assert db.verify_chain_alone().intact
    report = db.verify()
    assert not report.intact
    assert report.first_broken_seq == 55
    assert "events 55 to 60 were removed" in (report.reason or "")


def test_a_forged_checkpoint_line_is_reported(db: Db, tmp_path: Path) -> None:
    with db.app() as s:
        newest = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).one()
    # Signed by a key that is not the plant's, and the plant's line with another hash.
    other = tmp_path / "other.pem"
    checkpoints.generate_key(other)
    forged = checkpoints.sign(
        checkpoints.load_signing_key(other), newest.seq, newest.hash, newest.occurred_at
    )
    checkpoints.append(db.checkpoint_file, forged)
    lines = db.checkpoint_file.read_text().splitlines()
    altered = json.loads(lines[2])
    altered["hash"] = "0" * 64
    with db.checkpoint_file.open("a") as f:
        f.write(json.dumps(altered) + "\n")
        f.write("not json\n")

    report = db.verify()
    assert not report.intact
    reason = report.reason or ""
    assert "checkpoint line 7 (event 60): the signature does not hold" in reason
    assert "checkpoint line 8 (event 30): the signature does not hold" in reason
    assert "checkpoint line 9: not a checkpoint" in reason
    # The genuine checkpoints still vouch for the chain.
    assert report.first_broken_seq is None
    assert report.anchored_seq == 60


def test_cli_verify_with_an_auditors_copy_and_public_key(
    db: Db,
    app_role: AppRole,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MES_DATABASE_URL", as_role(db.owner_url, app_role))
    monkeypatch.setenv("MES_AUDIT_KEY_FILE", str(db.key_file))
    assert main(["audit", "key"]) == 0
    public = tmp_path / "audit-public.pem"
    public.write_text(capsys.readouterr().out.split("\n", 1)[1])
    copy = tmp_path / "auditors-copy.jsonl"
    copy.write_bytes(db.checkpoint_file.read_bytes())

    args = ["audit", "verify", "--checkpoints", str(copy), "--key-file", str(public)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["anchored_seq"] == 60
    assert main([*args, "--full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["full"], out["started_after_seq"], out["events"]) == (True, 0, 60)

    # The auditor's public key cannot sign.
    assert main(["audit", "checkpoint", "--key-file", str(public)]) == 2
    assert "private key" in capsys.readouterr().err
    _rewrite(db.owner, ["DELETE FROM audit_event WHERE seq > 57"], rehash_from=None)
    for full in ([], ["--full"]):
        assert main([*args, *full]) == 1
        out = json.loads(capsys.readouterr().out)
        assert out["first_broken_seq"] == 58


def test_db_upgrade_creates_the_app_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mes db upgrade`` as the owner: a new role with a password can log in and append;
    without a password it is made NOLOGIN, for a DBA to finish."""
    login = AppRole(f"mes_app_test_{uuid.uuid4().hex[:10]}", "s3cret-'quoted'")
    nologin = f"mes_app_test_{uuid.uuid4().hex[:10]}"
    try:
        for url in fresh_pg_database("mes_upgrade"):
            monkeypatch.setenv("MES_DATABASE_URL", "sqlite:///never-used.db")
            monkeypatch.setenv("MES_MIGRATION_DATABASE_URL", url)
            monkeypatch.setenv("MES_DATABASE_APP_ROLE", login.name)
            monkeypatch.setenv("MES_DATABASE_APP_PASSWORD", login.password or "")
            assert main(["db", "upgrade"]) == 0
            engine = make_engine(as_role(url, login))
            try:
                _write(make_sessionmaker(engine), 2)
            finally:
                engine.dispose()
            monkeypatch.setenv("MES_DATABASE_APP_ROLE", nologin)
            monkeypatch.delenv("MES_DATABASE_APP_PASSWORD")
            assert main(["db", "upgrade", "--database-url", url]) == 0
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT rolcanlogin, has_table_privilege(rolname, 'audit_event', 'INSERT'),"
                    " has_table_privilege(rolname, 'audit_event', 'UPDATE') FROM pg_roles "
                    "WHERE rolname = %s",
                    (nologin,),
                ).fetchone()
            assert row == (False, True, False)
            # The app role never runs the migrations: it would own the tables.
            monkeypatch.setenv("MES_DATABASE_APP_ROLE", "postgres")
            with pytest.raises(ValueError, match="must not run the migrations"):
                main(["db", "upgrade", "--database-url", url])
    finally:
        drop_role(login.name)
        drop_role(nologin)


async def test_the_api_runs_as_the_app_role_and_serves_checkpoints(
    stack: Stack, app_role: AppRole
) -> None:
    with stack.sessions() as s:
        assert s.scalar(text("SELECT current_user")) == app_role.name
    auditor = {"Authorization": f"Bearer {stack.tokens['auditor']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auditor) as http:
        # The worker signs a checkpoint as it starts (the plant load wrote events).
        for _ in range(50):
            got = (await http.get("/api/v1/audit-events/checkpoints")).json()
            if got["items"]:
                break
            await asyncio.sleep(0.2)
        assert got["items"], got
        assert stack.settings.audit_key_file is not None
        public = checkpoints.load_verify_key(stack.settings.audit_key_file)
        assert got["key_id"] == checkpoints.key_id(public)
        assert got["public_key"] == checkpoints.public_pem(public)
        first = got["items"][0]
        assert set(first) == {"seq", "hash", "at", "key_id", "signature"}

        report = (await http.get("/api/v1/audit-events/verify")).json()
        assert report["intact"], report
        assert report["checkpoints"] >= 1
        assert report["anchored_seq"] >= first["seq"]
        assert report["full"] is False
        assert report["started_after_seq"] >= first["seq"]
        whole = (await http.get("/api/v1/audit-events/verify", params={"full": "true"})).json()
        assert whole["intact"], whole
        assert (whole["full"], whole["started_after_seq"]) == (True, 0)
        assert whole["events"] >= first["seq"]
        bad_full = await http.get("/api/v1/audit-events/verify", params={"full": "maybe"})
        assert bad_full.status_code == 400
        assert "full" in bad_full.text

        later = await http.get(
            "/api/v1/audit-events/checkpoints", params={"after_seq": first["seq"], "limit": 1}
        )
        assert later.status_code == 200
        assert all(c["seq"] > first["seq"] for c in later.json()["items"])
        bad = await http.get("/api/v1/audit-events/checkpoints", params={"limit": 0})
        assert bad.status_code == 400
        erp = {"Authorization": f"Bearer {stack.tokens['erp']}"}
        denied = await http.get("/api/v1/audit-events/checkpoints", headers=erp)
        assert denied.status_code == 403
