"""Spec options: the ``?k=v&k2=v2`` query after a timm model name or transformers family."""

from __future__ import annotations

import ast
from typing import Any

from ._types import SpecError


def split_query(text: str, spec_kind: str) -> tuple[str, dict[str, Any]]:
    """Split ``name?k=v&k2=v2`` into the name and parsed keyword values.

    Raises:
        SpecError: if an option is not ``key=value`` or a key is given twice.
    """
    name, _, query = text.partition("?")
    kwargs: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(
                f"{spec_kind} spec option {item!r} in {text!r} is not 'key=value'; "
                "write options like '?num_classes=7&drop_rate=0.1'"
            )
        if key in kwargs:
            raise SpecError(f"{spec_kind} spec option {key!r} is given twice in {text!r}")
        kwargs[key] = parse_value(value)
    return name.strip(), kwargs


def parse_value(text: str) -> Any:
    """Parse a query value: int, float, true/false, none/null, a tuple/list literal such as
    ``(1,1,2,1)``, or else the string itself."""
    lowered = text.strip().lower()
    if text.strip()[:1] in ("(", "["):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            return text
        return tuple(value) if isinstance(value, (list, tuple)) else value
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text
