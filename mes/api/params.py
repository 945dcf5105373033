"""What the API accepts as input, bounded to what the database can hold.

Every route names its parameters with the types below, so a value the database would refuse
(an id past PostgreSQL's ``integer``, an offset past ``bigint``, a NUL byte in text) or a value
that only looks right (``until=0.5`` read as a Unix time) is answered 400 naming the
parameter, before any query runs. JSON bodies go through :class:`CheckedRequest`: UTF-8, at
most :data:`MAX_JSON_DEPTH` levels deep and no NUL in any string, else 400 naming where.
What still reaches the database and is refused there (``sqlalchemy.exc.DataError``) is a 400
too (``mes.api.problems``), so no input is ever answered 500.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Any
from urllib.parse import urlencode

from litestar import Request
from litestar.datastructures import ResponseHeader
from litestar.exceptions import ValidationException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Schema
from litestar.params import PathParameter, QueryParameter
from litestar.plugins import OpenAPISchemaPlugin
from litestar.plugins.pydantic import PydanticSchemaPlugin
from litestar.typing import FieldDefinition
from pydantic import BaseModel

from mes.paging import CURSOR_MAX, CURSOR_PATTERN, Paging

#: The largest value of PostgreSQL's ``integer`` (the type of every id column).
INT4_MAX = 2**31 - 1
#: The longest identifier a column holds (job order ids; other names are shorter).
KEY_MAX = 120
#: Text without NUL: PostgreSQL refuses NUL in text, so no stored name contains one.
NO_NUL = r"^[^\x00]*$"
#: How deep a JSON body may nest; the deepest the API reads is the plant file (about 6).
MAX_JSON_DEPTH = 64

Id = Annotated[int, PathParameter(ge=1, le=INT4_MAX, description="A numeric id")]
"""A numeric id in the path (an ``integer`` column: 1 to 2**31 - 1)."""

Key = Annotated[
    str, PathParameter(min_length=1, max_length=KEY_MAX, pattern=NO_NUL, description="An id")
]
"""A business key in the path (an order number, a job order id, a lot, a name)."""

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="At most this many items")]
Offset = Annotated[int, QueryParameter(ge=0, le=INT4_MAX, description="Skip this many items")]
After = Annotated[
    str | None,
    QueryParameter(
        min_length=1,
        max_length=CURSOR_MAX,
        pattern=CURSOR_PATTERN,
        description="Continue after this cursor (the `next_after` of the page before); "
        "faster than `offset` deep in a list, and stable while rows are added",
    ),
]


def text_filter(description: str | None = None) -> QueryParameter:
    """A text filter in the query: a business key, at most :data:`KEY_MAX` characters, no NUL
    (``Annotated[str | None, text_filter("ERP order number")]``)."""
    return QueryParameter(max_length=KEY_MAX, pattern=NO_NUL, description=description)


class Instant(datetime):
    """A point in time given as ISO 8601 / RFC 3339 with its time zone
    (``2024-05-01T06:00:00Z``, ``2024-05-01T08:00:00+02:00``); a bare number or a time
    without a zone is refused rather than guessed."""

    @classmethod
    def parse(cls, value: object) -> Instant:
        """The instant ``value`` names, or ``ValueError`` saying what it lacks."""
        text = value if isinstance(value, str) else ""
        parsed = None
        if _RFC3339.fullmatch(text):
            with contextlib.suppress(ValueError):  # e.g. 2024-02-30
                parsed = datetime.fromisoformat(text.upper())
        if parsed is None:
            raise ValueError(
                f"{value!r} is not an ISO 8601 date-time with a time zone "
                "(e.g. 2024-05-01T06:00:00Z or 2024-05-01T08:00:00+02:00)"
            )
        return cls.fromtimestamp(parsed.timestamp(), parsed.tzinfo)


_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def _is_instant(annotation: Any) -> bool:
    return annotation is Instant


#: For ``Litestar(type_decoders=...)``: how a query value becomes an :class:`Instant`.
TYPE_DECODERS = [(_is_instant, lambda _type, value: Instant.parse(value))]

#: What a page's ``next_after`` is.
NEXT_AFTER = "The cursor of the next page (give it as `after`); null on the last page"

#: The ``Link`` header of a list answered as a bare array: where its next page is.
NEXT_LINK = ResponseHeader(
    name="Link",
    description='`<the same request with after=CURSOR>; rel="next"` when there is a next page',
    documentation_only=True,
)


@dataclass(frozen=True)
class NextLink:
    """Where a list's next page is: its request's path and query, ``after`` set to a cursor
    (and no ``offset``, which the cursor already includes)."""

    path: str
    query: tuple[tuple[str, str], ...]

    def to(self, cursor: str) -> str:
        """The ``Link`` header value for the page after ``cursor``."""
        kept = [(k, v) for k, v in self.query if k not in {"after", "offset"}]
        return f'<{self.path}?{urlencode([*kept, ("after", cursor)])}>; rel="next"'


def next_link(request: Request[Any, Any, Any]) -> NextLink:
    """The :class:`NextLink` of a request (a handler names ``next_link: NextLink``)."""
    return NextLink(request.url.path, tuple(request.query_params.multi_items()))


Since = Annotated[Instant | None, QueryParameter(description="At or after this instant")]
Until = Annotated[Instant | None, QueryParameter(description="Before this instant")]


def paging(limit: Limit = 100, offset: Offset = 0, after: After = None) -> Paging:
    """The paging parameters every list takes (a handler names ``paging: Paging``):
    ``limit``, ``offset`` and the keyset cursor ``after`` (``offset`` counts from it)."""
    return Paging(limit=limit, offset=offset, after=after)


@dataclass(frozen=True)
class Period:
    """A half-open period [since, until); either end may be open."""

    since: datetime | None = None
    until: datetime | None = None


def period(since: Since = None, until: Until = None) -> Period:
    """The period parameters of the lists and reports that take one (``interval: Period``)."""
    return Period(since=since, until=until)


class InstantSchema(OpenAPISchemaPlugin):
    """Documents :class:`Instant` as what it is: a ``date-time`` string."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return field_definition.annotation is Instant

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME)


