"""Read-mostly routes: genealogy, master data, the audit trail and API tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from mes import audit, auth, genealogy, masterdata
from mes.api.deps import caller, services
from mes.api.security import (
    ADMINISTER,
    READ_AUDIT,
    READ_MASTER_DATA,
    READ_SHOP_FLOOR,
    allow,
    roles_note,
)
from mes.auth import Principal
from mes.errors import DomainError, FieldError
from mes.models import AuditEvent, Role

API = "/api/v1"


class GenealogyController(Controller):
    path = f"{API}/genealogy/lots"
    tags = ["genealogy"]

    @get(
        "/{lot:str}/backward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot came from (its components, recursively)",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def backward(
        self,
        lot: FromPath[str],
        state: State,
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await services(state).db(lambda s: genealogy.trace(s, lot, "backward", depth))

    @get(
        "/{lot:str}/forward",
        guards=[allow(READ_SHOP_FLOOR)],
        summary="Where a lot went (what was made from it, recursively)",
        description=roles_note(READ_SHOP_FLOOR),
    )
    async def forward(
        self,
        lot: FromPath[str],
        state: State,
        depth: Annotated[int, QueryParameter(ge=1, le=100)] = 10,
    ) -> genealogy.Trace:
        return await services(state).db(lambda s: genealogy.trace(s, lot, "forward", depth))


class MasterDataController(Controller):
    path = API
    tags = ["master data"]

    @get(
        "/products",
        guards=[allow(READ_MASTER_DATA)],
        summary="Products: material definitions that have a routing",
        description=roles_note(READ_MASTER_DATA),
    )
    async def products(self, state: State) -> list[dict[str, Any]]:
        return await services(state).db(masterdata.list_products)

    @post(
        "/master-data",
        status_code=200,
        guards=[allow(ADMINISTER)],
        summary="Load master data (JSON, the plant file's shape; partial: may refer to stored)",
        description=(
            "Upserts by ISA-95 id; all of it or nothing; a bad entry is named with its reason "
            "(422). " + roles_note(ADMINISTER)
        ),
    )
    async def load(
        self,
        data: JSONBody[dict[str, Any]],
        state: State,
        request: Request[Principal, Any, Any],
    ) -> dict[str, int]:
        actor = caller(request).actor
        try:
            plant = masterdata.parse_plant(data, partial=True)
        except masterdata.MasterDataError as e:
            raise _refused(e) from None

        def load(s: Session) -> masterdata.LoadReport:
            report = masterdata.load_plant(s, plant, partial=True, actor=actor)
            s.commit()
            return report

        try:
            report = await services(state).db(load)
        except masterdata.MasterDataError as e:
            raise _refused(e) from None
        return {
            "created": report.created,
            "updated": report.updated,
            "unchanged": report.unchanged,
            "deleted": report.deleted,
        }

    @get(
        "/equipment",
        guards=[allow(READ_MASTER_DATA)],
        summary="The equipment hierarchy, with each work unit's endpoint",
        description=roles_note(READ_MASTER_DATA),
    )
    async def equipment(self, state: State) -> list[dict[str, Any]]:
        return await services(state).db(masterdata.equipment_tree)


def _refused(e: masterdata.MasterDataError) -> DomainError:
    return DomainError(
        title="Master data refused",
        detail="; ".join(e.problems),
        status=422,
        errors=[FieldError(p.split(":", 1)[0], p.split(":", 1)[-1].strip()) for p in e.problems],
    )


class AuditEventOut(BaseModel):
    seq: int
    occurred_at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    limit: int
    offset: int


class ChainReportOut(BaseModel):
    """The audit chain recomputed: intact, or the first broken link."""

    intact: bool
    events: int
    first_broken_seq: int | None
    reason: str | None
    checked_at: datetime | None


def _audit_page(
    s: Session,
    object_type: str | None,
    object_id: str | None,
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> list[AuditEventOut]:
    q = select(AuditEvent)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if actor:
        q = q.where(AuditEvent.actor.startswith(actor))
    if since:
        q = q.where(AuditEvent.occurred_at >= since)
    if until:
        q = q.where(AuditEvent.occurred_at < until)
    rows = s.scalars(q.order_by(AuditEvent.seq).limit(limit).offset(offset))
    return [AuditEventOut.model_validate(r, from_attributes=True) for r in rows]


class AuditController(Controller):
    path = f"{API}/audit-events"
    tags = ["audit"]

    @get(
        "/",
        guards=[allow(READ_AUDIT)],
        summary="Audit events, in chain order",
        description="Filter by object, actor (name prefix) and time. " + roles_note(READ_AUDIT),
    )
    async def list_events(
        self,
        state: State,
        object_type: Annotated[str | None, QueryParameter()] = None,
        object_id: Annotated[str | None, QueryParameter()] = None,
        actor: Annotated[str | None, QueryParameter()] = None,
        since: Annotated[datetime | None, QueryParameter()] = None,
        until: Annotated[datetime | None, QueryParameter()] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0)] = 0,
    ) -> AuditPage:
        items = await services(state).db(
            lambda s: _audit_page(s, object_type, object_id, actor, since, until, limit, offset)
        )
        return AuditPage(items=items, limit=limit, offset=offset)

    @get(
        "/verify",
        guards=[allow(READ_AUDIT)],
        summary="Recompute the hash chain; report the first broken link",
        description=roles_note(READ_AUDIT),
    )
    async def verify(self, state: State) -> ChainReportOut:
        report = await services(state).db(audit.verify)
        return ChainReportOut.model_validate(report, from_attributes=True)


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@\-]+$")]
    role: Role


class TokenOut(BaseModel):
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class NewToken(TokenOut):
    token: str = Field(description="The bearer token; shown this once, stored only as a hash")


class TokenController(Controller):
    path = f"{API}/tokens"
    tags = ["tokens"]

    @get(
        "/",
        guards=[allow(ADMINISTER)],
        summary="API tokens (names and roles; secrets are never stored)",
        description=roles_note(ADMINISTER),
    )
    async def list_tokens(self, state: State) -> list[TokenOut]:
        found = await services(state).db(auth.list_tokens)
        return [TokenOut.model_validate(t, from_attributes=True) for t in found]

    @post(
        "/",
        guards=[allow(ADMINISTER)],
        summary="Create a token with one role",
        description=roles_note(ADMINISTER),
    )
    async def create(
        self, data: JSONBody[TokenIn], state: State, request: Request[Principal, Any, Any]
    ) -> Response[NewToken]:
        actor = caller(request).actor
        svc = services(state)
        token = await svc.db(lambda s: auth.create_token(s, data.name, data.role, actor))
        info = next(t for t in await svc.db(auth.list_tokens) if t.name == data.name)
        out = NewToken(
            **TokenOut.model_validate(info, from_attributes=True).model_dump(), token=token
        )
        return Response(out, status_code=201)

    @delete(
        "/{name:str}",
        status_code=200,
        guards=[allow(ADMINISTER)],
        summary="Revoke a token",
        description=roles_note(ADMINISTER),
    )
    async def revoke(
        self, name: FromPath[str], state: State, request: Request[Principal, Any, Any]
    ) -> TokenOut:
        actor = caller(request).actor
        info = await services(state).db(lambda s: auth.revoke_token(s, name, actor))
        return TokenOut.model_validate(info, from_attributes=True)
