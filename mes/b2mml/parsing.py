"""Hardened XML parsing and XSD validation of B2MML V0701, and the reading helpers on top.

An ERP's message is untrusted input. Before anything reads it:

1. its size is checked against a limit (the parser never sees a bigger document);
2. any DOCTYPE is refused: B2MML needs no DTD, and a DTD is how external entities (XXE)
   and entity expansion bombs ("billion laughs") get in;
3. lxml parses with entity resolution, DTD loading and network access all off and without
   ``huge_tree`` (libxml2's own limits on depth and text size stay on);
4. the document is validated against MESA's XSDs, shipped in ``xsd/`` and loaded from
   those files only.

Every refusal is a ``B2MMLError`` listing the reasons, with line numbers where lxml gives
them, and the message's ``BODID`` when it could be read (so a ``ConfirmBOD`` can name it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlparse

from lxml import etree  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "DEFAULT_MAX_BYTES",
    "NS",
    "RELEASE_ID",
    "XSD_DIR",
    "B2MMLError",
    "Element",
    "parse_xml",
    "schema",
    "validation_errors",
]

#: The B2MML namespace, the same for every V07 release.
NS = "http://www.mesa.org/xml/B2MML"
#: What the MES writes in ``releaseID``: the schemas' release, V0701.
RELEASE_ID = "7.01"
#: MESA's schemas, shipped as package data.
XSD_DIR = Path(__file__).resolve().with_name("xsd")
#: Orders and master data messages are kilobytes; 2 MB leaves room for big schedules.
DEFAULT_MAX_BYTES = 2_000_000
#: Past this many, more schema errors only repeat the first ones' cause.
_MAX_REASONS = 20

#: ``Quantity/Key`` values that say "this is the amount" (case ignored).
AMOUNT_KEYS = frozenset(
    {
        "amount", "quantity", "orderquantity", "plannedquantity", "targetquantity",
        "requiredquantity", "totalquantity", "total", "produced", "producedquantity", "order",
    }
)  # fmt: skip

#: An lxml element. lxml ships no type hints, so it is ``Any`` to mypy.
Element: TypeAlias = Any


class B2MMLError(ValueError):
    """A B2MML message was refused: ``reasons`` says why, one entry per problem.

    ``bod_id`` is the refused message's ``ApplicationArea/BODID`` when it could be read,
    ``message_type`` its root element (``ProcessOperationsSchedule``, …) likewise.
    """

    def __init__(
        self,
        reasons: str | Sequence[str],
        bod_id: str | None = None,
        message_type: str | None = None,
        sender: str | None = None,
        created: datetime | None = None,
    ) -> None:
        self.reasons: list[str] = [reasons] if isinstance(reasons, str) else list(reasons)
        self.bod_id = bod_id
        self.message_type = message_type
        #: The refused message's ``Sender/LogicalID`` and ``CreationDateTime``, when readable,
        #: so the answer can echo them.
        self.sender = sender
        self.created = created
        super().__init__("; ".join(self.reasons))


# --- the schema -------------------------------------------------------------------------------


class _LocalSchemasOnly(etree.Resolver):  # type: ignore[misc]
    """Resolves the schemas' includes and imports to files of ``XSD_DIR`` and nothing else.

    The parser has ``no_network`` on already; this also keeps a schema edited to point
    elsewhere on disk (or at a URL) from loading anything but the shipped files.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[Path] = []

    def resolve(self, url: str, public_id: str | None, context: object) -> Any:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file") and len(parsed.scheme) > 1:  # C: is a drive
            raise OSError(f"B2MML schema refers to {url!r}; only the shipped files are used")
        raw = unquote(parsed.path) if parsed.scheme == "file" else url
        path = Path(raw).resolve()
        if path.parent != XSD_DIR or not path.is_file():
            raise OSError(f"B2MML schema refers to {url!r}, which is not a file of {XSD_DIR}")
        self.loaded.append(path)
        return self.resolve_filename(str(path), context)


def _load_schema() -> tuple[Any, list[Path]]:
    resolver = _LocalSchemasOnly()
    parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
    parser.resolvers.add(resolver)
    document = etree.parse(str(XSD_DIR / "AllSchemas.xsd"), parser)
    return etree.XMLSchema(document), resolver.loaded


@cache
def _schema_and_files() -> tuple[Any, list[Path]]:
    return _load_schema()


