"""The rule table: ATen op packet -> coupling rule (`rule` fills it; the rule modules import
this one; `explorer.coupling.dispatch` loads them and runs the table)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .context import Rule

RULES: dict[Any, Rule] = {}


class _OptionalOps:
    """``torch.ops.aten`` where an op missing from this torch build reads as ``None``.

    Rules name ops that only some torch versions have; a missing one is skipped.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            return None


aten = _OptionalOps()


def rule(*packets: Any) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule for each ATen op packet (``torch.ops.aten.add``)."""

    def register(fn: Rule) -> Rule:
        for packet in packets:
            if packet is not None:
                RULES[packet] = fn
        return fn

    return register
