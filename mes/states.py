"""The state vocabulary of orders and work orders, in one place and free of any framework.

ISA-95 request states (Part 4) are shared by production orders (operations requests), their
steps (segment requirements) and work orders (job orders). The workflows, the API, the
database model and the B2MML codec all import them from here; this module imports nothing
of the project, so the Temporal workflow sandbox can load it as it is.
"""

from __future__ import annotations

import enum
from typing import Literal


class RequestState(enum.StrEnum):
    """ISA-95 request states, used for operations requests, segment requirements, job orders."""

    FORECAST = "Forecast"
    RELEASED = "Released"
    WAITING = "Waiting"
    READY = "Ready"
    RUNNING = "Running"
    COMPLETED = "Completed"
    ABORTED = "Aborted"
    HELD = "Held"
    SUSPENDED = "Suspended"
    CANCELLED = "Cancelled"
    CLOSED = "Closed"


#: States nothing leaves: the order or work order has ended.
FINAL_STATES = frozenset(
    {RequestState.COMPLETED, RequestState.ABORTED, RequestState.CANCELLED, RequestState.CLOSED}
)

#: Work order states that are still to be done or being done.
OPEN_WORK_STATES = (
    RequestState.WAITING,
    RequestState.READY,
    RequestState.RUNNING,
    RequestState.HELD,
)

#: A supervisor's actions on a work order.
Action = Literal["hold", "resume", "cancel", "priority", "equipment"]


def is_final(state: str) -> bool:
    """Whether an order or work order in ``state`` has ended."""
    return state in FINAL_STATES


def allowed_actions(state: str, dispatched: bool) -> list[str]:
    """The supervisor actions a work order in ``state`` accepts.

    ``dispatched`` tells whether the job was already sent to a PLC: its equipment is fixed
    from then on. The API lists these and the job workflow's update validators enforce
    them, so the two cannot disagree.
    """
    if state == RequestState.WAITING:
        return ["hold", "cancel", "priority", "equipment"]
    if state == RequestState.READY:
        return ["hold", "cancel", "priority"]
    if state == RequestState.RUNNING:
        return ["hold", "cancel"]
    if state == RequestState.HELD:
        return ["resume", "cancel", "priority", *([] if dispatched else ["equipment"])]
    return []
