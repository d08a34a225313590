"""Try a pruning on a weightless copy of the model before touching the real one."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.collector import paused
from ..graph.ir import Graph
from ..graph.metrics import count_params
from ..graph.tracer import TraceError, trace
from ..graph.walk import tensor_leaves, to_device
from .fixups.reads import derived_widths
from .removal import Applied, PruneError, Removal, apply_removal


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
    return copy.deepcopy(model, _detached(model))


def _detached(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo standing detached copies in for the non-leaf tensors cached in
    module attributes (deepcopy refuses a tensor with a ``grad_fn``)."""
    return {id(t): t.detach().clone() for t in _attribute_tensors(model)
            if t.grad_fn is not None}


def shared_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules and attributes whose parameters and buffers share the
    model's tensors (no weight memory): it stays the model as it was as long as tensors are
    replaced, never written in place, which is how every cut, refit and undo here changes a
    model (`explorer.quality.original.Original` checks it)."""
    memo = _detached(model)
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach()
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


# Full forwards on a real device (not meta) that one `Preflight` runs at most: a model that
# cannot run on meta (detection: nonzero, nms) costs a real forward per check.
MAX_FORWARDS = 24


class Preflight:
    """Runs removals on copies of one model; decides once whether ``meta`` works for it.

    Output shapes are compared only on dims that do not depend on the data (the number of
    detections does); `notes` names the dims left out. At most ``max_forwards`` checks run
    on a real device; later ones answer "not checked" without running.
    """

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...],
                 coupling: Coupling, max_forwards: int = MAX_FORWARDS) -> None:
        self.model = model
        self.inputs = example_inputs
        self.coupling = coupling
        self.expected = [tuple(v.shape) for v in
                         (coupling.graph.values[o] for o in coupling.graph.outputs)]
        self.dynamic = data_dependent_dims(coupling)
        self.notes = _dynamic_notes(coupling, self.dynamic)
        self.device = "meta"  # until a failure shows the unpruned model cannot run on meta
        self.max_forwards = max_forwards
        self.forwards = 0  # checks run on a real device so far
        self._meta_checked = False

    def same_shapes(self, shapes: list[tuple[int, ...]]) -> bool:
        """Whether output ``shapes`` equal the unpruned ones on every data-independent dim."""
        return same_shapes(shapes, self.expected, self.dynamic)

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
        with paused():  # the copy is garbage after the check (`explorer.prune.collector`)
            verdict = self._check(removal)
            if not verdict.ok and self.device == "meta" and not self._meta_works():
                verdict = self._check(removal)  # the model needs real values: retry on cpu
        return verdict

    def _check(self, removal: Removal) -> Verdict:
        if self.device != "meta":
            if self.forwards >= self.max_forwards:
                return Verdict(False, error=f"not checked: the pre-flight budget of "
                                            f"{self.max_forwards} full forwards is spent "
                                            f"(left unpruned to be safe)")
            self.forwards += 1
        model = self._copy()
        try:
            applied = apply_removal(model, self.coupling, removal)
        except PruneError as exc:
            return Verdict(False, error=str(exc))
        stale = derived_stale(model, applied)
        if stale is not None:
            return stale
        return forward_check(model, to_device(self.inputs, self.device), self.expected,
                             self.dynamic)


def derived_stale(model: nn.Module, applied: Applied) -> Verdict | None:
    """A failing verdict when a module the cut changed derives a head width in its forward
    from its config and a head count the cut changed (``self.config.hidden_size //
    self.num_heads``, `fixups.reads.derived_widths`): the value it computes no longer is
    the head width, and no shape check sees it (a scale, a position table's width).
    None when there is none."""
    for name, changes in applied.attributes.items():
        module = model.get_submodule(name)
        for found in derived_widths(module):
            changed = [c for c in found.counts if c in changes]
            if not changed:
                continue
            old, new = changes[changed[0]]
            return Verdict(False, module=name, location=found.where, error=(
                f"{type(module).__name__} derives a head width from its config, "
                f"`{found.code}`, and the cut changes {changed[0]} {old} -> {new}: the value "
                f"would no longer be the head width, though every shape still fits"))
    return None


def same_shapes(shapes: list[tuple[int, ...]], expected: list[tuple[int, ...]],
                dynamic: list[tuple[bool, ...]] | None = None) -> bool:
    """Whether output ``shapes`` equal ``expected`` on every dim not marked data-dependent."""
    if len(shapes) != len(expected):
        return False
    flags = dynamic if dynamic is not None else [(False,) * len(w) for w in expected]
    for got, want, dyn in zip(shapes, expected, flags, strict=True):
        if len(got) != len(want) or any(g != w for g, w, d in zip(got, want, dyn, strict=True)
                                        if not d):
            return False
    return True


def forward_check(model: nn.Module, inputs: tuple[Any, ...],
                  expected: list[tuple[int, ...]] | None,
                  dynamic: list[tuple[bool, ...]] | None = None) -> Verdict:
    """Trace ``model`` on ``inputs``; ok when it runs and (if given) the output shapes match.

    The one forward check of the package: pre-flight copies, pruned models after a step,
    the app's export check and the CLI's replay all go through it. Dims flagged in
    ``dynamic`` (sizes made by the data, such as a number of detections) are not compared.
    The verdict carries the traced graph, so a caller that needs it does not run the model
    twice.
    """
    try:
        graph = trace(model, inputs)
    except TraceError as exc:
        cause = exc.__cause__ or exc
        return Verdict(False, module=exc.module, location=exc.location,
                       error=str(cause) or type(cause).__name__)
    shapes = [tuple(graph.values[o].shape) for o in graph.outputs]
    params = count_params(model)
    if expected is not None and not same_shapes(shapes, expected, dynamic):
        return Verdict(False, error=f"output shapes changed: {expected} -> {shapes}",
                       output_shapes=shapes, graph=graph, params=params)
    return Verdict(True, output_shapes=shapes, graph=graph, params=params)


def data_dependent_dims(coupling: Coupling) -> list[tuple[bool, ...]]:
    """Per model output, per dim: whether its size comes from the data.

    Sizes made by ops whose output shape depends on values (``nonzero``, boolean
    ``index``, ``unique``: ATen's ``dynamic_output_shape`` tag) or by ops with no coupling
    rule (torchvision's ``nms``) are followed to the outputs through the element ids the
    coupling rules gave every dim (slices, gathers and concatenations keep them).
    """
    graph = coupling.graph
    res = coupling.res
    def atoms(vid: int) -> list[np.ndarray]:
        return [a[a >= 0] for a in (res.atoms_matrix(ids).ravel()
                                    for ids in coupling.value_dims(vid) if len(ids))]

    seeds: list[np.ndarray] = []
    for node in graph.ops:
        if torch.Tag.dynamic_output_shape in node.op.tags or node.name in coupling.unknown_ops:
            inputs = [a for vid in graph.tensor_ids((node.args, node.kwargs)) for a in atoms(vid)]
            known = np.concatenate(inputs) if inputs else np.zeros(0, np.int64)
            for vid in node.outputs:
                if vid is not None:  # dims the op made, not ones it passed through
                    seeds.extend(a for a in atoms(vid) if not np.isin(a, known).all())
    tainted = np.unique(np.concatenate(seeds)) if seeds else np.zeros(0, np.int64)
    out: list[tuple[bool, ...]] = []
    for vid in graph.outputs:
        dims = coupling.value_dims(vid)
        flags = []
        for ids in dims:  # an empty dim has no ids to follow: only data makes one empty
            a = res.atoms_matrix(ids).ravel() if len(ids) else np.zeros(0, np.int64)
            flags.append(not len(ids) or bool(np.isin(a[a >= 0], tainted).any()))
        shape = graph.values[vid].shape
        out.append(tuple(flags) if len(flags) == len(shape) else (False,) * len(shape))
    return out


def _dynamic_notes(coupling: Coupling, dynamic: list[tuple[bool, ...]]) -> list[str]:
    """What the shape comparison leaves out, for the step report."""
    graph = coupling.graph
    notes = []
    for i, (vid, flags) in enumerate(zip(graph.outputs, dynamic, strict=True)):
        dims = [str(d) for d, f in enumerate(flags) if f]
        if dims:
            shape = list(graph.values[vid].shape)
            notes.append(f"output {i} {shape}: dim {', '.join(dims)} depends on the data (a "
                         f"number of detections or selected items), so the pre-flight does "
                         f"not compare it")
    return notes


__all__ = ["Preflight", "Verdict", "clone_model", "data_dependent_dims", "forward_check",
           "meta_copy", "same_shapes", "tensor_leaves", "to_device"]
