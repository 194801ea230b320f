"""A small JSON Schema checker for the keywords our schemas use (exporter/schema.py), torch- and dependency-free.

A bundle's manifest is untrusted input: it is checked against MANIFEST_SCHEMA before any field is read, so a
missing key or a wrong type is one line naming the field, never a KeyError deep inside verify. (jsonschema
itself is a dev dependency; tests check our schemas with it and this checker against it.)
"""

from __future__ import annotations

import math
import re
from typing import Any

_TYPES = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
    "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
}
# At most this many problems are collected: the first few name the damage.
MAX_ERRORS = 5


def schema_errors(instance: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Where ``instance`` breaks ``schema`` (paths like variants.int8.thresholds.atol), at most MAX_ERRORS."""
    errors: list[str] = []
    _check(instance, schema, where, errors)
    return errors[:MAX_ERRORS]


def _ecma(pattern: str) -> str:
    """JSON Schema patterns are ECMA regexes, where a final $ matches only at the very end (Python's $ also
    matches before a final newline, which would let "label\\n" through)."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


def _name(where: str) -> str:
    return where or "the document"


def _check(x: Any, s: dict[str, Any], where: str, errors: list[str]) -> None:
    if len(errors) >= MAX_ERRORS:
        return
    if "oneOf" in s:
        matches = sum(not schema_errors(x, option, where) for option in s["oneOf"])
        if matches != 1:
            errors.append(f"{_name(where)}: does not match the allowed forms")
        return
    types = s.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](x) for t in allowed):
            errors.append(f"{_name(where)}: expected {' or '.join(allowed)}, got {type(x).__name__}")
            return
    if "const" in s and x != s["const"]:
        errors.append(f"{_name(where)}: must be {s['const']!r}")
    if "enum" in s and x not in s["enum"]:
        errors.append(f"{_name(where)}: {str(x)[:40]!r} is not one of {', '.join(map(str, s['enum']))}")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if isinstance(x, float) and not math.isfinite(x):
            errors.append(f"{_name(where)}: not a finite number")
        if "minimum" in s and x < s["minimum"]:
            errors.append(f"{_name(where)}: {x} < {s['minimum']}")
        if "maximum" in s and x > s["maximum"]:
            errors.append(f"{_name(where)}: {x} > {s['maximum']}")
    if isinstance(x, str) and "pattern" in s and not re.search(_ecma(s["pattern"]), x):
        errors.append(f"{_name(where)}: {x[:40]!r} is not of the expected form")
    if isinstance(x, dict):
        for key in s.get("required", []):
            if key not in x:
                errors.append(f"{_name(where)}: missing {key!r}")
        props = s.get("properties", {})
        extra = s.get("additionalProperties", True)
        names = s.get("propertyNames")
        for key, value in x.items():
            path = f"{where}.{key}" if where else str(key)
            if names is not None:
                _check(key, names, f"{path} (name)", errors)
            if key in props:
                _check(value, props[key], path, errors)
            elif extra is False:
                errors.append(f"{_name(where)}: unexpected key {str(key)[:40]!r}")
            elif isinstance(extra, dict):
                _check(value, extra, path, errors)
    if isinstance(x, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(x):
            _check(item, s["items"], f"{where}[{i}]", errors)
