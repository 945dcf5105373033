"""Stock moves are atomic: many jobs consuming the same lots at once, each recorded by two
workers (a retry racing the first run), lose no consumption and book none twice.

Runs on PostgreSQL (row locks, READ COMMITTED, the production case) and on SQLite (one
writer at a time) with the sample plant.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mes import execution
from mes.machines import JobResponseData, JobState, MaterialActualData
from mes.models import MaterialLot
from tests.test_execution import _order

THREADS = 8
JOBS_PER_THREAD = 10
FLOUR_START = 1000.0
YEAST_START = 50.0


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def plant(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    name = "plant_pg" if request.param == "postgresql" else "plant_sqlite"
    sessions: sessionmaker[Session] = request.getfixturevalue(name)
    return sessions


def _lot(sessions: sessionmaker[Session], material: str, quantity: float, unit: str) -> str:
    lot_id = f"LOT-{material}-{uuid.uuid4().hex[:8]}"
    with sessions() as s:
        material_pk = s.execute(
            text("SELECT id FROM material_definition WHERE external_id = :m"), {"m": material}
        ).scalar_one()
        s.add(
            MaterialLot(
                external_id=lot_id,
                material_definition_id=material_pk,
                quantity=quantity,
                unit=unit,
            )
        )
        s.commit()
    return lot_id


def _response(job_order_id: str, n: int, flour: str, yeast: str) -> JobResponseData:
    """Mixing consumed both shared lots (listed in either order) and produced one dough lot."""
    now = datetime.now(UTC)
    consumed = [
        MaterialActualData("FLOUR-WHEAT", "Consumed", 1.25 + n % 3, "kg", flour),
        MaterialActualData("YEAST-FRESH", "Consumed", 0.125, "kg", yeast),
    ]
    if n % 2:
        consumed.reverse()  # a different lock order on every other job: no deadlock
    return JobResponseData(
        job_order_id=job_order_id,
        state=JobState.ENDED,
        start_time=now - timedelta(seconds=5),
        end_time=now,
        material_actuals=[
            *consumed,
            MaterialActualData("DOUGH-WHITE", "Produced", 1.0, "kg", f"LOT-{job_order_id}"),
        ],
        processed_count=1,
    )


def _record(sessions: sessionmaker[Session], response: JobResponseData) -> tuple[str, list[str]]:
    """What the activity does, with one retry as Temporal would after a failed attempt."""
    for attempt in range(2):
        try:
            with sessions() as s:
                return execution.record_job_response(s, response)
        except IntegrityError:
            # Another worker recorded the same response at the same moment.
            if attempt:
                raise
    raise AssertionError("unreachable")


def _stock(sessions: sessionmaker[Session], lot_id: str) -> tuple[float, float, int]:
    """The lot's quantity, the sum and the count of its consumption records."""
    with sessions() as s:
        row = s.execute(
            text(
                "SELECT l.quantity, coalesce(sum(a.quantity), 0), count(a.id) "
                "FROM material_lot l LEFT JOIN material_actual a "
                "ON a.material_lot_id = l.id AND a.use = 'Consumed' "
                "WHERE l.external_id = :lot GROUP BY l.quantity"
            ),
            {"lot": lot_id},
        ).one()
    return float(row[0]), float(row[1]), int(row[2])


def test_concurrent_consumptions_of_one_lot_all_count_once(
    plant: sessionmaker[Session],
) -> None:
    flour = _lot(plant, "FLOUR-WHEAT", FLOUR_START, "kg")
    yeast = _lot(plant, "YEAST-FRESH", YEAST_START, "kg")
    jobs = THREADS * JOBS_PER_THREAD
    responses = []
    for n in range(jobs):
        order_id, _ = _order(plant, quantity=1)
        with plant() as s:
            first_job = execution.plan_order(s, order_id)[0]
        responses.append(_response(first_job, n, flour, yeast))

    # Thread t records its own ten responses interleaved with the ten of thread t+1, so
    # every response is recorded twice, by two threads, at about the same time.
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list[tuple[str, list[str]]]:
        mine = responses[t * JOBS_PER_THREAD : (t + 1) * JOBS_PER_THREAD]
        u = (t + 1) % THREADS
        theirs = responses[u * JOBS_PER_THREAD : (u + 1) * JOBS_PER_THREAD]
        start.wait()
        results = []
        for a, b in zip(mine, theirs, strict=True):
            results.append(_record(plant, a))
            results.append(_record(plant, b))
        return results

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = [r for rs in pool.map(worker, range(THREADS)) for r in rs]
    assert len(outcomes) == 2 * jobs
    assert [o for o in outcomes if o[0] != "Completed"] == []

    def check() -> None:
        for lot_id, start_qty in ((flour, FLOUR_START), (yeast, YEAST_START)):
            quantity, consumed, records = _stock(plant, lot_id)
            assert records == jobs  # one consumption record per job, none twice
            assert quantity == pytest.approx(start_qty - consumed, abs=1e-6)
        with plant() as s:
            expected_flour = sum(1.25 + n % 3 for n in range(jobs))
            assert _stock(plant, flour)[1] == pytest.approx(expected_flour)
            responses_stored = s.execute(
                text(
                    "SELECT count(*) FROM job_response r JOIN job_order j ON r.job_order_id = j.id "
                    "WHERE j.external_id IN :ids"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": [r.job_order_id for r in responses]},
            ).scalar_one()
            assert responses_stored == jobs

    check()
    # The same responses recorded again (a retried activity): nothing moves.
    for r in responses[:: JOBS_PER_THREAD // 2]:
        with plant() as s:
            state, lots = execution.record_job_response(s, r)
        assert (state, lots) == ("Completed", [f"LOT-{r.job_order_id}"])
    check()
