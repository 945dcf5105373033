"""Arguments and results of the order workflows and their activities.

One dataclass per argument, so fields can be added later without breaking running
workflows (Temporal serialises them as JSON).
"""

from dataclasses import dataclass, field

from adapters.jobcontrol import JobOrder


@dataclass
class OrderInput:
    """Start argument of ``ProductionOrderWorkflow``: the stored operations request."""

    order_id: int
    order_number: str


@dataclass
class JobInput:
    """Start argument of ``JobOrderWorkflow``: one planned job order (by its JobOrderID)."""

    order_id: int
    job_order_id: str


@dataclass
class Dispatch:
    """A job order ready to send, and where to send it."""

    protocol: str
    url: str
    machine: str
    order: JobOrder


@dataclass
class JobOutcome:
    """How a job order ended: ISA-95 state ("Completed", "Aborted") and the lots it made."""

    job_order_id: str
    state: str
    produced_lots: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class OrderOutcome:
    """How a production order ended."""

    order_number: str
    state: str
    late: bool
    produced_lots: list[str] = field(default_factory=list)
