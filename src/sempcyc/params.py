"""Reading params.yaml into frozen dataclasses, one per section, so a wrong or missing value fails at start-up
with one line naming `section.key`, not deep inside a stage.

A section's dataclass lists every key of that section with its type and bounds and no default: params.yaml is
the one place where values live. Each field's bounds go in `setting(...)`:

    @dataclass(frozen=True)
    class GallerySettings:
        SECTION: ClassVar[str] = "gallery"
        batch_size: int = setting(min=1)

    batch = read_section(params, GallerySettings).batch_size

Types understood: int, float, bool, str (non-empty), `str | None` (empty or null -> None), `bool | None` (auto,
empty or null -> None), `list[int]`, `list` (of anything; the stage checks the items) and `dict`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PARAMS_FILE = "params.yaml"
_NO_DEFAULT = dataclasses.MISSING


def load(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the repository root or pass --params") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return data


def setting(*, min: float | None = None, max: float | None = None, above: float | None = None,
            choices: tuple | None = None) -> Any:
    """A required dataclass field with its bounds: min/max inclusive, `above` exclusive, or a set of choices."""
    return dataclasses.field(default=_NO_DEFAULT, metadata={"min": min, "max": max, "above": above,
                                                            "choices": choices})


def read(path: str | Path, *classes: type) -> tuple:
    """Load the params file at `path` and read one section dataclass per class, in order."""
    params = load(path)
    return tuple(read_section(params, cls, str(path)) for cls in classes)


def read_section(params: dict, cls: type, source: str = PARAMS_FILE):
    """The dataclass `cls` filled from section `cls.SECTION` of `params`."""
    raw = params.get(cls.SECTION)
    if not isinstance(raw, dict):
        raise UserError(f"{source}: section '{cls.SECTION}' is missing or not a mapping; copy it from the "
                        "repository's params.yaml")
    return read_mapping(raw, cls, f"{source}: {cls.SECTION}")


def read_mapping(raw: dict, cls: type, where: str):
    """The dataclass `cls` filled from `raw`: every field required, no unknown key; `where` prefixes errors."""
    fields = dataclasses.fields(cls)
    unknown = sorted(set(raw) - {f.name for f in fields})
    if unknown:
        raise UserError(f"{where}.{unknown[0]} is an unknown setting; known: " + ", ".join(f.name for f in fields))
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        if f.name not in raw:
            raise UserError(f"{where}.{f.name} is missing; add it (the repository's params.yaml lists every "
                            "setting with a comment)")
        values[f.name] = _convert(raw[f.name], hints[f.name], f.metadata, f"{where}.{f.name}")
    return cls(**values)


def _convert(value: Any, hint: Any, bounds: typing.Mapping, where: str) -> Any:
    optional = _optional_of(hint)
    if optional is not None:
        if value is None or value == "" or (optional is not str and value == "auto"):
            return None
        hint = optional
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int or hint is float:
        return _number(value, hint, bounds, where)
    if hint is str:
        return _string(value, bounds, where)
    origin = typing.get_origin(hint) or hint
    if origin is list:
        item = (typing.get_args(hint) or (Any,))[0]
        if not isinstance(value, list) or (item is int and any(_not_int(v) for v in value)):
            raise UserError(f"{where} must be a list" + (" of integers" if item is int else "") + f", got {value!r}")
        return list(value)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{where}: unsupported settings type {hint!r}")


def _optional_of(hint: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _number(value: Any, hint: type, bounds: typing.Mapping, where: str) -> int | float:
    lo, hi, above = bounds.get("min"), bounds.get("max"), bounds.get("above")
    want = ("an integer" if hint is int else "a number") + _range_text(lo, hi, above)
    if hint is int and _not_int(value):
        raise UserError(f"{where} must be {want}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be {want}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
        raise UserError(f"{where} must be {want}, got {value!r}")
    choices = bounds.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return hint(value)


def _string(value: Any, bounds: typing.Mapping, where: str) -> str:
    choices = bounds.get("choices")
    if not isinstance(value, str) or not value:
        raise UserError(f"{where} must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise UserError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _range_text(lo: Any, hi: Any, above: Any) -> str:
    parts = [f"> {above}"] if above is not None else []
    parts += [f">= {lo}"] if lo is not None else []
    parts += [f"<= {hi}"] if hi is not None else []
    return " " + " and ".join(parts) if parts else ""