def schema() -> Any:
    """The XSD of every B2MML V0701 message (``AllSchemas.xsd``), loaded once.

    Loaded from the shipped files only; the list of files it read is
    ``schema_files()``.
    """
    return _schema_and_files()[0]


def schema_files() -> list[Path]:
    """Every file the schema was loaded from (each one inside ``XSD_DIR``)."""
    return list(_schema_and_files()[1])


# An XMLSchema keeps the errors of its last validation on itself: two threads validating at
# once would read each other's errors. Validation takes milliseconds, so one lock will do.
# Reentrant: ``parse_xml`` holds it around the whole parse, since a run of concurrent bad
# messages still showed another message's errors in an answer (1 run in 4; how lxml's
# thread error logs let them through is not found yet).
_validation_lock = threading.RLock()


def validation_errors(root: Element) -> list[str]:
    """The XSD errors of a document (empty when it is valid), with line numbers."""
    xsd = schema()
    with _validation_lock:
        if xsd.validate(root):
            return []
        entries = list(xsd.error_log)
    return _describe(entries)


def _describe(entries: list[Any]) -> list[str]:
    reasons = []
    for entry in entries[:_MAX_REASONS]:
        # "{http://www.mesa.org/xml/B2MML}EndTime" reads better as "EndTime".
        message = str(entry.message).replace("{" + NS + "}", "")
        reasons.append(f"line {entry.line}: {message}" if entry.line else message)
    if len(entries) > _MAX_REASONS:
        reasons.append(f"… and {len(entries) - _MAX_REASONS} more errors")
    return reasons


# --- parsing ----------------------------------------------------------------------------------


def _has_doctype(data: bytes) -> bool:
    """Whether the bytes declare a DOCTYPE, in UTF-8/ASCII or UTF-16 (NULs dropped).

    Checked before lxml parses anything, so a hostile internal subset is never even read;
    the parsed document's own DTD information is checked again afterwards. The price: a
    comment or CDATA section holding the literal text "<!DOCTYPE" is refused too.
    """
    return b"<!DOCTYPE" in data or b"<!DOCTYPE" in data.replace(b"\x00", b"")


def _new_parser() -> Any:
    # A parser per call: lxml parsers are not safe to share between threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        collect_ids=False,
    )


