"""Depth pruning: whole residual blocks as their own kind of group, replaced by identity.

A block is a candidate when its first tensor output has the shape of its first tensor
input and an ``add`` in its own forward reads that input directly (``x + f(x)``), so
skipping it leaves a model whose shapes still line up. Containers holding such blocks are
not blocks themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph.ir import Graph
from ..graph.metrics import count_params


@dataclass(frozen=True)
class Block:
    """A residual block that can be removed as a whole."""

    module: str
    params: int
    shape: tuple[int, ...]


def residual_blocks(model: nn.Module, graph: Graph) -> list[Block]:
    """Residual blocks of the traced model, outermost first (nested ones included)."""
    adds = (torch.ops.aten.add, torch.ops.aten.add_)
    reads: dict[int, list[str]] = {}
    for node in graph.ops:
        if node.op.overloadpacket in adds:
            for ref in graph.tensor_ids(node.args):
                reads.setdefault(ref, []).append(node.module)
    modules = dict(model.named_modules())
    out = []
    for name, (ins, outs) in graph.module_io.items():
        if not name or not ins or not outs:
            continue
        x, y = graph.values[ins[0]], graph.values[outs[0]]
        if x.shape != y.shape or x.kind.value not in ("activation", "input"):
            continue
        if name not in reads.get(ins[0], []):  # the residual add is the block's own
            continue
            continue
        params = count_params(modules[name])
        if params:
            out.append(Block(name, params, x.shape))
    return out


class RemovedBlock(nn.Module):
    """Stands in for a removed block: returns its input in the block's output structure."""

    def __init__(self, tuple_output: bool = False) -> None:
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return (x,) if self.tuple_output else x


def remove_blocks(model: nn.Module, names: list[str], tuple_output: dict[str, bool] | None = None
                  ) -> dict[str, nn.Module]:
    """Replace each named block by `RemovedBlock`; returns the removed modules (for undo)."""
    removed = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        removed[name] = parent.get_submodule(attr)
        setattr(parent, attr, RemovedBlock((tuple_output or {}).get(name, False)))
    return removed


@dataclass
class BlockRemoval:
    """One application of depth pruning, for plans and an exact undo."""

    tuple_output: dict[str, bool]  # block name -> whether its Skip returns a 1-tuple
    shapes: dict[str, tuple[int, ...]]  # the removed tensors (full names) -> shape then
    removed: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @property
    def modules(self) -> list[str]:
        return list(self.tuple_output)


def remove_blocks_recorded(model: nn.Module, tuple_output: dict[str, bool]) -> BlockRemoval:
    """`remove_blocks` for ``tuple_output``'s names, returning what `restore_blocks` needs."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in tuple_output:
        block = model.get_submodule(name)
        for sub, t in [*block.named_parameters(remove_duplicate=False),
                       *block.named_buffers(remove_duplicate=False)]:
            shapes[f"{name}.{sub}"] = tuple(t.shape)
    removed = remove_blocks(model, list(tuple_output), tuple_output)
    return BlockRemoval(dict(tuple_output), shapes, removed)


def restore_blocks(model: nn.Module, record: BlockRemoval) -> None:
    """Put the removed modules back (the exact objects)."""
    for name, module in record.removed.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
