"""B2MML V0701 (MESA's XML form of ISA-95) in and out of the MES.

The Business To Manufacturing Markup Language (B2MML) is used courtesy of MESA International.

In: ``decode(data)`` turns a hardened, XSD-validated message into a typed one:
``ProcessOperationsSchedule`` (new orders; ``OrderRequest.to_order_in()`` gives the JSON
route's ``ProductionOrderIn``), ``ChangeOperationsSchedule``, ``CancelOperationsSchedule``,
``SyncOperationsSchedule`` (orders to create or change) or ``SyncMasterData`` (plant
data, lots included, for ``mes.masterdata.load_plant(..., partial=True)``).
Anything refused is a ``B2MMLError`` with its reasons and, when readable, the ``BODID``.

Out: ``acknowledge_operations_schedule``, ``respond_operations_schedule``, ``confirm_bod``
and ``sync_operations_performance`` return bytes that validate against the XSDs.

Modules: ``parsing`` (hardening, schema, reading helpers), ``messages`` (orders in),
``sync`` (master data in), ``outbound`` (everything out). The schemas are in ``xsd/``.
"""

from mes.b2mml.messages import (
    CancelOperationsSchedule,
    ChangeOperationsSchedule,
    ConfirmationCode,
    Message,
    OrderChange,
    OrderRequest,
    ProcessOperationsSchedule,
    ScheduleRequest,
    SegmentRequest,
    SyncMasterData,
    SyncOperationsSchedule,
    choose_amount,
    decode,
)
from mes.b2mml.outbound import (
    MaterialActualData,
    OperationsPerformanceData,
    SegmentResponseData,
    acknowledge_operations_schedule,
    confirm_bod,
    respond_operations_schedule,
    sync_operations_performance,
)
from mes.b2mml.parsing import (
    DEFAULT_MAX_BYTES,
    NS,
    RELEASE_ID,
    B2MMLError,
    parse_xml,
    schema,
    validation_errors,
)
from mes.b2mml.sync import SYNC_NOUNS

__all__ = [
    "DEFAULT_MAX_BYTES",
    "NS",
    "RELEASE_ID",
    "SYNC_NOUNS",
    "B2MMLError",
    "CancelOperationsSchedule",
    "ChangeOperationsSchedule",
    "ConfirmationCode",
    "MaterialActualData",
    "Message",
    "OperationsPerformanceData",
    "OrderChange",
    "OrderRequest",
    "ProcessOperationsSchedule",
    "ScheduleRequest",
    "SegmentRequest",
    "SegmentResponseData",
    "SyncMasterData",
    "SyncOperationsSchedule",
    "acknowledge_operations_schedule",
    "choose_amount",
    "confirm_bod",
    "decode",
    "parse_xml",
    "respond_operations_schedule",
    "schema",
    "sync_operations_performance",
    "validation_errors",
]
