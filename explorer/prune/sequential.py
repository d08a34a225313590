"""Data-aware importance for models larger than memory: one decoder layer at a time.

The sequential calibration of SparseGPT and Wanda, on accelerate's big-model machinery:

1. `explorer.io.specs.load_offloaded` (the io loader, beside the other checkpoint loaders)
   places the model within ``max_memory`` with accelerate's big-model machinery (the rest
   offloaded to CPU or disk); any placement serves.
2. `sequential_criterion` runs the calibration batches up to the first decoder layer and
   keeps the activations that enter it. Then, for each decoder layer in turn, it loads the
   layer's weights once (offloaded weights come back for the whole layer, not per batch),
   runs every kept batch through it while hooks record the per-channel statistics of each
   consumer's inputs, turns them into scores with the criterion's own code
   (`Activation.add_statistics`, the function the in-memory path uses), reduces them to the
   per-channel sums that group scoring reads, offloads the layer and moves on with its
   outputs. The layers after the last decoder layer (final norm, LM head) are run by the
   model's own forward with the decoder layers stood in by their recorded outputs.

3. For the gradient criteria (``taylor``, ``fisher``: per-sample first-order terms
   ``sum over tokens of X_j * dL_s/dX_j`` at every weighted layer's input and output, see
   `explorer.prune.importance`), `sequential_criterion` runs a layer-wise backward:

   * forward, one layer at a time, keeping every decoder layer's input hidden states (in
     CPU memory, or in ``activations_folder`` on disk); the other inputs of a layer (attention
     mask, position embeddings) are the first layer's, as the model passes them;
   * the loss at the head: the model's own forward, each decoder layer standing in with its
     recorded output as a leaf that requires grad, then `compute_loss` (the loss of the
     in-memory criterion: the model's loss, ``ce``, ``output-norm`` or ``output-probe`` for
     ``fisher`` without a model loss); one `torch.autograd.grad` gives the terms of the
     layers after the decoder stack (final norm, LM head) and dL/d(last hidden);
   * the layers in reverse: load one, recompute its forward from its kept input with grad
     on, pull the incoming output gradient back through it (the same hooks as in memory
     record the terms of its layers, batch by batch, the token mask applied), keep dL/d(its
     input) and offload it;
   * the layers before the decoder stack (e.g. a projection after the embeddings) are run
     again up to the first decoder layer and receive its input gradient.

   Parameter ``.grad`` is never written (`torch.autograd.grad`); ``requires_grad`` flags,
   train/eval modes and buffers are restored (`calibrating`).

Peak memory, activation criteria: one decoder layer's weights, the kept activations (one
hidden-states tensor per batch and the first layer's other inputs), per-channel vectors.
Gradient criteria: one decoder layer's weights, that layer's autograd graph for one batch
(its weights' gradients are not kept), the first layer's other inputs, the output gradient
(one hidden-states tensor per batch), the per-sample terms (input and output channels x
samples of every weighted layer, as the in-memory criterion keeps them), and the input
hidden states of every decoder layer (layers x samples x tokens x hidden) in CPU memory, or
of one layer when ``activations_folder`` keeps them on disk; the LM head's pass holds one
batch's logits and their graph, as in memory. For a 70B Llama (80 layers, hidden 8192) and
128 samples of 2048 tokens in bf16, the kept hidden states are 344 GB (use
``activations_folder``: then 4.3 GB per layer), and the per-sample terms 13 M channels x 128
samples, 6.6 GB in float32 (kept so; each is read as float64 when a group is scored).
(On glibc, run with ``MALLOC_MMAP_THRESHOLD_=1048576``: otherwise the allocator keeps freed
layer buffers in its heap and the resident set grows layer after layer without a leak.)
The scores equal the in-memory ones: the same modules see the same inputs in the same
order, and the same functions reduce them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..graph.rng import kept_rng
from ..graph.walk import tensor_leaves
from .calibration import Calibration, batch_size, compute_loss
from .importance import (
    Activation,
    Criterion,
    _FirstOrder,
    _need,
    calibrating,
    criterion_names,
    first_order_hooks,
    input_norm_hooks,
    make,
    per_sample_terms,
)
from .validate import nonfinite_text, nonfinite_weights

__all__ = ["SequentialError", "decoder_layers", "sequential_criterion"]

# criteria with a layer-by-layer form: per-layer statistics, then per-layer gradients
SEQUENTIAL_CRITERIA = criterion_names(layerwise=True)


class SequentialError(ValueError):
    """A model or criterion the layer-by-layer path cannot handle."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the longest ``ModuleList`` whose items share one class.

    Raises:
        SequentialError: the model has no such list.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1 \
                and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise SequentialError(f"{type(model).__name__} has no list of repeated layers to "
                              f"calibrate one at a time")
    return best


