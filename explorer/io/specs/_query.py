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


_COUNT_PREFIXES = ("num_", "n_")
_COUNT_SUFFIXES = ("_size", "_dim", "_heads", "_layers", "_embeddings", "_embd", "_positions",
                   "_chans", "_classes", "_features", "depth", "depths")
_ZERO_OK = frozenset({"num_classes"})  # timm: 0 builds the model without a classifier


def is_count(key: str) -> bool:
    """Whether an option named ``key`` is a size or a count (``num_classes``, ``hidden_size``,
    ``depths``...): its value must be a positive integer (or a tuple of them)."""
    return key.startswith(_COUNT_PREFIXES) or key.endswith(_COUNT_SUFFIXES)


def check_counts(spec_kind: str, options: dict[str, Any]) -> None:
    """Sizes and counts among ``options`` are positive integers (``num_classes`` may be 0).

    Raises:
        SpecError: naming the first option that is not.
    """
    for key, value in options.items():
        if not is_count(key) or value is None:
            continue
        lowest = 0 if key in _ZERO_OK else 1
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, bool) or not isinstance(item, int) or item < lowest:
                raise SpecError(f"{spec_kind} spec option {key!r} must be "
                                f"{'an integer >= 0' if lowest == 0 else 'a positive integer'}"
                                f"{' (or a tuple of them)' if isinstance(value, tuple) else ''}"
                                f", got {value!r}")
