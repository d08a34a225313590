"""Residual streams: channel groups that residual connections sum across blocks.

A residual connection is an element-wise add of two activations (``x + f(x)``); its two
operands carry the same channels, so every block that adds into the stream is coupled to
every other. A group whose channels pass through two or more such adds is a residual stream
(a transformer's hidden width, a ResNet stage's width); the modules running those adds are
recorded on the group (`Group.residual`) so its title can say so, whichever module happens
to own its first member (the embedding table of an LLM).
"""
from __future__ import annotations

from collections.abc import Callable

from ..graph.ir import Graph, ValueKind, value_refs
from ..graph.ops import ADD_OPS
from .groups import Group

MIN_ADDS = 2  # residual adds a group must pass through to be called a residual stream


def residual_adds(graph: Graph, groups: list[Group],
                  value_families: Callable[[int], list[frozenset[int]]]
                  ) -> dict[int, list[str]]:
    """Group id -> the module of every residual add its channels pass through, in order.

    Args:
        graph: the trace.
        groups: the groups of its coupling.
        value_families: the coupling's atom families on each dim of a value.
    """
    group_of = {a.family: g.id for g in groups if g.heads is None for a in g.axes}
    out: dict[int, list[str]] = {}
    for node in graph.ops:
        if node.op.overloadpacket not in ADD_OPS:
            continue
        refs = value_refs(node.args)
        if len(refs) != 2 or any(graph.values[r.vid].kind is not ValueKind.ACTIVATION
                                 for r in refs):
            continue
        left, right = (set().union(*value_families(r.vid)) for r in refs)
        for gid in sorted({group_of[f] for f in left & right if f in group_of}):
            out.setdefault(gid, []).append(node.module)
    return out


def mark_residual(graph: Graph, groups: list[Group],
                  value_families: Callable[[int], list[frozenset[int]]]) -> None:
    """Set `Group.residual` on every group that residual adds sum across blocks."""
    for gid, modules in residual_adds(graph, groups, value_families).items():
        if len(modules) >= MIN_ADDS:
            groups[gid].residual = list(dict.fromkeys(modules))
