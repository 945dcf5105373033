"""Signed checkpoints of the audit chain, kept outside the database.

Whoever owns the database can rewrite the chain and recompute its hashes: the hashes alone
prove nothing to them. A checkpoint is the chain's position (event ``seq`` and its ``hash``)
at a time, signed with an Ed25519 key that lives in a file beside the MES processes, never
in the database, and appended as one JSON line to a file outside it. ``verify`` compares the
recomputed chain with every checkpoint whose signature holds: an edit whose later hashes were
recomputed no longer matches the next checkpoint, and a chain shorter than a checkpoint was
cut. What this does and does not catch is in the README ("Audit trail").

The key file is PKCS#8 PEM (``openssl genpkey -algorithm ed25519`` writes one too); an
auditor verifies with its public key (``mes audit key`` prints it), which cannot sign.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mes import audit
from mes.models import AuditEvent, utcnow

log = logging.getLogger(__name__)

#: What a signature covers is tagged, so a signature made for anything else never passes.
_CONTEXT = "mes-audit-checkpoint-v1"
#: How much of the checkpoint file's end the writer reads to find its last checkpoint.
_TAIL_BYTES = 64 * 1024


# --- keys --------------------------------------------------------------------------------------


def generate_key(path: Path) -> None:
    """Write a new Ed25519 private key to ``path`` (PKCS#8 PEM, readable by its owner only)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def ensure_key(path: Path) -> None:
    """Generate the key at ``path`` unless there is one (``mes dev``, ``mes demo``)."""
    with contextlib.suppress(FileExistsError):
        generate_key(path)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path``."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """The public key in ``path``, which holds either the public or the private key."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def public_pem(key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo), for an auditor to keep."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of the public key: the first 16 hex digits of its SHA-256."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """Event ``seq`` had hash ``hash`` at time ``at``, signed by key ``key_id``."""

    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: str

    def signed_bytes(self) -> bytes:
        return _message(self.seq, self.hash, self.at)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "at": self.at.isoformat(),
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def anchor(self) -> audit.Anchor:
        return audit.Anchor(seq=self.seq, hash=self.hash, at=self.at)


def _message(seq: int, hash_: str, at: datetime) -> bytes:
    body = {"context": _CONTEXT, "seq": seq, "hash": hash_, "at": at.isoformat()}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(key: Ed25519PrivateKey, seq: int, hash_: str, at: datetime) -> Checkpoint:
    """A checkpoint of event ``seq`` with ``hash_`` at ``at``."""
    signature = base64.b64encode(key.sign(_message(seq, hash_, at))).decode()
    return Checkpoint(seq, hash_, at, key_id(key.public_key()), signature)


def signature_holds(cp: Checkpoint, key: Ed25519PublicKey) -> bool:
    """Whether ``key`` signed ``cp`` as it stands."""
    try:
        key.verify(base64.b64decode(cp.signature, validate=True), cp.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Line:
    """One line of a checkpoint file: its checkpoint, or why it is not one."""

    number: int
    checkpoint: Checkpoint | None
    error: str | None = None


def parse_line(number: int, text: str) -> Line:
    """Read one JSON line; a line that is not a checkpoint is kept with the reason."""
    try:
        raw = json.loads(text)
        cp = Checkpoint(
            seq=int(raw["seq"]),
            hash=str(raw["hash"]),
            at=datetime.fromisoformat(raw["at"]),
            key_id=str(raw["key_id"]),
            signature=str(raw["signature"]),
        )
    except (ValueError, TypeError, KeyError) as e:
        return Line(number, None, f"not a checkpoint ({type(e).__name__})")
    return Line(number, cp)


def read_lines(path: Path) -> list[Line]:
    """Every non-empty line of the checkpoint file at ``path`` (none if there is no file)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return [parse_line(n, text) for n, text in enumerate(f, 1) if text.strip()]


def last_checkpoint(path: Path, key: Ed25519PublicKey) -> Checkpoint | None:
    """The newest checkpoint in the file that ``key`` signed (read from the file's end)."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read().decode("utf-8", errors="replace").splitlines()
    # The whole file when its tail holds no good checkpoint (the first tail line may be cut).
    for lines in ([parse_line(0, t) for t in tail if t.strip()], read_lines(path)):
        for line in reversed(lines):
            if line.checkpoint is not None and signature_holds(line.checkpoint, key):
                return line.checkpoint
    return None


def append(path: Path, cp: Checkpoint) -> None:
    """Append ``cp`` as one line; one ``write`` on an O_APPEND file, so writers on one host
    never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(cp.to_json(), separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ChainNotSigned(Exception):
    """The chain no longer agrees with the last checkpoint: nothing was signed."""

    def __init__(self, report: audit.ChainReport) -> None:
        super().__init__(report.reason)
        self.report = report


def write_checkpoint(session: Session, key: Ed25519PrivateKey, path: Path) -> Checkpoint | None:
    """Sign the chain's newest event and append the checkpoint to ``path``.

    What came after the last checkpoint in the file is verified first (from the first event
    when there is none): a chain that was changed is never signed (``ChainNotSigned``).
    Returns None when there is nothing new to sign.
    """
    last = last_checkpoint(path, key.public_key())
    newest = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    if newest is None or (last is not None and newest.seq == last.seq):
        return None
    report = audit.verify(session, since=last.anchor() if last else None)
    if not report.intact:
        raise ChainNotSigned(report)
    cp = sign(key, newest.seq, newest.hash, utcnow())
    append(path, cp)
    return cp


def verify(
    session: Session, path: Path, key: Ed25519PublicKey, *, full: bool = False
) -> audit.ChainReport:
    """Check the chain against every checkpoint in ``path`` signed by ``key``.

    By default (incremental) every signed checkpoint's event must still have the signed hash
    (one query), and the chain is recomputed from the newest checkpoint before the first one
    that no longer matches (from the newest checkpoint when all match; from the first event
    when none does): what came after it, the later checkpoints and the chain head (a cut
    tail) are checked as in the full walk. With ``full``, every event is recomputed from the
    first. What an incremental verify cannot catch is in the README ("Audit trail").

    A line whose signature does not hold (forged, edited, or another key's) makes the
    report not intact, whatever the chain says; it is named in the reason.
    """
    good: list[audit.Anchor] = []
    bad: list[str] = []
    for line in read_lines(path):
        if line.checkpoint is None:
            bad.append(f"checkpoint line {line.number}: {line.error}")
        elif not signature_holds(line.checkpoint, key):
            bad.append(
                f"checkpoint line {line.number} (event {line.checkpoint.seq}): the signature "
                f"does not hold (forged or altered, or signed by another key)"
            )
        else:
            good.append(line.checkpoint.anchor())
    start = None if full else trusted_start(session, good)
    report = audit.verify(session, good, since=start)
    if start is not None:
        # The checkpoints up to the start were compared with their events' stored hashes.
        report.checkpoints += sum(1 for a in good if a.seq <= start.seq)
    if bad:
        report.intact = False
        report.reason = "; ".join([report.reason, *bad] if report.reason else bad)
    return report


def trusted_start(session: Session, anchors: list[audit.Anchor]) -> audit.Anchor | None:
    """The newest checkpoint before the first one whose event is gone or has another hash
    (the newest of all when every one matches); None: start from the first event."""
    ordered = sorted(anchors, key=lambda a: a.seq)
    if not ordered:
        return None
    stored: dict[int, str] = {}
    seqs = sorted({a.seq for a in ordered})
    for i in range(0, len(seqs), 1000):
        rows = session.execute(
            select(AuditEvent.seq, AuditEvent.hash).where(AuditEvent.seq.in_(seqs[i : i + 1000]))
        )
        stored.update((seq, hash_) for seq, hash_ in rows)
    start = None
    for anchor in ordered:
        if stored.get(anchor.seq) != anchor.hash:
            break
        start = anchor
    return start


# --- the periodic writer -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def checkpoints_running(
    sessions: sessionmaker[Session],
    key_file: Path,
    path: Path,
    *,
    every_seconds: float,
    every_events: int,
    poll_seconds: float = 1.0,
) -> AsyncIterator[None]:
    """Write checkpoints in the background until the context exits: one every
    ``every_seconds`` when events were added, and one as soon as ``every_events`` were added
    since the last (seen within ``poll_seconds``)."""
    key = load_signing_key(key_file)

    def newest_seq() -> int:
        with sessions() as s:
            return s.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)) or 0

    def write() -> Checkpoint | None:
        with sessions() as s:
            return write_checkpoint(s, key, path)

    async def loop() -> None:
        last_seq, last_at = -1, 0.0
        clock = asyncio.get_running_loop().time
        while True:
            try:
                seq = await asyncio.to_thread(newest_seq)
                due = clock() - last_at >= every_seconds or seq - last_seq >= every_events
                if seq != last_seq and due:
                    cp = await asyncio.to_thread(write)
                    last_seq, last_at = (cp.seq if cp else seq), clock()
            except ChainNotSigned as e:
                log.error(
                    "audit checkpoint refused: the chain no longer agrees with %s (%s); it "
                    "was changed, or the file belongs to another database",
                    path,
                    e,
                )
                last_seq, last_at = seq, clock()
            except Exception:
                log.exception("audit checkpoint failed; retrying")
            await asyncio.sleep(poll_seconds)

    task = asyncio.create_task(loop(), name="audit-checkpoints")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The events of the last moments, signed on the way out.
        try:
            await asyncio.to_thread(write)
        except Exception as e:
            log.error("audit checkpoint on stop failed: %s", e)
