"""The order workflows' contract: their ids, and the arguments and results of the workflows,
their updates and their activities.

One dataclass per argument, so fields can be added later without breaking running
workflows (Temporal serialises them as JSON).
"""

from dataclasses import dataclass, field
from typing import Any

from mes.machines import Endpoint, JobOrderData


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
class PlcRoom:
    """How many job orders a PLC takes (None: no limit published) and holds now."""

    max_job_orders: int | None
    job_orders: int

    @property
    def full(self) -> bool:
        return self.max_job_orders is not None and self.job_orders >= self.max_job_orders


@dataclass
class Dispatch:
    """A job order ready to send, and where to send it (how to secure the session included:
    ``settings`` name where the secrets are, never a secret, since this is in the history)."""

    protocol: str
    url: str
    machine: str
    order: JobOrderData
    #: Why the job cannot go yet ("" when it can): e.g. its material is on a quality hold.
    waiting_for: str = ""
    security: str = "None"
    settings: dict[str, Any] = field(default_factory=dict)
    #: The PLC's room when the job was prepared (None: not asked, or the PLC did not say),
    #: so the first dispatch attempt needs no round trip of its own to ask.
    room: PlcRoom | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The work unit's controller endpoint."""
        return Endpoint(self.protocol, self.url, self.machine, self.security, self.settings)


@dataclass
class JobOutcome:
    """How a job order ended: ISA-95 state ("Completed", "Aborted") and the lots it made."""

    job_order_id: str
    state: str
    produced_lots: list[str] = field(default_factory=list)
    reason: str = ""
    #: The job order that reworks this one's nonconforming lot (the step goes on there).
    rework: str | None = None


@dataclass
class OrderOutcome:
    """How a production order ended."""

    order_number: str
    state: str
    late: bool
    produced_lots: list[str] = field(default_factory=list)


@dataclass
class WaitArgs:
    """Wait until the PLC reports the job in a state other than ``known`` (a JobState)."""

    dispatch: Dispatch
    known: int


@dataclass
class WorkOrderCommand:
    """A supervisor action on a work order (the argument of every job workflow update)."""

    actor: str
    reason: str | None = None
    priority: int | None = None
    equipment: str | None = None


@dataclass
class WorkOrderStatus:
    """A job workflow's live view: its state and what a supervisor may do now."""

    job_order_id: str
    state: str
    #: None until the job is prepared for its PLC; the work order's record has them before.
    priority: int | None
    equipment: str | None
    dispatched: bool
    allowed_actions: list[str]
    #: Decided and answered, still to be carried out on the machine ("pause", "cancel", …).
    pending_on_machine: list[str] = field(default_factory=list)
    #: What the job waits for now, when it is not the obvious ("Queued: PLC full", …).
    note: str = ""


#: The job state ``plc_command`` answers when the PLC does not hold the job.
GONE = 0


@dataclass
class PlcCommand:
    """A job-control method to call on the job's PLC ("pause", "resume", "cancel", "clear", …)."""

    dispatch: Dispatch
    command: str


@dataclass
class JobStateChange:
    """Record a supervisor-driven state change of a job order."""

    job_order_id: str
    state: str
    actor: str
    reason: str | None = None


@dataclass
class JobChange:
    """Record a new priority and/or work unit for a job order."""

    job_order_id: str
    actor: str
    reason: str | None = None
    priority: int | None = None
    equipment: str | None = None


@dataclass
class DispositionCommand:
    """A supervisor's disposition of a nonconformance (release, rework, scrap), for the work
    order held on it."""

    actor: str
    nonconformance: str
    disposition: str
    reason: str


@dataclass
class DispositionOutcome:
    """What the disposition made of the held work order, and its rework job order if any."""

    job_state: str
    rework_job_order: str | None = None


# --- workflow ids: business keys, built here and nowhere else -------------------------------


def order_workflow_id(order_number: str) -> str:
    """The id of a production order's workflow: a second post of the order finds it."""
    return f"order-{order_number}"


def job_workflow_id(job_order_id: str) -> str:
    """The id of a work order's (job order's) workflow."""
    return f"job-{job_order_id}"


@dataclass
class OrderCommand:
    """A supervisor's or the ERP's action on a whole production order."""

    actor: str
    reason: str | None = None


@dataclass
class OrderStatus:
    """An order workflow's live view."""

    order_number: str
    cancel_requested: bool
    current_step: int | None
    ended: bool
