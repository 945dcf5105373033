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
        )
