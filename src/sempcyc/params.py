"""Reading params.yaml with type checks, so a wrong value fails with the param's name, not deep inside a stage."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PARAMS_FILE = "params.yaml"


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


class Section:
    """Typed view of one params.yaml section; every getter names `section.key` in its error."""

    def __init__(self, params: dict, name: str, source: str = PARAMS_FILE):
        raw = params.get(name, {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
        self.name, self.raw, self.source = name, raw, source

    def _fail(self, key: str, want: str, value: Any) -> UserError:
        return UserError(f"{self.source}: {self.name}.{key} must be {want}, got {value!r}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def int(self, key: str, default: int | None = None, *, min: int | None = None, max: int | None = None) -> int:
        value = self.raw.get(key, default)
        want = "an integer" + _range_text(min, max)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, want, value)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self._fail(key, want, value)
        return value

    def float(self, key: str, default: float | None = None, *, min: float | None = None,
              max: float | None = None, min_exclusive: bool = False) -> float:
        value = self.raw.get(key, default)
        lower = f" > {min}" if min_exclusive and min is not None else ""
        want = "a number" + (lower or _range_text(min, max))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._fail(key, want, value)
        if min is not None and (value <= min if min_exclusive else value < min):
            raise self._fail(key, want, value)
        if max is not None and value > max:
            raise self._fail(key, want, value)
        return float(value)

    def bool(self, key: str, default: bool | None = None) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def str(self, key: str, default: str | None = None, *, choices: tuple[str, ...] | None = None) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a non-empty string", value)
        if choices is not None and value not in choices:
            raise self._fail(key, "one of " + ", ".join(choices), value)
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise self._fail(key, "a string or empty", value)
        return value

    def int_list(self, key: str, default: list | None = None) -> list[int]:
        value = self.raw.get(key, default)
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise self._fail(key, "a list of integers", value)
        return value


def _range_text(min: Any, max: Any) -> str:
    if min is not None and max is not None:
        return f" in [{min}, {max}]"
    if min is not None:
        return f" >= {min}"
    if max is not None:
        return f" <= {max}"
    return ""
