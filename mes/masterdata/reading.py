"""Reading master data into the plant file schema: YAML, JSON and B2MML files, or parsed data.

``parse_plant`` validates data against ``mes.masterdata.schema`` and runs the file's own
cross-checks (``mes.masterdata.checks``); every problem is reported as a ``MasterDataError``
naming the entry by its path and id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mes.masterdata.checks import MasterDataError, Stored, check_plant
from mes.masterdata.schema import Plant


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a copied line must fail instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_plant_file(path: str | Path) -> Plant:
    """Read and validate a plant file: YAML (``.yaml``/``.yml``) or JSON (``.json``).

    Raises ``MasterDataError`` for syntax, schema and cross-reference errors; ``OSError``
    when the file cannot be read.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    data: Any
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_NoDuplicateKeysLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise MasterDataError(f"{p.name}: not valid YAML: {exc}") from exc
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MasterDataError(f"{p.name}: not valid JSON: {exc}") from exc
    elif suffix == ".xml":
        raise MasterDataError(
            f"{p.name}: a B2MML file holds part of a plant; read it with read_master_data_file"
        )
    else:
        raise MasterDataError(f"{p.name}: unknown plant file type; use .yaml, .yml or .json")
    return parse_plant(data)


def read_master_data_file(path: str | Path) -> tuple[Plant, bool]:
    """Read a plant file or a B2MML master data message; return it and whether it is partial.

    ``.yaml``/``.yml``/``.json`` are plant files (complete, see ``read_plant_file``);
    ``.xml`` holds one B2MML ``Sync…`` message (MaterialClass, MaterialDefinition,
    Equipment, ProcessSegment, OperationsDefinition, WorkMaster, MaterialLot or
    MaterialInformation), which is partial. Raises
    ``MasterDataError`` for anything wrong with the file, its XML or its content.
    """
    p = Path(path)
    if p.suffix.lower() != ".xml":
        return read_plant_file(p), False
    # Imported here: mes.b2mml is a layer above this module and imports it for its types.
    from mes.b2mml import B2MMLError, SyncMasterData, decode

    try:
        message = decode(p.read_bytes())
    except B2MMLError as exc:
        raise MasterDataError([f"{p.name}: {reason}" for reason in exc.reasons]) from exc
    if not isinstance(message, SyncMasterData):
        raise MasterDataError(
            f"{p.name}: holds a {type(message).__name__}, not a B2MML Sync master data message"
        )
    return parse_plant(message.plant, partial=True), True


def parse_plant(data: dict[str, Any], partial: bool = False) -> Plant:
    """Validate plant data (as read from YAML/JSON) and check its cross-references.

    With ``partial`` a reference to something the data does not define is left for
    ``load_plant(..., partial=True)`` to resolve against the database. Raises
    ``MasterDataError`` listing every problem, each prefixed by the entry's path.
    """
    if not isinstance(data, dict):
        raise MasterDataError(
            f"plant file: the top level must be a mapping of sections, not {type(data).__name__}"
        )
    try:
        plant = Plant.model_validate(data)
    except ValidationError as exc:
        raise MasterDataError(_schema_problems(data, exc)) from exc
    problems = check_plant(plant, Stored(deferred=True) if partial else None)
    if problems:
        raise MasterDataError(problems)
    return plant


_LABEL_KEYS = ("id", "name", "material", "equipment")


def _label(node: Any) -> str | None:
    """The id-like value that names a list entry in messages, when the entry has one."""
    if isinstance(node, dict):
        for key in _LABEL_KEYS:
            value = node.get(key)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)
    return None


def _schema_problems(data: Any, exc: ValidationError) -> list[str]:
    """Turn pydantic's locations into plant-file paths that name entries by their ids."""
    problems = []
    for err in exc.errors(include_url=False):
        parts: list[str] = []
        node: Any = data
        for key in err["loc"]:
            if isinstance(key, int):
                node = node[key] if isinstance(node, list) and 0 <= key < len(node) else None
                label = _label(node)
                entry = f"[{key}]" + (f" ({label})" if label is not None else "")
                if parts:
                    parts[-1] += entry
                else:
                    parts.append(entry)
            else:
                parts.append(key)
                node = node.get(key) if isinstance(node, dict) else None
        message = err["msg"]
        given = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and (
            given is None or isinstance(given, str | int | float | bool)
        ):
            message += f" (got {given!r})"
        problems.append(f"{'.'.join(parts) or 'plant file'}: {message}")
    return problems
