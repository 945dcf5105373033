"""API token routes (/api/v1/tokens): list, create and revoke tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from mes import auth
from mes.api.params import Key
from mes.api.security import ADMINISTER, allow, roles_note
from mes.auth import Principal
from mes.db import Database
from mes.models import Role

API = "/api/v1"


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@\-]+$")]
    role: Role
    expires_at: Annotated[
        AwareDatetime | None,
        Field(description="When the token stops working (a time to come); none: until revoked"),
    ] = None


class TokenOut(BaseModel):
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    expired: bool = Field(description="Past its expiry: refused (401) as a revoked token is")


class NewToken(TokenOut):
    token: str = Field(description="The bearer token; shown this once, stored only as a hash")


class TokenController(Controller):
    path = f"{API}/tokens"
    tags = ["tokens"]

    @get(
        "/",
        guards=[allow(ADMINISTER)],
        summary="API tokens: name, role, created, expiry, revoked (secrets are never stored)",
        description=roles_note(ADMINISTER),
    )
    async def list_tokens(self, db: NamedDependency[Database]) -> list[TokenOut]:
        found = await db.run(auth.list_tokens)
        return [TokenOut.model_validate(t, from_attributes=True) for t in found]

    @post(
        "/",
        guards=[allow(ADMINISTER)],
        summary="Create a token with one role and, optionally, an expiry",
        description=roles_note(ADMINISTER),
    )
    async def create(
        self,
        data: JSONBody[TokenIn],
        db: NamedDependency[Database],
        caller: NamedDependency[Principal],
    ) -> Response[NewToken]:
        actor = caller.actor
        token = await db.run(
            lambda s: auth.create_token(s, data.name, data.role, actor, data.expires_at)
        )
        info = next(t for t in await db.run(auth.list_tokens) if t.name == data.name)
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
        self, name: Key, db: NamedDependency[Database], caller: NamedDependency[Principal]
    ) -> TokenOut:
        actor = caller.actor
        info = await db.run(lambda s: auth.revoke_token(s, name, actor))
        return TokenOut.model_validate(info, from_attributes=True)
