"""Parameter and multiply-accumulate counts, read from a model and its traced graph."""
from __future__ import annotations

import math

import torch
from torch import nn

from .ir import Graph, OpNode, ValueRef
from .ops import SDPA_OPS

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _shape(graph: Graph, obj: object) -> tuple[int, ...]:
    return graph.values[obj.vid].shape if isinstance(obj, ValueRef) else ()


def op_macs(graph: Graph, node: OpNode) -> int:
    """Multiply-accumulates of one contraction op (0 for everything else)."""
    packet = node.op.overloadpacket
    out = graph.values[node.outputs[0]].shape if node.outputs and node.outputs[0] is not None \
        else ()
    if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul):
        a = _shape(graph, node.args[1] if packet in (aten.addmm, aten.baddbmm) else node.args[0])
        return math.prod(out) * (a[-1] if a else 1)
    if packet in (aten.convolution, aten._convolution):
        w = _shape(graph, node.args[1])
        transposed = bool(node.args[6])
        if transposed:
            x = _shape(graph, node.args[0])
            return math.prod(x) * math.prod(w[1:])
        return math.prod(out) * math.prod(w[1:])
    if packet in (aten.linear,):
        w = _shape(graph, node.args[1])
        return math.prod(out) * w[1]
    if packet in SDPA_OPS:
        q, k = _shape(graph, node.args[0]), _shape(graph, node.args[1])
        return math.prod(q) * k[-2] + math.prod(out) * k[-2]
    return 0


def count_macs(graph: Graph) -> int:
    """Total multiply-accumulates of the traced forward."""
    return sum(op_macs(graph, n) for n in graph.ops)


def macs_by_module(graph: Graph) -> dict[str, int]:
    """Multiply-accumulates per innermost module (for per-layer plots)."""
    out: dict[str, int] = {}
    for n in graph.ops:
        macs = op_macs(graph, n)
        if macs:
            out[n.module] = out.get(n.module, 0) + macs
    return out
