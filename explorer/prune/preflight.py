"""Try a pruning on a weightless copy of the model before touching the real one."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.ir import Graph
from ..graph.metrics import count_params
from ..graph.tracer import TraceError, trace, traceback_location
from ..graph.walk import tensor_leaves, to_device
from .removal import PruneError, Removal, apply_removal


@dataclass
class Verdict:
    """The result of running a pruned copy."""

    ok: bool
    module: str = ""
    location: str = ""
    error: str = ""
    output_shapes: list[tuple[int, ...]] | None = None
    graph: Graph | None = None
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "module": self.module, "location": self.location,
                "error": self.error}


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on ``meta`` (no weight memory)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    for t in _attribute_tensors(model):
        memo.setdefault(id(t), torch.empty_like(t, device="meta"))
    return copy.deepcopy(model, memo)


def clone_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copes with non-leaf tensors cached in module attributes
    (attention-bias caches, weight-norm results), which deepcopy refuses."""
    memo: dict[int, Any] = {}
    for t in _attribute_tensors(model):
        if t.grad_fn is not None:
            memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _attribute_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors held in module attributes (also inside dicts and lists), not params/buffers."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                found += [t for _p, t in tensor_leaves(value, max_depth=3)
                          if not isinstance(t, nn.Parameter)]
    return found


class Preflight:
    """Runs removals on copies of one model; decides once whether ``meta`` works for it."""

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...],
                 coupling: Coupling) -> None:
        self.model = model
        self.inputs = example_inputs
        self.coupling = coupling
        self.expected = [tuple(v.shape) for v in
                         (coupling.graph.values[o] for o in coupling.graph.outputs)]
        self.device = "meta"  # until a failure shows the unpruned model cannot run on meta
        self._meta_checked = False

    def _meta_works(self) -> bool:
        """Whether the unpruned model runs on meta (checked once, after a first failure)."""
        if not self._meta_checked:
            self._meta_checked = True
            try:
                trace(meta_copy(self.model), to_device(self.inputs, "meta"))
            except TraceError:
                self.device = "cpu"
        return self.device == "meta"

    def _copy(self) -> nn.Module:
        return meta_copy(self.model) if self.device == "meta" else clone_model(self.model)

    def check(self, removal: Removal) -> Verdict:
        """Apply ``removal`` to a fresh copy and run the forward; never touches the model."""
        verdict = self._check(removal)
        if not verdict.ok and self.device == "meta" and not self._meta_works():
            verdict = self._check(removal)  # the model needs real values: retry on cpu
        return verdict

    def _check(self, removal: Removal) -> Verdict:
        model = self._copy()
        try:
            apply_removal(model, self.coupling, removal)
        except PruneError as exc:
            return Verdict(False, error=str(exc))
        return forward_check(model, to_device(self.inputs, self.device), self.expected)


def forward_check(model: nn.Module, inputs: tuple[Any, ...],
                  expected: list[tuple[int, ...]] | None) -> Verdict:
    """Trace ``model`` on ``inputs``; ok when it runs and (if given) the output shapes match.

    The one forward check of the package: pre-flight copies, pruned models after a step,
    the app's export check and the CLI's replay all go through it. The verdict carries the
    traced graph, so a caller that needs it does not run the model twice.
    """
    try:
        graph = trace(model, inputs)
    except TraceError as exc:
        cause = exc.__cause__ or exc
        return Verdict(False, module=exc.module, location=traceback_location(cause),
                       error=str(cause) or type(cause).__name__)
    shapes = [tuple(graph.values[o].shape) for o in graph.outputs]
    params = count_params(model)
    if expected is not None and shapes != expected:
        return Verdict(False, error=f"output shapes changed: {expected} -> {shapes}",
                       output_shapes=shapes, graph=graph, params=params)
    return Verdict(True, output_shapes=shapes, graph=graph, params=params)


__all__ = ["Preflight", "Verdict", "clone_model", "forward_check", "meta_copy", "tensor_leaves",
           "to_device"]