class _Stop(Exception):  # noqa: N818 - control flow, never escapes `_first_inputs`
    """Raised by the hook that captures the inputs of the first decoder layer."""


Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # positional and keyword inputs of a layer


def _first_inputs(model: nn.Module, first: nn.Module, calib: Calibration,
                  current: list[torch.Tensor | None] | None = None) -> list[Inputs]:
    """The inputs of ``first`` for every calibration batch (the model stops there);
    ``current[0]``, when given, holds each batch's token mask while it runs."""
    kept: list[Inputs] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kept.append((args, dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.batches:
            if current is not None:
                current[0] = calib.token_mask(batch)
            with contextlib.suppress(_Stop):
                model(*batch, **calib.kwargs)
    finally:
        handle.remove()
    if len(kept) != len(calib.batches):
        raise SequentialError("the model's forward did not reach its first decoder layer for "
                              "every calibration batch")
    return kept


def _hidden_out(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple)."""
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor):
        raise SequentialError(f"a decoder layer returned {type(hidden).__name__}, not the "
                              f"hidden states as a tensor (alone or first of a tuple)")
    return hidden


def _hidden_in(inputs: Inputs) -> torch.Tensor:
    """The hidden states a decoder layer is given (first positional or ``hidden_states``)."""
    args, kwargs = inputs
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise SequentialError("the first decoder layer is not given its hidden states as "
                              "its first argument or as hidden_states=")
    return hidden


def _with_hidden(inputs: Inputs, output: Any) -> Inputs:
    """The next layer's inputs: this layer's output in place of its hidden states."""
    hidden = _hidden_out(output)
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def _resident(module: nn.Module) -> Iterator[None]:
    """Keep ``module``'s offloaded weights loaded for the whole block (refused when they
    hold NaN/Inf values).

    accelerate's hooks load an offloaded module's weights before each forward and drop them
    after; here they are loaded once, kept while every batch runs through the layer and its
    scores are taken, then offloaded again.
    """
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hooks: list[tuple[nn.Module, AlignDevicesHook]] = []
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        found = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        hooks += [(m, h) for h in found if isinstance(h, AlignDevicesHook) and h.offload]
    for m, h in hooks:
        h.pre_forward(m)
        h.offload = False
    try:
        found = nonfinite_weights(module)  # the Pruner sees only meta weights on this path
        if found:
            raise SequentialError(f"the checkpoint's weights are not finite: "
                                  f"{nonfinite_text(found)}; scores on them mean nothing, so "
                                  "nothing is pruned")
        yield
    finally:
        for m, h in hooks:
            h.offload = True
            h.post_forward(m, None)


def _reduce(crit: Criterion) -> None:
    """Keep only the per-dim sums group scoring reads (`Criterion.element`), not the
    per-weight saliency of a layer that is about to be offloaded."""
    for name in list(crit.saliency):
        for dim in range(crit.saliency[name].dim()):
            crit.element(name, dim)
        del crit.saliency[name]


class _Recorded(nn.Module):
    """Stands in for a decoder layer: returns that batch's recorded final-layer output."""

    def __init__(self, outputs: list[Any], cursor: list[int]) -> None:
        super().__init__()
        self.outputs, self.cursor = outputs, cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.cursor[0]]


def _run_outside(model: nn.Module, layers: nn.ModuleList, calib: Calibration,
                 outputs: list[Any], norms: dict[str, torch.Tensor],
                 skip: set[str]) -> dict[str, nn.Module]:
    """Forward the model with the decoder layers replaced by their recorded outputs,
    recording the inputs of the consumers outside the layers (not those in ``skip``; real
    tokens only, as in memory)."""
    inside = {id(m) for m in layers.modules()}
    outside = {n: m for n, m in model.named_modules() if id(m) not in inside and n not in skip}
    current: list[torch.Tensor | None] = [None]
    with _recorded(layers, outputs) as cursor:
        handles = [h for n, m in outside.items() if not list(m.children())  # hooked once
                   for h in input_norm_hooks(m, norms, n, current)]
        try:
            with torch.no_grad():
                for b, batch in enumerate(calib.batches):
                    cursor[0] = b
                    current[0] = calib.token_mask(batch)
                    model(*batch, **calib.kwargs)
        finally:
            for h in handles:
                h.remove()
    return outside


