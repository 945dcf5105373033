"""One unit vocabulary: UN/CEFACT Recommendation 20 codes and the common symbols.

ERPs write units as Rec 20 codes (``KGM``, ``C62``, ``EA``), as symbols (``kg``, ``ea``,
``pcs``) or in any case; the MES books every quantity in its material's unit as master data
spells it. ``canonical`` maps any known spelling, case ignored, to one Rec 20 code, so
``same("EA", "ea")`` and ``same("C62", "ea")`` hold. ``factor`` converts between units of one
dimension (mass, volume, length, time, count), exactly, as ``Decimal``. A rate (``t/h``,
``KGS``) is never an amount: ``is_rate`` tells it apart. Unknown units compare by their
upper-cased text, so a plant's own unit still matches itself.

Some units are the material's own: a BAG of FLOUR is 25 kg, a BAG of SUGAR 50 kg. Master
data may give a material such conversions (``MaterialDefinition.unit_conversions``: unit
→ how many of the material's unit one of it is); ``factor`` and ``convert`` take them as
``per_material`` and use them where the standard vocabulary has no conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

__all__ = ["canonical", "convert", "dimension", "factor", "is_rate", "same"]

# Rec 20 code → (dimension, size in the dimension's base unit, spellings besides the code).
_UNITS: dict[str, tuple[str, Decimal, tuple[str, ...]]] = {
    # count: ea, piece, unit, each
    "C62": ("count", Decimal(1), ("ea", "each", "pc", "pcs", "piece", "pieces", "unit", "st")),
    "EA": ("count", Decimal(1), ()),
    "H87": ("count", Decimal(1), ()),
    "PCE": ("count", Decimal(1), ()),
    "NAR": ("count", Decimal(1), ("number of articles",)),
    "DZN": ("count", Decimal(12), ("dozen", "dz")),
    # mass, base kg
    "KGM": ("mass", Decimal(1), ("kg", "kilogram", "kilograms", "kgs")),
    "GRM": ("mass", Decimal("0.001"), ("g", "gram", "grams", "gr")),
    "MGM": ("mass", Decimal("0.000001"), ("mg", "milligram")),
    "TNE": ("mass", Decimal(1000), ("t", "to", "tonne", "tonnes", "metric ton", "mt")),
    "LBR": ("mass", Decimal("0.45359237"), ("lb", "lbs", "pound", "pounds")),
    # volume, base l
    "LTR": ("volume", Decimal(1), ("l", "liter", "litre", "liters", "litres", "lt")),
    "MLT": ("volume", Decimal("0.001"), ("ml", "milliliter", "millilitre")),
    "HLT": ("volume", Decimal(100), ("hl", "hectolitre", "hectoliter")),
    "MTQ": ("volume", Decimal(1000), ("m3", "m³", "cubic metre", "cubic meter")),
    # length, base m
    "MTR": ("length", Decimal(1), ("m", "metre", "meter", "metres", "meters")),
    "CMT": ("length", Decimal("0.01"), ("cm",)),
    "MMT": ("length", Decimal("0.001"), ("mm",)),
    "KMT": ("length", Decimal(1000), ("km",)),
    # time, base s
    "SEC": ("time", Decimal(1), ("s", "sec", "second", "seconds")),
    "MIN": ("time", Decimal(60), ("min", "minute", "minutes")),
    "HUR": ("time", Decimal(3600), ("h", "hr", "hour", "hours")),
    "DAY": ("time", Decimal(86400), ("d", "day", "days")),
    # rates: never an amount to make
    "KGS": ("rate", Decimal(1), ("kg/s",)),
    "KGH": ("rate", Decimal(1), ("kg/h",)),
    "TNH": ("rate", Decimal(1), ("t/h",)),
    "E93": ("rate", Decimal(1), ()),  # kilogram per hour, another code
}
# EA is Rec 20's own "each"; C62 ("one") is what most ERPs send for pieces. One concept.
_ALIAS_OF = {"EA": "C62", "H87": "C62", "PCE": "C62", "NAR": "C62"}

_LOOKUP: dict[str, str] = {}
for _code, (_dim, _size, _spellings) in _UNITS.items():
    _target = _ALIAS_OF.get(_code, _code)
    _LOOKUP[_code.lower()] = _target
    for _s in _spellings:
        _LOOKUP[_s.lower()] = _target


def canonical(unit: str) -> str:
    """The Rec 20 code of a unit (any known spelling, case ignored); an unknown unit's
    trimmed, upper-cased text."""
    key = unit.strip().lower()
    return _LOOKUP.get(key, key.upper())


def same(a: str, b: str) -> bool:
    """Whether two spellings name the same unit: ``EA`` = ``ea`` = ``C62``."""
    return canonical(a) == canonical(b)


def dimension(unit: str) -> str | None:
    """ "mass", "volume", "length", "time", "count" or "rate"; None for a unit not known."""
    known = _UNITS.get(canonical(unit))
    if known is not None:
        return known[0]
    return "rate" if "/" in unit else None


def is_rate(unit: str) -> bool:
    """Whether the unit is a rate (an amount per time, ``t/h``): never an amount to make."""
    return dimension(unit) == "rate"


def _standard(source: str, target: str) -> Decimal | None:
    if same(source, target):
        return Decimal(1)
    a, b = _UNITS.get(canonical(source)), _UNITS.get(canonical(target))
    if a is None or b is None or a[0] != b[0] or a[0] == "rate":
        return None
    return a[1] / b[1]


def factor(
    source: str,
    target: str,
    per_material: Mapping[str, Decimal] | None = None,
    base: str | None = None,
) -> Decimal | None:
    """How many ``target`` one ``source`` is (``factor("t", "kg") == 1000``); 1 for the same
    unit; None when they are of different or unknown dimensions, or rates.

    ``per_material`` adds one material's own units: unit → how many ``base`` (the
    material's unit; ``target`` when not given) one of it is, so with ``{"BAG": 25}`` and
    base kg, ``factor("BAG", "t") == 0.025``. The standard vocabulary wins where it knows
    both units.
    """
    found = _standard(source, target)
    if found is not None or not per_material:
        return found
    base = target if base is None else base
    sizes = {canonical(unit): Decimal(size) for unit, size in per_material.items()}

    def in_base(unit: str) -> Decimal | None:
        own = sizes.get(canonical(unit))
        if own is not None:
            return own
        return _standard(unit, base)

    a, b = in_base(source), in_base(target)
    if a is None or b is None or b == 0:
        return None
    return a / b


def convert(
    value: Decimal,
    source: str,
    target: str,
    per_material: Mapping[str, Decimal] | None = None,
    base: str | None = None,
) -> Decimal | None:
    """``value`` in ``source`` expressed in ``target``; None when they do not convert
    (``per_material`` and ``base`` as for ``factor``)."""
    f = factor(source, target, per_material, base)
    return None if f is None else value * f
