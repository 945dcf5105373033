"""Domain errors the API turns into ``application/problem+json`` answers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldError:
    """One rejected input field and why."""

    field: str
    reason: str


@dataclass
class DomainError(Exception):
    """A request the domain refuses; ``status`` is the HTTP status it maps to."""

    title: str
    detail: str
    status: int = 422
    errors: list[FieldError] = field(default_factory=list)

    def __str__(self) -> str:
        return self.detail


class NotFound(DomainError):
    def __init__(self, what: str, key: str) -> None:
        super().__init__(title=f"{what} not found", detail=f"no {what} {key!r}", status=404)


class Conflict(DomainError):
    def __init__(self, detail: str) -> None:
        super().__init__(title="Conflict", detail=detail, status=409)


def invalid(field_name: str, reason: str) -> DomainError:
    """A 422 for one field that is well-formed but names something impossible."""
    return DomainError(
        title="Unprocessable order",
        detail=f"{field_name}: {reason}",
        status=422,
        errors=[FieldError(field_name, reason)],
    )


def bad_parameter(name: str, reason: str) -> DomainError:
    """A 400 for a query parameter that cannot be used (alone or with the others)."""
    return DomainError(
        title="Bad parameter",
        detail=f"{name}: {reason}",
        status=400,
        errors=[FieldError(name, reason)],
    )
