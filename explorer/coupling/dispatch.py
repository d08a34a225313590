"""Running the rule table on one op, and how an op with no rule is handled (pinned
*unsupported*, never guessed). Importing this module loads the rule modules, whose ``@rule``
decorators fill `explorer.coupling.registry.RULES`."""
from __future__ import annotations

import torch

from ..graph.ir import OpNode
from . import rules_basic, rules_compute, rules_shape  # noqa: F401 - fill RULES
from .context import Ctx, tensor_args
from .registry import RULES, aten
from .vocab import PinKind


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
    reason = (f"unsupported op {node.short} in '{node.scope}'{where}: "
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


