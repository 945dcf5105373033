"""Bearer-token authentication and role guards.

Every route but ``/health`` and the API docs needs a token: none, unknown or revoked → 401;
a role the route does not admit → 403; both as problem+json. The role sets below are the
access matrix; each route names one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)

from mes.auth import Principal, authenticate
from mes.db import Database
from mes.models import Role

ERP, SUPERVISOR, AUDITOR, ADMIN = Role.ERP, Role.SUPERVISOR, Role.AUDITOR, Role.ADMIN

#: Who may do what (the access matrix).
POST_ORDERS = frozenset({ERP})
READ_ORDERS = frozenset({ERP, SUPERVISOR, AUDITOR})
STEER = frozenset({SUPERVISOR})
READ_SHOP_FLOOR = frozenset({SUPERVISOR, AUDITOR})
READ_MASTER_DATA = frozenset({ERP, SUPERVISOR, AUDITOR, ADMIN})
READ_AUDIT = frozenset({SUPERVISOR, AUDITOR})
ADMINISTER = frozenset({ADMIN})
B2MML_IN = frozenset({ERP})

PUBLIC_PATHS = ["^/health$", "^/schema"]

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]


class TokenAuthentication(AbstractAuthenticationMiddleware):
    """Resolve ``Authorization: Bearer <token>`` to a ``Principal`` (``request.user``)."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException(
                "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        db: Database = connection.app.state.db
        principal = await db.run(partial(authenticate, token=token.strip()))
        if principal is None:
            raise NotAuthorizedException(
                "unknown or revoked token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return AuthenticationResult(user=principal, auth=token)


AUTH_MIDDLEWARE = DefineMiddleware(TokenAuthentication, exclude=PUBLIC_PATHS)


def allow(roles: frozenset[Role]) -> Guard:
    """A guard admitting only the given roles."""
    names = ", ".join(sorted(roles))

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal: Principal = connection.user
        if principal.role not in roles:
            raise PermissionDeniedException(
                f"role {principal.role} may not do this; it needs one of: {names}"
            )

    return guard


def roles_note(roles: frozenset[Role]) -> str:
    """The line the OpenAPI description of a route carries about who may call it."""
    return f"Roles: {', '.join(sorted(roles))}."
