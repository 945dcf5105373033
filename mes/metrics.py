"""Operations metrics in the Prometheus text format (``GET /metrics``).

Most come from the database at scrape time, so every API process shows the same plant-wide
numbers whichever process did the work:

- ``mes_orders{state}``: production orders by state (the non-final ones are in flight);
- ``mes_work_orders_open{state}``: work orders waiting, ready, running or held;
- ``mes_dispatch_latency_seconds{quantile}``: created-to-dispatched time of the work orders
  dispatched in the last hour (0.5 and 0.9), with ``mes_dispatched_last_hour``;
- ``mes_erp_callback_backlog`` and ``mes_erp_callback_oldest_seconds``: ERP reports not yet
  delivered (nor refused for good), and the age of the oldest;
- ``mes_workflows_not_started``: stored orders whose workflow the relay has not started yet;
  ``mes_workflow_failures``: orders that ended Aborted.

The PLC round trips are counted in the process that makes them (``PLC_CALLS``,
``PLC_ERRORS``, ``PLC_CALL_SECONDS``, by job-control method): the worker's. ``mes dev``,
``mes demo`` and the embedded stack run the worker in the API's process, so they show here.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mes.kpi import percentile
from mes.models import ErpMessage, JobOrder, OperationsRequest
from mes.states import FINAL_STATES, OPEN_WORK_STATES, RequestState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: This process's PLC round trips.
PROCESS = CollectorRegistry(auto_describe=True)
PLC_CALLS = Counter(
    "mes_plc_calls", "Job-control method calls made to PLCs", ["method"], registry=PROCESS
)
PLC_ERRORS = Counter(
    "mes_plc_call_errors", "PLC calls that failed (unreachable, refused)", ["method"],
    registry=PROCESS,
)  # fmt: skip
PLC_CALL_SECONDS = Histogram(
    "mes_plc_call_seconds", "Round trip of a PLC call", ["method"], registry=PROCESS
)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def database_families(session: Session, now: datetime | None = None) -> list[Metric]:
    """The metrics read from the database, now."""
    now = now or datetime.now(UTC)
    orders = GaugeMetricFamily("mes_orders", "Production orders by state", labels=["state"])
    by_state = dict(
        session.execute(
            select(OperationsRequest.state, func.count()).group_by(OperationsRequest.state)
        ).all()
    )
    for state in RequestState:
        orders.add_metric([state.value], by_state.get(state.value, 0))
    in_flight = GaugeMetricFamily(
        "mes_orders_in_flight", "Production orders not in a final state", value=sum(
            n for s, n in by_state.items() if s not in FINAL_STATES
        ),
    )  # fmt: skip
    work = GaugeMetricFamily("mes_work_orders_open", "Open work orders by state", labels=["state"])
    open_work = dict(
        session.execute(
            select(JobOrder.state, func.count())
            .where(JobOrder.state.in_(OPEN_WORK_STATES))
            .group_by(JobOrder.state)
        ).all()
    )
    for state in OPEN_WORK_STATES:
        work.add_metric([state.value], open_work.get(state.value, 0))
    latencies = [
        (dispatched - created).total_seconds()
        for created, dispatched in session.execute(
            select(JobOrder.created_at, JobOrder.dispatched_at).where(
                JobOrder.dispatched_at >= now - timedelta(hours=1)
            )
        ).all()
        if dispatched is not None
    ]
    latency = GaugeMetricFamily(
        "mes_dispatch_latency_seconds",
        "Created-to-dispatched time of the work orders dispatched in the last hour",
        labels=["quantile"],
    )
    for q in (50, 90):
        value = percentile(latencies, q)
        latency.add_metric([f"0.{q // 10}"], value if value is not None else float("nan"))
    dispatched = GaugeMetricFamily(
        "mes_dispatched_last_hour", "Work orders dispatched in the last hour", value=len(latencies)
    )
    pending = ErpMessage.delivered_at.is_(None) & ErpMessage.rejected_at.is_(None)
    backlog, oldest = session.execute(
        select(func.count(), func.min(ErpMessage.created_at)).where(pending)
    ).one()
    oldest_s = (now - oldest.replace(tzinfo=oldest.tzinfo or UTC)).total_seconds() if oldest else 0
    not_started = session.scalar(
        select(func.count()).where(
            OperationsRequest.workflow_started_at.is_(None),
            OperationsRequest.state.not_in(FINAL_STATES),
        )
    )
    return [
        orders,
        in_flight,
        work,
        latency,
        dispatched,
        GaugeMetricFamily(
            "mes_erp_callback_backlog", "ERP reports not yet delivered", value=backlog
        ),
        GaugeMetricFamily(
            "mes_erp_callback_oldest_seconds",
            "Age of the oldest ERP report not yet delivered (0: none)",
            value=max(0.0, oldest_s),
        ),
        GaugeMetricFamily(
            "mes_workflows_not_started",
            "Stored orders whose workflow is not started yet",
            value=not_started or 0,
        ),
        GaugeMetricFamily(
            "mes_workflow_failures",
            "Production orders that ended Aborted",
            value=by_state.get(RequestState.ABORTED.value, 0),
        ),
    ]


def exposition(families: list[Metric]) -> bytes:
    """The text format of ``families`` and this process's PLC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families, *PROCESS.collect()]))
    return generate_latest(registry)