@contextlib.contextmanager
def _recorded(layers: nn.ModuleList, outputs: list[Any]) -> Iterator[list[int]]:
    """Every decoder layer stood in by `_Recorded` ``outputs`` (put back on leaving); yields
    the cursor naming the batch being run."""
    cursor = [0]
    originals = list(layers)
    try:
        for i in range(len(layers)):
            layers[i] = _Recorded(outputs, cursor)
        yield cursor
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def sequential_criterion(model: nn.Module, calib: Calibration,
                         criterion: str = "activation",
                         activations_folder: str | os.PathLike[str] | None = None,
                         ) -> Criterion:
    """Prepare ``criterion`` on ``model`` one decoder layer at a time (module docstring).

    Args:
        model: a transformers model, typically from `explorer.io.specs.load_offloaded`
            (any placement).
        calib: calibration batches (as for the in-memory criteria).
        criterion: a criterion with a layer-by-layer form (`SEQUENTIAL_CRITERIA`).
        activations_folder: gradient criteria only: keep each decoder layer's input hidden
            states in files there (read back in the backward walk) rather than in memory.

    Returns:
        The prepared criterion: ``crit.scores(model, coupling, group)`` scores any group of
        a coupling traced on a ``meta`` copy of the same architecture.

    Raises:
        SequentialError: another criterion, a model without repeated layers, or (gradient
            criteria) layers sharing modules or given inputs that depend on weights outside
            the decoder stack.
        ValueError: an unknown criterion, or no calibration.
    """
    with kept_rng(model):
        return _prepare(model, calib, criterion, activations_folder)


def _prepare(model: nn.Module, calib: Calibration, criterion: str,
             activations_folder: str | os.PathLike[str] | None) -> Criterion:
    """`sequential_criterion` inside `kept_rng`: the forwards draw from a fork."""
    crit = make(criterion)
    if isinstance(crit, _FirstOrder):
        calib = _need(calib)
        with calibrating(model), _grad_flags(model):
            crit.per_sample = _first_order(model, crit.loss_for(model, calib),
                                           activations_folder)
        crit._reduced, crit._consumers = {}, set()
        return crit
    if not isinstance(crit, Activation):
        raise SequentialError(f"criterion '{criterion}' has no layer-by-layer form; use one "
                              f"of {', '.join(SEQUENTIAL_CRITERIA)}")
    prefix, layers = decoder_layers(model)
    with torch.no_grad():
        head: dict[str, torch.Tensor] = {}
        inside = {id(m) for m in layers.modules()}
        # each batch's token mask while it runs: padding is left out, as in memory
        current: list[torch.Tensor | None] = [None]
        handles = [h for n, m in model.named_modules()
                   if id(m) not in inside and not list(m.children())
                   for h in input_norm_hooks(m, head, n, current)]
        try:
            kept = _first_inputs(model, layers[0], calib, current)
        finally:
            for h in handles:
                h.remove()
        crit.saliency, crit._reduced = {}, {}
        modules = dict(model.named_modules())
        with contextlib.ExitStack() as stack:  # the head's weights, for its scores
            for name in head:
                stack.enter_context(_resident(modules[name]))
            crit.add_statistics(modules, head)
            _reduce(crit)
        outputs: list[Any] = []
        for i, layer in enumerate(layers):
            norms: dict[str, torch.Tensor] = {}
            base = f"{prefix}.{i}"
            with _resident(layer):
                handles = input_norm_hooks(layer, norms, base, current)
                try:
                    outputs = []
                    for (args, kwargs), batch in zip(kept, calib.batches, strict=True):
                        current[0] = calib.token_mask(batch)
                        outputs.append(layer(*args, **kwargs))
                finally:
                    for h in handles:
                        h.remove()
                crit.add_statistics({".".join(filter(None, (base, n))): m
                                     for n, m in layer.named_modules()}, norms)
                _reduce(crit)
            kept = [_with_hidden(inp, out) for inp, out in zip(kept, outputs, strict=True)]
        tail: dict[str, torch.Tensor] = {}
        _run_outside(model, layers, calib, outputs, tail, skip=set(head))
        with contextlib.ExitStack() as stack:
            for name in tail:
                stack.enter_context(_resident(modules[name]))
            crit.add_statistics(modules, tail)
            _reduce(crit)
    return crit


