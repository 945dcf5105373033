"""OPC 10031-4 (ISA-95 Job Control v2) names and values shared by the simulator and the client.

The ISA95* structure classes (``ISA95JobOrderDataType`` …) do not exist in asyncua's ``ua``
module until a server imports the nodeset or a client loads the server's data type
definitions, so they are looked up by name at run time with :func:`ua_type`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from asyncua import ua

from mes.machines import JobState

JOBCONTROL_NS_URI = "http://opcfoundation.org/UA/ISA95-JOBCONTROL_V2/"
NODESET_FILE = "opc.ua.isa95-jobcontrol.nodeset2.xml"

# Numeric ids inside the job-control namespace (nodeset2.xml, ns=1 there).
RECEIVER_TYPE_ID = 1002  # ISA95JobOrderReceiverObjectType
RESPONSE_PROVIDER_TYPE_ID = 1003  # ISA95JobResponseProviderObjectType

# The machine-side layout is the one OPC 40001-3 (Machinery Job Management) gives a machine:
# <Machine>/JobManagement/{JobOrderControl, JobOrderResults}. Clients match these by name
# only, because their namespace differs between vendors (Machinery/Jobs or the vendor's own).
JOB_MANAGEMENT = "JobManagement"
JOB_ORDER_CONTROL = "JobOrderControl"
JOB_ORDER_RESULTS = "JobOrderResults"
JOB_ORDER_LIST = "JobOrderList"
JOB_ORDER_RESPONSE_LIST = "JobOrderResponseList"
MAX_DOWNLOADABLE_JOB_ORDERS = "MaxDownloadableJobOrders"

STATE_NAMES: dict[JobState, str] = {
    JobState.NOT_ALLOWED_TO_START: "NotAllowedToStart",
    JobState.ALLOWED_TO_START: "AllowedToStart",
    JobState.RUNNING: "Running",
    JobState.INTERRUPTED: "Interrupted",
    JobState.ENDED: "Ended",
    JobState.ABORTED: "Aborted",
}

# Substates (ISA95InterruptedStateMachineType, ISA95EndedStateMachineType) and the browse
# name of the substate machine a second ISA95StateDataType entry points at.
SUBSTATE_MACHINES: dict[JobState, str] = {
    JobState.INTERRUPTED: "InterruptedSubstates",
    JobState.ENDED: "EndedSubstates",
}
SUBSTATE_NUMBERS: dict[str, int] = {"Held": 1, "Suspended": 2, "Completed": 1, "Closed": 2}

# Job response data names the simulator reports per job (the PackML Admin counters are
# cumulative per machine, these belong to one job).
PROCESSED_COUNT = "ProcessedCount"
DEFECTIVE_COUNT = "DefectiveCount"

# PackML (OPC 30050) StateCurrent values the simulator uses.
PACKML_IDLE = 4
PACKML_EXECUTE = 6
PACKML_HELD = 11
PACKML_PRODUCE_MODE = 1


@contextlib.contextmanager
def nodeset_path() -> Iterator[Path]:
    """Yield a file-system path to the shipped OPC 10031-4 nodeset (package data)."""
    resource = resources.files(__package__) / "nodeset" / NODESET_FILE
    with resources.as_file(resource) as path:
        yield path


def string_node_id(ns: int, text: str) -> ua.NodeId:
    """A string NodeId (asyncua's annotations want its own int/str subclasses)."""
    return ua.NodeId(ua.String(text), ua.Int16(ns))


def numeric_node_id(ns: int, identifier: int) -> ua.NodeId:
    """A numeric NodeId."""
    return ua.NodeId(ua.Int32(identifier), ua.Int16(ns))


def ua_type(name: str) -> Any:
    """Return a structure class asyncua generated from the nodeset, by its OPC UA name."""
    try:
        return getattr(ua, name)
    except AttributeError:
        raise RuntimeError(
            f"asyncua has no class {name}: load the ISA-95 job control data types first"
        ) from None


def decimal_string(value: float) -> str:
    """Format a quantity as an OPC UA DecimalString (no exponent, no trailing zeros)."""
    text = format(Decimal(repr(float(value))).normalize(), "f")
    return "0" if text in ("-0", "") else text


def parse_decimal(value: Any) -> float:
    """Read a DecimalString (or a number, or nothing) as a float."""
    if value is None or value == "":
        return 0.0
    return float(value)


def eu_information(unit: str) -> Any:
    """An EUInformation carrying only a display name; None when there is no unit.

    UnitId -1 is the spec's "no UNECE code": the MES speaks in free-text units.
    """
    if not unit:
        return None
    return ua.EUInformation(UnitId=-1, DisplayName=ua.LocalizedText(unit))


def eu_text(eu: Any) -> str:
    """The display name of an EUInformation, or "" when absent."""
    if eu is None or eu.DisplayName is None:
        return ""
    return str(eu.DisplayName.Text or "")


def localized(text: str) -> Any:
    """An English LocalizedText."""
    return ua.LocalizedText(text, "en")


def empty_comment() -> ua.Variant:
    """The Comment argument every job-control method takes, left empty.

    asyncua cannot guess a Variant type for ``[]`` (it raises), so the array type is given.
    """
    return ua.Variant([], ua.VariantType.LocalizedText)