class ClosedModelSchema(OpenAPISchemaPlugin):
    """The schema of a body model that refuses unknown fields (``extra="forbid"``), as strict
    as the model: ``additionalProperties: false``, each field's ``pattern`` and lower bound
    (Litestar drops a bound of 0 on an optional number), and for a model
    that strips whitespace, a required non-blank character where a minimum length is set
    (Litestar's pydantic schemas leave these out, so a fuzzer reading the document would send
    what the model refuses)."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        model = field_definition.annotation
        return (
            isinstance(model, type)
            and issubclass(model, BaseModel)
            and model.model_config.get("extra") == "forbid"
        )

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        model: type[BaseModel] = field_definition.annotation
        schema = PydanticSchemaPlugin.for_pydantic_model(field_definition, schema_creator)
        schema.additional_properties = False
        strips = bool(model.model_config.get("str_strip_whitespace"))
        for name, info in model.model_fields.items():
            prop = (schema.properties or {}).get(info.alias or name)
            if not isinstance(prop, Schema):
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            for meta in [*info.metadata, SimpleNamespace(**extra)]:
                if pattern := getattr(meta, "pattern", None):
                    prop.pattern = str(pattern)
                if getattr(meta, "ge", None) is not None:  # a bound of 0 is lost otherwise
                    prop.minimum = meta.ge
            for text in _string_schemas(prop):
                if text.pattern is None:
                    # No NUL (the body check refuses it); where the model strips whitespace
                    # and wants text, not blank either (it is stripped to nothing).
                    blank_refused = strips and bool(prop.min_length or text.min_length)
                    text.pattern = NO_NUL_NOT_BLANK if blank_refused else NO_NUL
        return schema


#: Text with no NUL and at least one character that is not white space.
NO_NUL_NOT_BLANK = r"^[^\x00]*[^\x00\s][^\x00]*$"


def _string_schemas(prop: Schema) -> list[Schema]:
    """The string schemas of a property: itself, or the string choices of an optional one."""
    if prop.type == OpenAPIType.STRING:
        return [prop]
    choices = [*(prop.one_of or []), *(prop.any_of or [])]
    return [c for c in choices if isinstance(c, Schema) and c.type == OpenAPIType.STRING]


# --- JSON bodies ------------------------------------------------------------------------------


def _refuse(where: str, reason: str) -> ValidationException:
    return ValidationException(
        f"{where}: {reason}", extra=[{"key": where, "message": reason, "source": "body"}]
    )


def check_json(value: object) -> None:
    """Refuse a decoded JSON body nested deeper than :data:`MAX_JSON_DEPTH` or holding a NUL
    in any string (key or value); the error names the place (``body.items[2].name``)."""
    stack: list[tuple[object, str, int]] = [(value, "body", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise _refuse(where, "NUL (\\u0000) is not allowed in text")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _refuse(where, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise _refuse(where, "NUL (\\u0000) is not allowed in a key")
                stack.append((child, f"{where}.{key}", depth + 1))
        else:
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))


class CheckedRequest(Request[Any, Any, Any]):
    """The app's request class: its JSON body is UTF-8, bounded in depth and NUL-free."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except UnicodeDecodeError as e:
            raise _refuse("body", f"not UTF-8 (byte {e.start})") from None
        except RecursionError:
            raise _refuse("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        check_json(value)
        return value


__all__ = [
    "INT4_MAX",
    "KEY_MAX",
    "MAX_JSON_DEPTH",
    "NEXT_AFTER",
    "NEXT_LINK",
    "TYPE_DECODERS",
    "After",
    "CheckedRequest",
    "ClosedModelSchema",
    "Id",
    "Instant",
    "InstantSchema",
    "Key",
    "Limit",
    "NextLink",
    "Offset",
    "Paging",
    "Period",
    "Since",
    "Until",
    "check_json",
    "next_link",
    "paging",
    "period",
    "text_filter",
]
