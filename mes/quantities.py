"""Quantities of material are exact decimals: stored, computed and exchanged as ``Decimal``.

A lot of 90 kg after three consumptions of 0.45 kg holds 88.65 kg, not 88.64999999999999.

- **Columns** are ``NUMERIC(18, 6)`` (``Quantity``): twelve digits before the point (a
  billion of anything fits, with room), six after it (a milligram in kilograms, a
  millilitre in litres), mapped to ``decimal.Decimal``. On PostgreSQL the type and its
  arithmetic (``quantity - :q`` in one UPDATE) are exact. SQLite has no decimal type: it
  stores the value as an 8-byte float (NUMERIC affinity, REAL storage) and SQLAlchemy
  hands it back as a ``Decimal`` rounded to the column's six places. Every value of up to 15
  significant digits therefore reads back exactly, and SQL arithmetic on SQLite is rounded to
  six places where it is stored (``round(…, 6)`` in the stock move), so float error never
  accumulates; beyond 15 significant digits SQLite is not exact (PostgreSQL is).
- **Python** arithmetic is ``Decimal`` throughout; a float never meets a ``Decimal``.
  Where a float comes in (the machine port: OPC UA sends DecimalStrings, the port carries
  floats), ``exact`` turns it into a ``Decimal`` through its shortest repr (``0.45`` is
  ``Decimal("0.45")``, not ``0.450000000000000011102…``) rounded to six places.
- **JSON** (the API, JSON columns such as the job's material requirements, the audit trail)
  carries quantities as numbers, never strings: ``json_number`` writes a ``Decimal`` as the
  float whose repr is its digits (exact for 15 significant digits), and ``exact`` reads it
  back. ``QuantityNumber`` is the pydantic type of an API quantity: a ``Decimal`` in
  Python, a number in JSON and in the OpenAPI document.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer
from pydantic_core import PydanticCustomError
from sqlalchemy import Numeric

PRECISION = 18
SCALE = 6
#: The smallest step of a stored quantity.
QUANTUM = Decimal(1).scaleb(-SCALE)

#: The column type of every quantity of material.
Quantity: Numeric[Decimal] = Numeric(PRECISION, SCALE, asdecimal=True)


def exact(value: Decimal | float | int | str) -> Decimal:
    """``value`` as a ``Decimal`` rounded to the stored scale (six places).

    A float goes through its shortest repr, so ``0.45`` becomes ``Decimal("0.45")``. Not a
    finite number: ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError, TypeError) as e:
        raise ValueError(f"not a quantity: {value!r}") from e
    if not d.is_finite():
        raise ValueError(f"not a finite quantity: {value!r}")
    exponent = d.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -SCALE:
        d = d.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    return d


def json_number(value: Decimal) -> float:
    """A ``Decimal`` as a JSON number: the float whose shortest repr is the decimal's digits
    (``Decimal("88.650000")`` → ``88.65``; exact up to 15 significant digits)."""
    return float(value)


def text(value: Decimal) -> str:
    """A quantity for people and messages: ``Decimal("50000.000000")`` → "50000"."""
    return format(value.normalize(), "f") if value.is_finite() else str(value)


def plain(value: Any) -> Any:
    """``value`` with every ``Decimal`` in it (lists, dicts) made a JSON number."""
    if isinstance(value, Decimal):
        return json_number(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


#: An API quantity: ``Decimal`` in Python, a number in JSON (pydantic would write a string).
QuantityNumber = Annotated[
    Decimal,
    PlainSerializer(json_number, return_type=float, when_used="json"),
    # Litestar documents a plain Decimal as a string; this one is a number.
    Field(json_schema_extra={"type": "number"}),
]


def _number_in(value: object) -> object:
    """A JSON number as a ``Decimal`` (a float through its shortest repr); a string or a
    boolean is refused, as a strict float refuses it."""
    if isinstance(value, bool | str | bytes):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def _number_lax(value: object) -> object:
    """A number, or a string of one (a plant file), as a ``Decimal``; errors as a float's."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise PydanticCustomError(
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            ) from None
    return value


#: An API quantity as received: a JSON number (not a string), parsed into a ``Decimal``.
QuantityIn = Annotated[QuantityNumber, BeforeValidator(_number_in)]
#: A quantity in master data (plant file, B2MML Sync): a number or a string of one.
QuantityLax = Annotated[QuantityNumber, BeforeValidator(_number_lax)]
