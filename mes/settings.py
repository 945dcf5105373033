"""Settings, read from the environment (``MES_*``) with embedded defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_database_url() -> str:
    return f"sqlite:///{Path('.mes') / 'mes.db'}"


@dataclass(frozen=True)
class Settings:
    """Where the MES finds its database, Temporal and its task queue.

    Every field has an environment variable; see README.md for the table.
    """

    database_url: str = field(default_factory=_default_database_url)
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "mes"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: Publishing interval of the OPC UA subscription a waiting job holds on its PLC.
    plc_poll_seconds: float = 0.5
    #: Largest request body the API reads, in bytes.
    max_body_bytes: int = 1_000_000
    #: How often a worker's relay looks for stored orders whose workflow is not started.
    relay_seconds: float = 5.0
    #: CIDRs callbacks may go to besides public addresses (loopback, private nets), see
    #: ``mes.callbacks``; empty: public addresses only, over https.
    callback_allow: tuple[str, ...] = ()
    #: The database owner's URL, for migrations (None: ``database_url``); the services run
    #: as ``database_url``'s role, the app role.
    migration_database_url: str | None = None
    #: The PostgreSQL role the services run as; ``mes db upgrade`` creates and grants it.
    database_app_role: str = "mes_app"
    #: Its password; with one, ``mes db upgrade`` makes the role LOGIN with it.
    database_app_password: str | None = None
    #: The Ed25519 key that signs audit checkpoints (None: no checkpoints are written).
    audit_key_file: Path | None = None
    #: The append-only file of signed audit checkpoints.
    audit_checkpoint_file: Path = field(
        default_factory=lambda: Path(".mes", "audit-checkpoints.jsonl")
    )
    #: A checkpoint at least this often while events are added ...
    audit_checkpoint_seconds: float = 60.0
    #: ... and as soon as this many events were added since the last one.
    audit_checkpoint_events: int = 1000
    #: ``GET /metrics`` without a token (for a scraper on a trusted network).
    metrics_public: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from ``MES_*`` variables, falling back to the defaults."""
        e = os.environ if env is None else env
        d = cls()
        return cls(
            database_url=e.get("MES_DATABASE_URL", d.database_url),
            temporal_address=e.get("MES_TEMPORAL_ADDRESS", d.temporal_address),
            temporal_namespace=e.get("MES_TEMPORAL_NAMESPACE", d.temporal_namespace),
            task_queue=e.get("MES_TASK_QUEUE", d.task_queue),
            api_host=e.get("MES_API_HOST", d.api_host),
            api_port=int(e.get("MES_API_PORT", d.api_port)),
            plc_poll_seconds=float(e.get("MES_PLC_POLL_SECONDS", d.plc_poll_seconds)),
            max_body_bytes=int(e.get("MES_MAX_BODY_BYTES", d.max_body_bytes)),
            relay_seconds=float(e.get("MES_RELAY_SECONDS", d.relay_seconds)),
            callback_allow=tuple(
                c.strip() for c in e.get("MES_CALLBACK_ALLOW", "").split(",") if c.strip()
            ),
            migration_database_url=e.get("MES_MIGRATION_DATABASE_URL") or None,
            database_app_role=e.get("MES_DATABASE_APP_ROLE", d.database_app_role),
            database_app_password=e.get("MES_DATABASE_APP_PASSWORD") or None,
            audit_key_file=Path(e["MES_AUDIT_KEY_FILE"]) if e.get("MES_AUDIT_KEY_FILE") else None,
            audit_checkpoint_file=Path(
                e.get("MES_AUDIT_CHECKPOINTS", str(d.audit_checkpoint_file))
            ),
            audit_checkpoint_seconds=float(
                e.get("MES_AUDIT_CHECKPOINT_SECONDS", d.audit_checkpoint_seconds)
            ),
            audit_checkpoint_events=int(
                e.get("MES_AUDIT_CHECKPOINT_EVENTS", d.audit_checkpoint_events)
            ),
            metrics_public=e.get("MES_METRICS_PUBLIC", "") in ("1", "true", "yes"),
        )