def parse_xml(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Element:
    """Parse and XSD-validate one B2MML message; return its root element.

    Raises ``B2MMLError`` when the message is bigger than ``max_bytes``, has a DOCTYPE,
    is not well-formed XML, is not in the B2MML namespace or does not validate.
    """
    if len(data) > max_bytes:
        raise B2MMLError(f"the message is {len(data)} bytes; the limit is {max_bytes}")
    if _has_doctype(data):
        raise B2MMLError(
            "the message has a DOCTYPE; B2MML uses none, and DTDs and entities are refused"
        )
    with _validation_lock:
        return _parse_locked(data)


def _parse_locked(data: bytes) -> Element:
    parser = _new_parser()
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        # The parser's own log: the exception's may still hold an earlier validation's errors.
        reasons = _describe(list(parser.error_log)) or [str(exc)]
        raise B2MMLError(["not well-formed XML: " + r for r in reasons]) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise B2MMLError("the message has a DOCTYPE; DTDs and entities are refused")
    bod_id = bod_id_of(root)
    message_type = local_name(root)
    if etree.QName(root).namespace != NS:
        raise B2MMLError(
            f"the root element {message_type} is not in the B2MML namespace {NS}",
            bod_id,
            message_type,
            *origin_of(root),
        )
    errors = validation_errors(root)
    if errors:
        raise B2MMLError(errors, bod_id, message_type, *origin_of(root))
    return root


def origin_of(root: Element) -> tuple[str | None, datetime | None]:
    """``Sender/LogicalID`` and ``CreationDateTime`` of a message, as far as readable."""
    area = child(root, "ApplicationArea")
    if area is None:
        return None, None
    sender = child(area, "Sender")
    created = text(area, "CreationDateTime")
    try:
        when = datetime.fromisoformat(created) if created else None
    except ValueError:
        when = None
    return (text(sender, "LogicalID") if sender is not None else None), when


# --- reading helpers (namespace-aware, whatever prefix the sender chose) ----------------------


def q(name: str) -> str:
    """The qualified (Clark notation) name of a B2MML element."""
    return f"{{{NS}}}{name}"


def local_name(element: Element) -> str:
    """An element's name without its namespace: ``ProcessOperationsSchedule``."""
    return str(etree.QName(element).localname)


def child(element: Element, name: str) -> Element | None:
    """The first B2MML child called ``name``, or None."""
    return element.find(q(name))


def children(element: Element, name: str) -> list[Element]:
    """Every B2MML child called ``name``, in document order."""
    return list(element.findall(q(name)))


def text_of(element: Element | None) -> str | None:
    """An element's text, trimmed; None for a missing or empty element."""
    if element is None or element.text is None:
        return None
    value = str(element.text).strip()
    return value or None


def text(element: Element, name: str) -> str | None:
    """The trimmed text of the first child called ``name``."""
    return text_of(child(element, name))


def texts(element: Element, name: str) -> list[str]:
    """The non-empty trimmed texts of every child called ``name``."""
    return [v for v in (text_of(c) for c in children(element, name)) if v is not None]


def bod_id_of(root: Element) -> str | None:
    """``ApplicationArea/BODID`` of a message, when it has one."""
    area = child(root, "ApplicationArea")
    return text(area, "BODID") if area is not None else None


def parse_datetime(value: str, where: str) -> datetime:
    """An ``xsd:dateTime`` (already schema-valid) as a datetime; naive when it has no zone."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        # Valid XSD the standard library cannot represent: year 10000, 24:00:00, …
        raise B2MMLError(f"{where}: {value!r} is not a date and time the MES can use") from None


def datetime_of(element: Element, name: str, where: str) -> datetime | None:
    """The ``xsd:dateTime`` of the first child called ``name``; None when it is missing."""
    value = text(element, name)
    return None if value is None else parse_datetime(value, f"{where}.{name}")


def decimal_of(value: str, where: str) -> Decimal:
    """A finite decimal number; B2MML quantities and values are free text in the schema."""
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise B2MMLError(f"{where}: {value!r} is not a number") from None
    if not number.is_finite():
        raise B2MMLError(f"{where}: {value!r} is not a finite number")
    return number


def quantity_of(element: Element, where: str) -> tuple[Decimal, str | None] | None:
    """The first ``Quantity`` (QuantityValueType) of an element: (number, unit or None).

    The unit is ``UnitOfMeasure``, or the ``unitCode`` attribute of ``QuantityString``
    (both forms are valid B2MML). None when the element has no quantity.
    """
    quantity = child(element, "Quantity")
    if quantity is None:
        return None
    string = child(quantity, "QuantityString")
    value = text_of(string)
    if value is None:
        return None
    unit = text(quantity, "UnitOfMeasure")
    if unit is None and string is not None:
        unit = (string.get("unitCode") or "").strip() or None
    return decimal_of(value, f"{where}.Quantity"), unit


class QuantityData:
    """One ``Quantity`` (QuantityValueType): number, unit (``UnitOfMeasure`` or the
    ``unitCode`` of ``QuantityString``) and ``Key`` (what the quantity is, when keyed)."""

    __slots__ = ("key", "unit", "value")

    def __init__(self, value: Decimal, unit: str | None, key: str | None) -> None:
        self.value, self.unit, self.key = value, unit, key

    def __repr__(self) -> str:
        return f"QuantityData({self.value!r}, {self.unit!r}, {self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantityData) and (self.value, self.unit, self.key) == (
            other.value,
            other.unit,
            other.key,
        )

    def __hash__(self) -> int:
        return hash((self.value, self.unit, self.key))

    def describe(self) -> str:
        text_ = f"{self.value:f}" + (f" {self.unit}" if self.unit else " (no unit)")
        return text_ + (f" (Key {self.key})" if self.key else "")


def quantities_of(element: Element, where: str) -> list[QuantityData]:
    """Every ``Quantity`` of an element, in document order (empty ones left out)."""
    found = []
    for quantity in children(element, "Quantity"):
        string = child(quantity, "QuantityString")
        value = text_of(string)
        if value is None:
            continue
        unit = text(quantity, "UnitOfMeasure")
        if unit is None and string is not None:
            unit = (string.get("unitCode") or "").strip() or None
        number = decimal_of(value, f"{where}.Quantity")
        found.append(QuantityData(number, unit, text(quantity, "Key")))
    return found
