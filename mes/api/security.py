"""Bearer-token authentication and role guards.

Every route but ``/health`` and the API docs needs a token, in the ``Authorization``
header alone: none, unknown, revoked or expired → 401; a token in the query string
(``?token=``, ``?access_token=``) → 400, as query strings end up in logs; a role the route does
not admit → 403; all as problem+json. The role sets below are the access matrix; each route
names one of them. Within a route an ERP token reaches its own orders alone
(``Principal.order_scope``).
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

from mes.auth import Principal, authenticate, recently_authenticated
from mes.db import Database
from mes.errors import DomainError, FieldError
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
#: Materials, their classes and stock lots by B2MML ``Sync…``. Master data that drives
#: machines (equipment and endpoints, process segments, routings, work masters) is
#: ``ADMINISTER``'s alone, by JSON or B2MML alike.
SYNC_MATERIALS = frozenset({ERP, ADMIN})
#: The B2MML route; each message is then checked by what it carries (``mes.api.erp``).
B2MML_IN = POST_ORDERS | SYNC_MATERIALS | ADMINISTER

#: Query parameters that would carry a token: refused, never read.
TOKEN_QUERY_PARAMETERS = ("token", "access_token")

PUBLIC_PATHS = ["^/health$", "^/schema"]

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]


class TokenAuthentication(AbstractAuthenticationMiddleware):
    """Resolve ``Authorization: Bearer <token>`` to a ``Principal`` (``request.user``)."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        for param in TOKEN_QUERY_PARAMETERS:
            if param in connection.query_params:
                reason = "a token is accepted in the Authorization header alone, never in the URL"
                raise DomainError(
                    title="Token in the query string",
                    detail=f"{param}: {reason} (a proxy may have logged this one: revoke it)",
                    status=400,
                    errors=[FieldError(param, reason)],
                )
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException(
                "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        token = token.strip()
        principal = recently_authenticated(token)
        if principal is None:
            db: Database = connection.app.state.db
            principal = await db.run(partial(authenticate, token=token))
        if principal is None:
            raise NotAuthorizedException(
                "unknown, revoked or expired token",
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
