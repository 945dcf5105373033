"""A fresh database and a fresh MES, as separate processes, for every fault test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mes.migrate import upgrade
from tests.conftest import fresh_pg_database
from tests.faults.harness import Plant


@pytest.fixture
async def plant(tmp_path: Path) -> AsyncIterator[Plant]:
    """The sample plant's MES: Temporal, PLC simulator, ERP receiver, one worker and the API,
    each its own process; stopped (what still runs) after the test."""
    for url in fresh_pg_database("mes_fault"):
        upgrade(url)
        p = Plant(url, tmp_path)
        try:
            await p.start(workers=1)
            yield p
        finally:
            await p.stop()
