"""Keyset pagination: the cursor a list answers for its next page, and the query it makes.

A list sorted by a total order (the last sort key is always a unique id) can continue after
its last row without counting the rows before it: ``WHERE (sort keys) > (the last row's)``,
which an index on the sort keys answers as fast for page 1,000 as for page 1 (``OFFSET``
reads and throws away every skipped row). The cursor (``after=``) is the last row's sort
keys and the name of the list and sort it belongs to, as base64url JSON: opaque to clients,
but checked on the way in. Text that is not base64url (or too long) is a 400; base64url that
is not a cursor of this list and sort is a 422 (well-formed, as far as the OpenAPI document
can tell, but naming no place in the list); both name ``after``, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, false, or_
from sqlalchemy.orm import QueryableAttribute, Session

from mes.errors import DomainError, FieldError

#: The longest cursor the API accepts (a list's keys are a time, a number and an id).
CURSOR_MAX = 400
#: What a cursor is made of (base64url without padding).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"

KeyValue = int | str | datetime


@dataclass(frozen=True)
class Paging:
    """One page of a list: at most ``limit`` rows, after the cursor ``after`` (if any), then
    skipping ``offset`` more."""

    limit: int = 100
    offset: int = 0
    after: str | None = None


#: The first page of a list, 100 rows.
FIRST_PAGE = Paging()


@dataclass(frozen=True)
class SortKey:
    """One column of a list's order, and whether it descends."""

    column: QueryableAttribute[Any]
    descending: bool = False


def encode_cursor(kind: str, values: Sequence[KeyValue]) -> str:
    """The cursor after a row whose sort keys are ``values`` in the list ``kind``."""
    plain = [kind, *(v.isoformat() if isinstance(v, datetime) else v for v in values)]
    raw = json.dumps(plain, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, kind: str, types: Sequence[type]) -> list[KeyValue]:
    """The sort keys a cursor of the list ``kind`` holds, of the given ``types``; a 400 naming
    ``after`` when it is not such a cursor."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        plain = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _unknown("not a cursor this API gave (use next_after)") from None
    if not isinstance(plain, list) or len(plain) != len(types) + 1:
        raise _unknown("not a cursor this API gave (use next_after)")
    if plain[0] != kind:
        raise _unknown("a cursor of another list or sort order")
    return [_value(v, t) for v, t in zip(plain[1:], types, strict=True)]


def _unknown(reason: str) -> DomainError:
    return DomainError(
        title="Unknown cursor",
        detail=f"after: {reason}",
        status=422,
        errors=[FieldError("after", reason)],
    )


def _value(value: object, wanted: type) -> KeyValue:
    if wanted is datetime and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment
    elif wanted is int and type(value) is int and -(2**63) <= value < 2**63:  # noqa: SIM114
        return value
    elif wanted is str and isinstance(value, str) and "\x00" not in value:
        return value
    raise _unknown("not a cursor this API gave (use next_after)")


def after(keys: Sequence[SortKey], values: Sequence[KeyValue]) -> ColumnElement[bool]:
    """The rows that come after ``values`` in the order ``keys``: ``k1 > v1 OR (k1 = v1 AND
    k2 > v2) OR ...`` (``<`` for a descending key), with the first key's bound alone in
    front so that an index on it is entered at the cursor."""
    alternatives: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for key, value in zip(keys, values, strict=True):
        beyond = key.column < value if key.descending else key.column > value
        alternatives.append(and_(*equal, beyond))
        equal.append(key.column == value)
    if not alternatives:
        return false()
    first, v = keys[0], values[0]
    bound = first.column <= v if first.descending else first.column >= v
    return and_(bound, or_(*alternatives))


def order(keys: Sequence[SortKey]) -> list[ColumnElement[Any]]:
    """The ``ORDER BY`` of ``keys``."""
    return [k.column.desc() if k.descending else k.column.asc() for k in keys]


T = TypeVar("T")


#: A select of any columns.
AnySelect = Select[*tuple[Any, ...]]
_S = TypeVar("_S", bound=AnySelect)


def page_query(
    query: _S, *, kind: str, keys: Sequence[SortKey], types: Sequence[type], paging: Paging
) -> _S:
    """``query`` in the order ``keys`` (the last one unique), after the cursor, skipping
    ``offset``: ``limit`` rows and one more, which tells whether a next page exists."""
    if paging.after is not None:
        query = query.where(after(keys, decode_cursor(paging.after, kind, types)))
    return query.order_by(*order(keys)).offset(paging.offset).limit(paging.limit + 1)


def cut(
    rows: Sequence[T], *, kind: str, paging: Paging, key_of: Callable[[T], Sequence[KeyValue]]
) -> tuple[list[T], str | None]:
    """The page in ``rows`` (of :func:`page_query`) and the cursor of the next (None on the
    last page: a full last page does not promise a next one)."""
    if len(rows) <= paging.limit:
        return list(rows), None
    page = list(rows[: paging.limit])
    return page, encode_cursor(kind, key_of(page[-1]))


def fetch_page(
    session: Session,
    query: Select[T],
    *,
    kind: str,
    keys: Sequence[SortKey],
    types: Sequence[type],
    paging: Paging,
    key_of: Callable[[T], Sequence[KeyValue]],
) -> tuple[list[T], str | None]:
    """One page of the objects ``query`` selects, and the cursor of the next page."""
    found: Sequence[T] = session.scalars(
        page_query(query, kind=kind, keys=keys, types=types, paging=paging)
    ).all()
    return cut(found, kind=kind, paging=paging, key_of=key_of)


__all__ = [
    "CURSOR_MAX",
    "CURSOR_PATTERN",
    "FIRST_PAGE",
    "AnySelect",
    "KeyValue",
    "Paging",
    "SortKey",
    "after",
    "cut",
    "decode_cursor",
    "encode_cursor",
    "fetch_page",
    "order",
    "page_query",
]