# -- gradient criteria: a layer-wise backward (module docstring, point 3) --------------------

Terms = dict[tuple[str, int], torch.Tensor]  # (weight, dim) -> (samples, channels), one batch
Columns = dict[tuple[str, int], list[torch.Tensor]]  # the same, every batch in order


@contextlib.contextmanager
def _grad_flags(model: nn.Module) -> Iterator[None]:
    """Every floating parameter requires grad (as in the in-memory path); flags put back by
    name on exit (accelerate replaces an offloaded parameter each time it loads or drops it,
    carrying the flag of the one it replaces)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        yield
    finally:
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in saved and p.requires_grad != saved[n]:
                p.requires_grad_(saved[n])


class _Stash:
    """The input hidden states of every decoder layer (one tensor per batch), kept in CPU
    memory (not on the accelerator, whose memory then holds one layer's) or, given a folder,
    in one file per layer there (removed when read, and on exit)."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.folder = folder
        self.dir: Path | None = None
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.devices: dict[int, list[torch.device]] = {}

    def __enter__(self) -> _Stash:
        if self.folder is not None:
            import tempfile
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self.folder))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        self.devices[layer] = [h.device for h in hidden]
        on_cpu = [h.detach().cpu() for h in hidden]
        if self.dir is None:
            self.kept[layer] = on_cpu
        else:
            torch.save(on_cpu, self.dir / f"{layer}.pt")

    def get(self, layer: int) -> list[torch.Tensor]:
        if self.dir is None:
            hidden = self.kept.pop(layer)
        else:
            path = self.dir / f"{layer}.pt"
            hidden = torch.load(path, weights_only=True)
            path.unlink()
        return [h.to(d) for h, d in zip(hidden, self.devices.pop(layer), strict=True)]


def _collect(terms: Terms, columns: Columns) -> None:
    for key, t in terms.items():
        columns.setdefault(key, []).append(t)
    terms.clear()


def _check_unshared(layers: nn.ModuleList) -> None:
    """Each weighted module belongs to one decoder layer (its terms add up within a batch)."""
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for m in layer.modules():
            if owner.setdefault(id(m), i) != i:
                raise SequentialError(f"decoder layers {owner[id(m)]} and {i} share a "
                                      f"module; gradient criteria cannot be computed one "
                                      f"layer at a time on shared layers")


def _capture(model: nn.Module, first: nn.Module, calib: Calibration,
             current: list[torch.Tensor | None]) -> tuple[list[Inputs], bool]:
    """The first decoder layer's inputs (hidden states detached), and whether weighted
    layers ran before it on a path from the weights (their terms need a pass of their own).

    Raises:
        SequentialError: a layer input other than the hidden states depends on weights (its
            gradient would not reach them one layer at a time).
    """
    terms: Terms = {}
    seen: list[torch.Tensor] = []
    handles = first_order_hooks(model, terms, current, "", seen)
    try:
        with torch.enable_grad():
            kept = _first_inputs(model, first, calib)
    finally:
        for h in handles:
            h.remove()
    before = bool(seen)
    seen.clear()
    out: list[Inputs] = []
    for args, kwargs in kept:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for path, t in tensor_leaves((args[1:], rest), "inputs"):
            if t.requires_grad:
                raise SequentialError(f"decoder layer input {path} depends on weights outside "
                                      f"the decoder layers; gradient criteria cannot be "
                                      f"computed one layer at a time on this model")
        out.append(_with_hidden((args, kwargs), _hidden_in((args, kwargs)).detach()))
    return out, before


def _standing_in(outputs: list[Any], leaves: list[torch.Tensor]) -> list[Any]:
    """Each batch's last-layer output with its hidden states replaced by ``leaves``."""
    return [(leaf, *o[1:]) if isinstance(o, tuple) else leaf
            for o, leaf in zip(outputs, leaves, strict=True)]


