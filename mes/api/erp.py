"""The ERP's B2MML route, ERP client settings and the performance report.

``POST /api/v1/b2mml`` takes B2MML V0701 (hardened parsing, XSD validation) and ends in the
same services as the JSON routes; every answer is B2MML: AcknowledgeOperationsSchedule,
RespondOperationsSchedule, or ConfirmBOD (with the errors when refused). A BODID seen before
gets the answer it got then, and nothing is done twice.

Who may send what: orders (the ``…OperationsSchedule`` messages) come from an ERP token;
materials, their classes and stock lots from an ERP or admin token; master data that drives
machines (equipment and endpoints, process segments, routings, work masters) from an admin
token alone, as on ``/master-data``; anything else is a 403 ``ConfirmBOD`` and changes
nothing. An ERP token reaches its own orders alone (another's is unknown to it) and its own
BODIDs: a BODID another client used is refused (409), not answered with the other's answer.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, get, post, put
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody, QueryParameter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mes import b2mml, masterdata, production_orders, reporting
from mes.api.params import Id, Key
from mes.api.security import (
    ADMINISTER,
    B2MML_IN,
    POST_ORDERS,
    READ_ORDERS,
    SYNC_MATERIALS,
    allow,
    roles_note,
)
from mes.auth import Principal
from mes.callbacks import CallbackPolicy
from mes.db import Database
from mes.errors import DomainError
from mes.models import B2mmlMessage, MaterialDefinition, OperationsRequest, Role
from mes.steering import Steering
from mes.workflow_client import WorkflowClient

log = logging.getLogger(__name__)
API = "/api/v1"
XML = "application/xml"
SENDER = reporting.SENDER
ErpOrderIn = production_orders.ErpProductionOrderIn
#: The B2MML route's refusals, each a ConfirmBOD or Acknowledge listing the errors.
B2MML_REFUSALS = {
    400: "Not B2MML V0701 this route takes (malformed, invalid against the XSD, unknown noun)",
    409: "A change or cancel refused by an order's state",
    422: "Orders or master data refused (unknown product, impossible routing, bad entries)",
    503: "Temporal unavailable: the orders are stored and start when it answers",
}

#: Plant sections an ERP may sync: materials, their classes and stock lots. Every other
#: section (equipment with its endpoints, process segments, routings, work masters) tells
#: machines what to do and where, and is the admin's alone.
MATERIAL_SECTIONS = frozenset({"material_classes", "materials", "lots"})


def _noun(message: b2mml.Message) -> str:
    if isinstance(message, b2mml.SyncMasterData):
        return f"Sync{message.noun}"
    return type(message).__name__


def _senders(message: b2mml.Message) -> frozenset[Role]:
    """The roles that may send this message, judged by what it would change."""
    if not isinstance(message, b2mml.SyncMasterData):
        return POST_ORDERS
    return SYNC_MATERIALS if set(message.plant) <= MATERIAL_SECTIONS else ADMINISTER


def _xml(body: bytes, status: int) -> Response[bytes]:
    return Response(body, status_code=status, media_type=XML)


def _refuse(
    original: str | None,
    noun: str,
    errors: list[str],
    status: int,
    sender: str | None = None,
    created: datetime | None = None,
) -> Response[bytes]:
    """A ``ConfirmBOD`` echoing the message answered (BODID, sender, creation time)."""
    return _xml(
        b2mml.confirm_bod(
            original, noun, errors, SENDER, original_sender=sender, original_created=created
        ),
        status,
    )


def _confirm(message: b2mml.Message, noun: str, errors: list[str], status: int) -> Response[bytes]:
    return _refuse(message.bod_id, noun, errors, status, message.sender, message.created)


class B2mmlController(Controller):
    path = f"{API}/b2mml"
    tags = ["B2MML"]

    @post(
        "/",
        guards=[allow(B2MML_IN)],
        status_code=200,
        summary="Receive a B2MML V0701 message from the ERP",
        description=(
            "ProcessOperationsSchedule (new production orders), ChangeOperationsSchedule "
            "(quantity, due or priority of an order not started), CancelOperationsSchedule, "
            "SyncOperationsSchedule (each request new: processed; known: changed), "
            "Sync{MaterialClass,MaterialDefinition,Equipment,ProcessSegment,"
            "OperationsDefinition,WorkMaster} (master data) and SyncMaterialLot / "
            "SyncMaterialInformation (stock lots, in the material's unit). Answers "
            "AcknowledgeOperationsSchedule, RespondOperationsSchedule or ConfirmBOD, each "
            "echoing the message answered (OriginalApplicationArea: sender, creation time, "
            "BODID); refused messages get a ConfirmBOD or Acknowledge listing the errors (4xx) "
            "and change nothing. Idempotent on BODID and on each OperationsRequest ID. "
            "Orders: erp (each ERP token reaches its own orders alone). Materials, material "
            "classes and lots: erp, admin. Equipment, ProcessSegment, OperationsDefinition and "
            "WorkMaster (they drive machines): admin; another role gets a 403 ConfirmBOD. "
            + roles_note(B2MML_IN)
        ),
        request_body_media_type=XML,
        media_type=XML,
        responses={
            status: ResponseSpec(str, media_type=XML, description=meaning, generate_examples=False)
            for status, meaning in B2MML_REFUSALS.items()
        },
    )
    async def receive(
        self,
        request: Request[Principal, Any, Any],
        db: NamedDependency[Database],
        workflows: NamedDependency[WorkflowClient],
        steering: NamedDependency[Steering],
        caller: NamedDependency[Principal],
    ) -> Response[bytes]:
        body = await request.body()
        try:
            message = b2mml.decode(body)
        except b2mml.B2MMLError as e:
            return _refuse(e.bod_id, "B2MML", list(e.reasons), 400, e.sender, e.created)

        noun = _noun(message)
        senders = _senders(message)
        if caller.role not in senders:
            needs = ", ".join(sorted(senders))
            refusal = f"role {caller.role} may not send {noun}; it needs one of: {needs}"
            return _confirm(message, noun, [refusal], 403)

        bod_id = message.bod_id or f"anonymous-{uuid.uuid4()}"
        # Remembered per client: another ERP's BODID (and its answer) is not this one's.
        seen = await db.run(
            lambda s: s.scalar(
                select(B2mmlMessage).where(
                    B2mmlMessage.client == caller.name, B2mmlMessage.bod_id == bod_id
                )
            )
        )
        if seen is not None:
            return _xml(seen.response.encode(), seen.status)

        who = caller
        if isinstance(message, b2mml.ProcessOperationsSchedule):
            response = await _process(db, message, who)
        elif isinstance(message, b2mml.ChangeOperationsSchedule):
            response = await _change(db, workflows, message, who)
        elif isinstance(message, b2mml.CancelOperationsSchedule):
            response = await _cancel(steering, message, who)
        elif isinstance(message, b2mml.SyncOperationsSchedule):
            response = await _sync_schedule(db, workflows, message, who)
        else:
            response = await _sync(db, message, who)

        if (response.status_code or 200) >= 500:
            return response  # not an answer to keep: the same BODID again is tried afresh

        def remember(s: Session) -> None:
            s.add(
                B2mmlMessage(
                    client=caller.name,
                    bod_id=bod_id,
                    noun=type(message).__name__,
                    sender=message.sender or who.name,
                    status=response.status_code,
                    response=bytes(response.content).decode(),
                )
            )
            try:
                s.commit()
            except IntegrityError:
                s.rollback()  # the same BODID handled concurrently: its first answer stands

        await db.run(remember)
        return response


async def _process(
    db: Database,
    message: b2mml.ProcessOperationsSchedule,
    who: Principal,
) -> Response[bytes]:
    """All or nothing: every request is decoded with its product's unit and checked (order,
    routing, segment requirements, chosen lots and equipment) before any is stored. A refusal
    is an ``AcknowledgeOperationsSchedule`` rejecting every request, with the reasons."""
    accepted = await _accept(db, message, who, message)
    if isinstance(accepted, Response):
        return accepted
    if message.acknowledge_code is None and message.confirmation_code == "Always":
        return _confirm(message, "ProcessOperationsSchedule", [], 200)  # a ConfirmBOD "Accepted"
    return _xml(b2mml.acknowledge_operations_schedule(message, accepted, SENDER), 200)


async def _accept(
    db: Database,
    message: b2mml.ProcessOperationsSchedule,
    who: Principal,
    answered: b2mml.ProcessOperationsSchedule,
) -> list[tuple[str, str]] | Response[bytes]:
    """Check and store the new orders of ``message``: (order number, state) of each, or the
    refusal to send, which rejects every request of ``answered`` (the message as a whole)."""
    noun = "ProcessOperationsSchedule"

    def check(
        s: Session,
    ) -> tuple[list[production_orders.ErpProductionOrderIn], dict[str, list[str]]]:
        bodies = []
        problems: dict[str, list[str]] = {}
        for request in message.requests:
            number = request.order_number
            product = s.execute(
                select(MaterialDefinition.unit, MaterialDefinition.unit_conversions).where(
                    MaterialDefinition.external_id == request.product
                )
            ).one_or_none()
            unit = None if product is None else str(product.unit)
            own = {} if product is None else dict(product.unit_conversions or {})
            try:
                body = request.to_order_in(unit, {u: Decimal(str(size)) for u, size in own.items()})
            except b2mml.B2MMLError as e:
                problems.setdefault(number, []).extend(e.reasons)
                continue
            bodies.append(body)
            where = f"OperationsRequest {number}"
            try:
                production_orders.check_order(s, body, who.name)
                routing = production_orders.routing_of(s, body.product)
                if request.routing and request.routing != routing:
                    problems.setdefault(number, []).append(
                        f"{where}: OperationsDefinitionID {request.routing} is not the routing "
                        f"of {body.product} ({routing})"
                    )
                problems.setdefault(number, []).extend(
                    f"{where}.{p}" for p in production_orders.check_segments(s, body)
                )
            except DomainError as e:
                problems.setdefault(number, []).append(f"{where}: {e.detail}")
        return bodies, {n: p for n, p in problems.items() if p}

    bodies, problems = await db.run(check)
    if problems:
        everything = [p for ps in problems.values() for p in ps]
        rejected = [
            (
                r.order_number,
                "; ".join(problems[r.order_number])
                if r.order_number in problems
                else "not taken: the schedule is refused as a whole (" + everything[0] + ")",
            )
            for r in answered.requests
        ]
        return _xml(
            b2mml.acknowledge_operations_schedule(answered, [], SENDER, rejected=rejected), 422
        )

    accepted = []
    for body in bodies:
        try:
            out, _ = await production_orders.accept_order(db, body, who.actor, who.name)
        except DomainError as e:
            return _confirm(message, noun, [e.detail], e.status)
        accepted.append((out.order_number, out.state))
    return accepted


def _order_unit(s: Session, number: str, source: str | None) -> str | None:
    return s.scalar(
        select(OperationsRequest.unit).where(
            OperationsRequest.external_id == number, OperationsRequest.source == source
        )
    )


async def _change(
    db: Database,
    workflows: WorkflowClient,
    message: b2mml.ChangeOperationsSchedule,
    who: Principal,
) -> Response[bytes]:
    results = await _changes(db, workflows, message, who)
    status = 200 if all(ok for _, ok, _ in results) else 409
    return _xml(b2mml.respond_operations_schedule(message, results, SENDER), status)


async def _changes(
    db: Database,
    workflows: WorkflowClient,
    message: b2mml.ChangeOperationsSchedule,
    who: Principal,
) -> list[tuple[str, bool, str | None]]:
    """Change each order: (order number, accepted, reason when refused)."""
    results: list[tuple[str, bool, str | None]] = []
    for req in message.requests:
        quantity = req.quantity
        if req.quantities:
            # The amount by meaning, in the order's unit (a rate is never taken).
            unit = await db.run(partial(_order_unit, number=req.order_number, source=who.name))
            try:
                amount, _ = b2mml.choose_amount(
                    req.quantities, unit, f"OperationsRequest {req.order_number}"
                )
            except b2mml.B2MMLError as e:
                results.append((req.order_number, False, "; ".join(e.reasons)))
                continue
            quantity = amount
        accepted, reason = await db.run(
            partial(
                production_orders.change_order,
                order_number=req.order_number,
                actor=who.actor,
                quantity=quantity,
                due=req.due,
                priority=req.priority,
                source=who.name,
            )
        )
        if accepted:
            await workflows.order_changed(req.order_number)
        results.append((req.order_number, accepted, reason))
    return results


async def _sync_schedule(
    db: Database,
    workflows: WorkflowClient,
    message: b2mml.SyncOperationsSchedule,
    who: Principal,
) -> Response[bytes]:
    """Process or change, per request: one the MES does not hold is a new order (as in a
    Process, all new ones or none), one it holds is changed (as in a Change). Only new
    ones: answered as a Process; only known ones: as a Change; both: one
    ``AcknowledgeOperationsSchedule`` over every request (a changed order Accepted with
    its state, or Rejected with the reason). New orders refused: nothing is changed."""
    numbers = [r.order_number for r in message.requests]

    def held(s: Session) -> dict[str, str]:
        """This client's orders among ``numbers`` (another's number is new to it, and its
        Process then refuses it as taken)."""
        rows = s.execute(
            select(OperationsRequest.external_id, OperationsRequest.state).where(
                OperationsRequest.external_id.in_(numbers), OperationsRequest.source == who.name
            )
        )
        return {str(number): str(state) for number, state in rows}

    known = await db.run(held)
    new = set(numbers) - set(known)
    if not known:
        return await _process(db, message.as_process(new), who)
    if not new:
        return await _change(db, workflows, message.as_change(set(known)), who)
    everything = message.as_process(set(numbers))
    accepted = await _accept(db, message.as_process(new), who, everything)
    if isinstance(accepted, Response):
        return accepted
    results = await _changes(db, workflows, message.as_change(set(known)), who)
    states = await db.run(held)
    accepted += [(number, states[number]) for number, ok, _ in results if ok]
    rejected = [(number, reason or "change refused") for number, ok, reason in results if not ok]
    answer = b2mml.acknowledge_operations_schedule(everything, accepted, SENDER, rejected=rejected)
    return _xml(answer, 409 if rejected else 200)


async def _cancel(
    steering: Steering, message: b2mml.CancelOperationsSchedule, who: Principal
) -> Response[bytes]:
    errors = []
    for number in message.order_ids:
        try:
            await steering.cancel_order_by_number(number, who.actor, "ERP cancel", who.name)
        except DomainError as e:
            errors.append(f"OperationsRequest {number}: {e.detail}")
    return _confirm(message, "CancelOperationsSchedule", errors, 409 if errors else 200)


async def _sync(db: Database, message: b2mml.SyncMasterData, who: Principal) -> Response[bytes]:
    noun = f"Sync{message.noun}"
    try:
        plant = masterdata.parse_plant(message.plant, partial=True)

        def load(s: Session) -> masterdata.LoadReport:
            report = masterdata.load_plant(s, plant, partial=True, actor=who.actor)
            s.commit()
            return report

        report = await db.run(load)
    except masterdata.MasterDataError as e:
        return _confirm(message, noun, list(e.problems), 422)
    log.info("%s from %s: %s", noun, who.name, report)
    return _confirm(message, noun, [], 200)


class ErpClientController(Controller):
    path = f"{API}/erp-clients"
    tags = ["B2MML"]

    @put(
        "/{name:str}",
        guards=[allow(ADMINISTER)],
        summary="Set where an ERP client (by its token's name) gets its callbacks, and how",
        description=(
            "The callback URL must be https (plain http only to loopback) and may not point "
            "at link-local, cloud metadata, unspecified or (unless MES_CALLBACK_ALLOW lists "
            "them) loopback and private addresses: 422 naming callback_url. A new client's "
            "answer holds its signing_secret, shown this once: every callback carries "
            "X-MES-Timestamp and X-MES-Signature (sha256=HMAC-SHA256 of "
            '"{timestamp}.{body}" with it). ' + roles_note(ADMINISTER)
        ),
    )
    async def set_client(
        self,
        name: Key,
        data: JSONBody[reporting.ErpClientIn],
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
        callback_policy: NamedDependency[CallbackPolicy],
    ) -> reporting.ErpClientOut:
        return await db.run(
            partial(
                reporting.set_erp_client,
                name=name,
                body=data,
                policy=callback_policy,
                actor=caller.actor,
            )
        )

    @post(
        "/{name:str}/signing-secret",
        guards=[allow(ADMINISTER)],
        status_code=200,
        summary="Rotate an ERP client's callback signing secret; the answer shows the new one",
        description=(
            "Callbacks sent from now on are signed with the new secret (shown this once). "
            + roles_note(ADMINISTER)
        ),
    )
    async def rotate_secret(
        self,
        name: Key,
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
    ) -> reporting.ErpClientOut:
        return await db.run(partial(reporting.rotate_secret, name=name, actor=caller.actor))

    @get(
        "/{name:str}",
        guards=[allow(ADMINISTER)],
        summary="An ERP client's callback settings",
        description=roles_note(ADMINISTER),
    )
    async def get_client(self, name: Key, db: NamedDependency[Database]) -> reporting.ErpClientOut:
        return await db.run(partial(reporting.get_erp_client, name=name))


class PerformanceController(Controller):
    path = f"{API}/production-orders"
    tags = ["production orders"]

    @get(
        "/{order_id:int}/performance",
        guards=[allow(READ_ORDERS)],
        summary="The order's performance: B2MML SyncOperationsPerformance or its JSON",
        description="The document the ERP gets with every state change. An ERP token reads "
        "those of the orders it sent (another's: 404). " + roles_note(READ_ORDERS),
        media_type=XML,
        responses={
            200: ResponseSpec(
                dict[str, Any],
                media_type="application/json",
                description="The performance (format=json), or B2MML (format=b2mml)",
                generate_examples=False,
            )
        },
    )
    async def performance(
        self,
        order_id: Id,
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
        format: Annotated[Literal["b2mml", "json"], QueryParameter()] = "json",
    ) -> Response[bytes]:
        def build(s: Session) -> tuple[str, str]:
            order = production_orders.get_order(s, order_id, caller.order_scope)
            doc = reporting.performance(s, order)
            return reporting.render(
                doc, format, f"MES-{order.external_id}-now-{uuid.uuid4().hex[:8]}"
            )

        content_type, body = await db.run(build)
        if content_type != XML:
            body = json.dumps(json.loads(body)["operations_performance"], indent=2)
        return Response(body.encode(), media_type=content_type)
