"""The rule table: ATen op packet -> coupling rule, and how an op with no rule is handled."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..graph.ir import OpNode
from .context import Ctx, Rule, tensor_args
from .vocab import PinKind

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


def apply_rule(ctx: Ctx, node: OpNode) -> None:
    """Run the rule for ``node``; ops with no rule pin everything they touch."""
    packet = node.op.overloadpacket
    fn = RULES.get(packet)
    if fn is None and packet.__name__.endswith("_"):  # in-place variant: same coupling
        fn = RULES.get(getattr(aten, packet.__name__[:-1]))
    if fn is None and torch.Tag.pointwise in node.op.tags:
        fn = RULES[torch.ops.aten.add]  # the broadcasting element-wise rule
    if fn is None:
        _unknown(ctx, node)
        return
    fn(ctx, node)


def _unknown(ctx: Ctx, node: OpNode) -> None:
    where = f" at {node.location}" if node.location else ""
    reason = (f"unsupported op {node.short} in '{node.module or '<root>'}'{where}: "
              f"no coupling rule, so its dims are left alone")
    inputs = tensor_args(node)
    if not inputs:  # a factory op we do not know: its outputs are new constants
        for i in range(len(node.outputs)):
            ctx.fresh_out(node, i)
        return
    ctx.unknown.setdefault(node.name, []).append(node.location)
    ctx.pin_all(inputs, reason, PinKind.UNSUPPORTED)
    for i in range(len(node.outputs)):
        ctx.fresh_out(node, i, pin=reason, kind=PinKind.UNSUPPORTED)


def _load_rules() -> None:
    """Import the rule modules so their ``@rule`` decorators fill `RULES`."""
    from . import rules_basic, rules_compute, rules_shape  # noqa: F401


_load_rules()