def _head(model: nn.Module, layers: nn.ModuleList, calib: Calibration, last: list[Any],
          current: list[torch.Tensor | None], columns: Columns) -> list[torch.Tensor]:
    """The loss of every batch from the last decoder layer's outputs; records the terms of
    the layers after the decoder stack and returns dL/d(last hidden states) per batch."""
    leaves = [_hidden_out(o).detach().requires_grad_(True) for o in last]
    terms: Terms = {}
    seen: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    with _recorded(layers, _standing_in(last, leaves)) as cursor:
        handles = first_order_hooks(model, terms, current, "", seen)  # layers are stand-ins
        try:
            for b, batch in enumerate(calib.batches):
                cursor[0] = b
                current[0] = calib.token_mask(batch)
                seen.clear()
                label = calib.labels[b] if calib.labels else None
                with torch.enable_grad():
                    loss = compute_loss(model, batch, calib, label, seed=b)
                    got = torch.autograd.grad(loss, [leaves[b], *seen], allow_unused=True)
                if got[0] is None:
                    raise SequentialError("the calibration loss does not depend on the last "
                                          "decoder layer's output")
                grads.append(got[0])
                _collect(terms, columns)
        finally:
            for h in handles:
                h.remove()
    return grads


def _backward_layer(layer: nn.Module, name: str, kept: list[Inputs],
                    hidden: list[torch.Tensor], grads: list[torch.Tensor], calib: Calibration,
                    current: list[torch.Tensor | None], columns: Columns) -> None:
    """Recompute ``layer`` (weights loaded) from its kept inputs with grad on, pull each
    batch's output gradient back through it (recording its terms), and replace ``grads``
    by the gradients of its inputs."""
    terms: Terms = {}
    seen: list[torch.Tensor] = []
    handles = first_order_hooks(layer, terms, current, name, seen)
    try:
        for b, (inputs, batch) in enumerate(zip(kept, calib.batches, strict=True)):
            current[0] = calib.token_mask(batch)
            seen.clear()
            x = hidden[b].detach().requires_grad_(True)
            args, kwargs = _with_hidden(inputs, x)
            with torch.enable_grad():
                out = _hidden_out(layer(*args, **kwargs))
                got = torch.autograd.grad(out, [x, *seen], grad_outputs=grads[b].to(out.device),
                                          allow_unused=True)
            grads[b] = got[0] if got[0] is not None else torch.zeros_like(x)
            _collect(terms, columns)
    finally:
        for h in handles:
            h.remove()


def _before(model: nn.Module, first: nn.Module, calib: Calibration, grads: list[torch.Tensor],
            current: list[torch.Tensor | None], columns: Columns) -> None:
    """Terms of the weighted layers before the decoder stack: the model run again up to the
    first decoder layer, whose input gradient is pulled back through them."""
    captured: list[torch.Tensor] = []

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_hidden_in((args, kwargs)))
        raise _Stop

    terms: Terms = {}
    seen: list[torch.Tensor] = []
    handles = [first.register_forward_pre_hook(stop, with_kwargs=True),
               *first_order_hooks(model, terms, current, "", seen)]
    try:
        for b, batch in enumerate(calib.batches):
            current[0] = calib.token_mask(batch)
            seen.clear()
            captured.clear()
            with torch.enable_grad():
                with contextlib.suppress(_Stop):
                    model(*batch, **calib.kwargs)
                x = captured[0]
                if x.requires_grad and seen:
                    torch.autograd.grad(x, seen, grad_outputs=grads[b].to(x.device),
                                        allow_unused=True)
            _collect(terms, columns)
    finally:
        for h in handles:
            h.remove()


def _first_order(model: nn.Module, calib: Calibration,
                 activations_folder: str | os.PathLike[str] | None,
                 ) -> dict[tuple[str, int], np.ndarray]:
    """`importance._first_order` (the per-sample terms of ``taylor`` / ``fisher``) computed
    one decoder layer at a time (module docstring, point 3)."""
    prefix, layers = decoder_layers(model)
    _check_unshared(layers)
    current: list[torch.Tensor | None] = [None]
    columns: Columns = {}
    with _Stash(activations_folder) as stash:
        kept, before = _capture(model, layers[0], calib, current)
        hidden = [_hidden_in(inputs) for inputs in kept]
        last: list[Any] = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                stash.put(i, hidden)
                with _resident(layer):
                    last = [layer(*a, **k) for a, k in
                            (_with_hidden(inputs, h) for inputs, h in zip(kept, hidden,
                                                                          strict=True))]
                hidden = [_hidden_out(o) for o in last]
        del hidden
        grads = _head(model, layers, calib, last, current, columns)
        del last
        for i in reversed(range(len(layers))):
            hidden = stash.get(i)
            with _resident(layers[i]):
                _backward_layer(layers[i], f"{prefix}.{i}", kept, hidden, grads, calib,
                                current, columns)
            del hidden
        if before:
            _before(model, layers[0], calib, grads, current, columns)
    return per_sample_terms(columns, sum(batch_size(b) for b in calib.batches))
