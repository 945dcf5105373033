"""Every error the API answers is RFC 9457 ``application/problem+json``.

Validation errors list each offending field and the reason; domain errors carry their own
status; anything unexpected is logged and answered as a bare 500 problem without details.

The OpenAPI document lists, for every operation, each problem it can answer
(:func:`document_problems`), derived here in one place from what the route has: a role
guard (401, 403), path parameters (400, 404), query parameters (400), a body (400, 413,
422), a write (409), and for all of them the database or Temporal away (503). A route that
answers one of these differently (B2MML answers its refusals in XML) says so in its own
``responses=``, which wins.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Litestar, MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Reference, Schema
from litestar.routes import HTTPRoute
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from mes.errors import DomainError, FieldError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


class FieldProblem(BaseModel):
    """One refused input: where (a parameter, or a path into the body) and why."""

    field: str
    reason: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    type: str = Field(description="Always about:blank: the status and title say it all")
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = Field(
        default=None, description="For refused input: each offending field and the reason"
    )


def problem(
    status: int,
    title: str,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [{"field": e.field, "reason": e.reason} for e in errors]
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _validation_errors(exc: ValidationException) -> list[FieldError]:
    out: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            key = str(item.get("key") or item.get("source") or "body")
            out.append(FieldError(key, str(item.get("message", "invalid"))))
    return out


def on_http_exception(_request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ValidationException):
        errors = _validation_errors(exc)
        detail = "; ".join(f"{e.field}: {e.reason}" for e in errors) or exc.detail
        return problem(exc.status_code, "Invalid request", detail, errors)
    title = exc.detail if exc.detail else "Error"
    return problem(exc.status_code, title, exc.detail, headers=dict(exc.headers or {}))


def on_domain_error(_request: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    return problem(exc.status, exc.title, exc.detail, exc.errors)


def on_database_busy(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # Lost connections, pool exhaustion, deadlock victims: the request changed nothing (its
    # transaction rolled back) and the same request again may well succeed.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem(
        503,
        "Database unavailable",
        "the database could not serve the request; nothing was changed, retry it",
        headers={"Retry-After": "1"},
    )


def on_integrity_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # A unique key taken by a concurrent request between our read and our write: the
    # transaction rolled back; the same request again sees the other one's result.
    log.warning("concurrent change on %s %s: %s", request.method, request.url.path, exc)
    return problem(409, "Concurrent change", "another request changed the same data; retry")


def on_data_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # A value the database refuses (out of a column's range, NUL in text) that no parameter
    # type caught: the request's input, not the server, is at fault; nothing was changed.
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return problem(
        400, "Invalid request", "a value in the request is beyond what the database can hold"
    )


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error", "the request failed; see logs")


EXCEPTION_HANDLERS: Any = {
    HTTPException: on_http_exception,
    DomainError: on_domain_error,
    OperationalError: on_database_busy,
    IntegrityError: on_integrity_error,
    DataError: on_data_error,
    SATimeoutError: on_database_busy,
    Exception: on_unexpected,
}

# --- the OpenAPI side ---------------------------------------------------------------------------

#: What each status means, as the document says it.
MEANINGS = {
    400: "Invalid request: a parameter or the body is malformed or out of bounds (`errors` "
    "names each field and why)",
    401: "No token, or an unknown, revoked or expired one",
    403: "The token's role may not do this",
    404: "What the path (or a filter) names does not exist",
    409: "A conflict with the current state (or a concurrent change): nothing was changed",
    413: "The body is larger than the server takes (MES_MAX_BODY_BYTES)",
    422: "Well-formed but refused: it names something impossible (`errors` says what)",
    503: "The database or Temporal is unavailable: nothing was changed, retry (Retry-After)",
}
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}
#: Handler parameters Litestar fills from the connection itself, not from the client's input.
_RESERVED = {"request", "state", "scope", "headers", "cookies", "query", "body", "data"}


def problem_statuses(handler: HTTPRouteHandler, public: bool) -> set[int]:
    """The problem statuses a route can answer, from what it has (see the module's doc)."""
    statuses = {503}
    if not public:
        statuses.add(401)
    if handler.resolve_guards():
        statuses.add(403)
    if any("{" in path for path in handler.paths):
        statuses |= {400, 404}
    dependencies = handler.resolve_dependencies()
    params = handler.parsed_fn_signature.parameters
    if any(n not in dependencies and n not in _RESERVED for n in params):
        statuses.add(400)
    if "data" in params:
        statuses |= {400, 413, 422}
    elif params.keys() & {"request", "body"}:
        statuses.add(413)  # it reads the body itself
    if handler.http_methods & _WRITES:
        statuses.add(409)
    return statuses


def problem_response(status: int) -> ResponseSpec:
    """The OpenAPI response of a problem with ``status``."""
    return ResponseSpec(
        data_container=Problem,
        media_type=PROBLEM_JSON,
        description=MEANINGS[status],
        generate_examples=False,
    )


def document_problems(app: Litestar, public_paths: list[str]) -> None:
    """Give every operation of ``app``'s OpenAPI document the problems it can answer and mark
    the routes under ``public_paths`` (regular expressions) public (``security: []``).

    A route's own ``responses=`` come on top; where one names a status the app also answers
    (a problem, or the route's success in its own media type), the document lists both
    content types.
    """
    plans = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        public = any(re.search(p, route.path) for p in public_paths)
        for handler in route.route_handlers:
            own = dict(handler.responses or {})
            derived = problem_statuses(handler, public)
            handler.responses = {**{s: problem_response(s) for s in sorted(derived)}, **own}
            plans.append((route.path_format, handler, public, derived, set(own)))

    document = app.openapi_schema  # built now, with the responses above
    problem_ref = OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))
    for path, handler, public, derived, declared in plans:
        item = (document.paths or {}).get(path)
        for method in handler.http_methods:
            operation = getattr(item, method.lower(), None)
            if operation is None:
                continue  # not in the document (the docs' own routes)
            if public:
                operation.security = []
            for status in declared:
                content = operation.responses[str(status)].content
                if content is None:
                    continue
                if status in derived:
                    content.setdefault(PROBLEM_JSON, problem_ref)
                if status == handler.status_code:
                    content.setdefault(
                        str(handler.media_type),
                        OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
                    )


__all__ = [
    "EXCEPTION_HANDLERS",
    "PROBLEM_JSON",
    "MediaType",
    "Problem",
    "document_problems",
    "problem",
    "problem_response",
]
