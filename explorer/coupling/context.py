"""What a coupling rule sees: the graph, the element store, and helpers to read/write dims."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..graph.ir import Graph, OpNode, ValueKind, ValueRef, value_refs
from .spaces import IdArray, Runs, Spaces
from .vocab import PinKind

Rule = Callable[["Ctx", OpNode], None]


_INTEGER_DTYPES = frozenset({"int64", "int32", "int16", "int8", "uint8"})


class Ctx:
    """Per-trace state for rules: lazily gives every value one id array per dim."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.sp = Spaces()
        self.unknown: dict[str, list[str]] = {}  # op name -> locations where it had no rule
        self.group_axes: dict[str, IdArray] = {}  # module -> ids of its conv/norm group axis
        # id(part) -> (flat, parts) of every dim a reshape factored (see rules_shape.view)
        self.factors: dict[int, tuple[IdArray, tuple[IdArray, ...]]] = {}

    # -- reading ------------------------------------------------------------------------
    def dims(self, ref: Any) -> list[IdArray]:
        """Id arrays, one per dim, of a `ValueRef` or value id."""
        vid = ref.vid if isinstance(ref, ValueRef) else int(ref)
        stored = self.sp.dims.get(vid)
        if stored is not None:
            # a value no later op reads is held as runs (`Spaces.retire`); read again, it
            # gets new arrays with the same ids
            return [d.expand() if isinstance(d, Runs) else d for d in stored]
        value = self.graph.values[vid]
        got = [self.sp.fresh(n) for n in value.shape]
        self.sp.dims[vid] = list(got)
        if value.kind is ValueKind.INPUT:
            for ids in got:
                self.sp.pin(ids, f"model input {value.name}", PinKind.MODEL_IO)
        elif value.kind is ValueKind.BUFFER and value.dtype in _INTEGER_DTYPES:
            for ids in got:  # Swin's relative_position_index: looked up, never cut
                self.sp.pin(ids, f"entries of the integer buffer '{value.name}' are "
                            "indices or positions, not channels", PinKind.INDEXED)
        elif value.kind is ValueKind.EXTERNAL:
            for ids in got:
                self.sp.pin(ids, "a plain tensor attribute or constant (not a parameter "
                            "or buffer) that pruning cannot resize", PinKind.CONSTANT)
        return got

    def shape(self, ref: Any) -> tuple[int, ...]:
        vid = ref.vid if isinstance(ref, ValueRef) else int(ref)
        return self.graph.values[vid].shape

    # -- writing ------------------------------------------------------------------------
    def set_out(self, node: OpNode, i: int, dims: list[IdArray]) -> None:
        """Assign id arrays to the ``i``-th tensor output of ``node`` (sizes checked)."""
        vid = node.outputs[i]
        if vid is None:
            return
        shape = self.graph.values[vid].shape
        if len(shape) != len(dims) or any(len(d) != s for d, s in zip(dims, shape, strict=False)):
            raise ValueError(f"rule for {node.name} gave dims {[len(d) for d in dims]} "
                             f"for an output of shape {list(shape)}")
        self.sp.dims[vid] = list(dims)

    def fresh_out(self, node: OpNode, i: int, pin: str | None = None,
                  kind: PinKind = PinKind.STRUCTURE) -> list[IdArray]:
        """New ids for output ``i`` (pinned with ``pin`` as reason when given)."""
        vid = node.outputs[i]
        if vid is None:
            return []
        dims = [self.sp.fresh(n) for n in self.graph.values[vid].shape]
        self.sp.dims[vid] = list(dims)
        if pin:
            for ids in dims:
                self.sp.pin(ids, pin, kind)
        return dims

    def union(self, a: IdArray, b: IdArray, node: OpNode) -> None:
        self.sp.union(a, b, node.index)

    def broadcast(self, node: OpNode, refs: list[Any], out_shape: tuple[int, ...]) -> list[IdArray]:
        """Align ``refs`` to ``out_shape`` from the right; union equal-size dims only.

        A dim of size 1 that broadcasts against a larger one is *not* coupled: that is how
        false coupling through broadcasting is avoided.
        """
        out: list[IdArray | None] = [None] * len(out_shape)
        for ref in refs:
            dims = self.dims(ref)
            offset = len(out_shape) - len(dims)
            for j, ids in enumerate(dims):
                k = offset + j
                if len(ids) != out_shape[k] or (len(ids) == 1 and out_shape[k] == 1 and
                                                out[k] is not None):
                    continue
                if out[k] is None:
                    out[k] = ids
                else:
                    self.union(out[k], ids, node)  # type: ignore[arg-type]
        return [o if o is not None else self.sp.fresh(n)
                for o, n in zip(out, out_shape, strict=False)]

    def pin_all(self, refs: list[Any], reason: str,
                kind: PinKind = PinKind.STRUCTURE) -> None:
        for ref in refs:
            for ids in self.dims(ref):
                self.sp.pin(ids, reason, kind)

    def out_shape(self, node: OpNode, i: int = 0) -> tuple[int, ...]:
        vid = node.outputs[i]
        return self.graph.values[vid].shape if vid is not None else ()


def tensor_args(node: OpNode) -> list[ValueRef]:
    """The tensor arguments of a node, in order (nested lists flattened)."""
    return value_refs((node.args, list(node.kwargs.values())))


def norm_dim(dim: int, rank: int) -> int:
    """A possibly negative dim as an index in ``range(rank)`` (rank 0 -> 0)."""
    return dim % rank if rank else 0


def arg(node: OpNode, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` or keyword ``name`` of an op call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


__all__ = ["Ctx", "Rule", "tensor_args", "norm_dim", "arg", "np"]
