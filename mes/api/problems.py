"""Every error the API answers is RFC 9457 ``application/problem+json``.

Validation errors list each offending field and the reason; domain errors carry their own
status; anything unexpected is logged and answered as a bare 500 problem without details.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from mes.errors import DomainError, FieldError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


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


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error", "the request failed; see logs")


EXCEPTION_HANDLERS: Any = {
    HTTPException: on_http_exception,
    DomainError: on_domain_error,
    OperationalError: on_database_busy,
    IntegrityError: on_integrity_error,
    SATimeoutError: on_database_busy,
    Exception: on_unexpected,
}

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "MediaType", "problem"]
