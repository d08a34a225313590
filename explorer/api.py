"""The one-call entry point: trace a model and get its coupling groups."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .coupling.analyze import Coupling
from .coupling.groups import Group
from .coupling.heads import AttentionInfo, attention_modules
from .coupling.targets import default_targets, target_list, target_of
from .graph.ir import Graph
from .graph.metrics import count_macs
from .graph.tracer import trace as _trace
from .prune.depth import Block, residual_blocks
from .prune.validate import check_module_names


class ModelGraph:
    """A traced model: the ATen graph plus its exact channel-coupling groups."""

    def __init__(self, model: nn.Module, graph: Graph, coupling: Coupling) -> None:
        self.model = model
        self.graph = graph
        self.coupling = coupling

    def groups(self) -> list[Group]:
        return self.coupling.groups

    @property
    def num_ops(self) -> int:
        return len(self.graph.ops)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``trace --json`` and the app."""
        return {
            "seconds": round(self.graph.seconds, 4),
            "num_ops": self.num_ops,
            "num_groups": len(self.groups()),
            "num_prunable": sum(g.prunable for g in self.groups()),
            "macs": count_macs(self.graph),
            "unknown_ops": {k: sorted(set(v))[:5] for k, v in self.coupling.unknown_ops.items()},
            "conflicts": self.coupling.conflicts,
            "groups": [{**g.to_dict(), "target": target_of(g).value} for g in self.groups()],
            "default_targets": target_list(default_targets(self.graph)),
            "attention": [a.to_dict() for a in self.attention()],
            "blocks": [{"module": b.module, "params": b.params, "shape": list(b.shape)}
                       for b in self.blocks()],
        }

    def attention(self) -> list[AttentionInfo]:
        """Attention modules with q/k/v/out, heads, KV heads and divisibility."""
        return attention_modules(self.model, self.coupling)

    def blocks(self) -> list[Block]:
        """Residual blocks that can be removed whole (depth pruning)."""
        return residual_blocks(self.model, self.graph)


def trace(model: nn.Module, example_inputs: Any, ignored: Iterable[str] = ()) -> ModelGraph:
    """Trace ``model`` on ``example_inputs`` and compute its coupling groups.

    Args:
        model: any ``nn.Module`` on cpu or meta; left as it was found.
        example_inputs: a tensor or a tuple of positional arguments.
        ignored: module names whose output channels must not be pruned.

    Raises:
        ValueError: an ignored name is not a module of ``model`` (with close names).
    """
    ignored = list(ignored)
    check_module_names(model, ignored, "ignored")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph = _trace(model, inputs)
    return ModelGraph(model, graph, Coupling(graph, ignored=ignored))
