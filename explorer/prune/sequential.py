"""Data-aware importance for models larger than memory: one decoder layer at a time.

The sequential calibration of SparseGPT and Wanda, on accelerate's big-model machinery:

1. `load_offloaded` builds the model on ``meta`` (``init_empty_weights``) and places it with
   ``load_checkpoint_and_dispatch``: a ``device_map`` from ``max_memory`` puts what fits on
   the GPUs or CPU and offloads the rest to CPU or disk. The same code serves one GPU,
   several GPUs, or a CPU with a memory cap.
2. `sequential_criterion` runs the calibration batches up to the first decoder layer and
   keeps the activations that enter it. Then, for each decoder layer in turn, it loads the
   layer's weights once (offloaded weights come back for the whole layer, not per batch),
   runs every kept batch through it while hooks record the per-channel statistics of each
   consumer's inputs, turns them into scores with the criterion's own code
   (`Activation.add_statistics`, the function the in-memory path uses), reduces them to the
   per-channel sums that group scoring reads, offloads the layer and moves on with its
   outputs. The layers after the last decoder layer (final norm, LM head) are run by the
   model's own forward with the decoder layers stood in by their recorded outputs.

Peak memory: one decoder layer's weights, the kept activations, and per-channel vectors.
(On glibc, run with ``MALLOC_MMAP_THRESHOLD_=1048576``: otherwise the allocator keeps freed
layer buffers in its heap and the resident set grows layer after layer without a leak.)
The scores equal the in-memory ones: the same modules see the same inputs in the same
order, and the same functions reduce them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import Calibration
from .importance import Activation, Criterion, input_norm_hooks, make

__all__ = ["SequentialError", "Offloaded", "load_offloaded", "decoder_layers",
           "sequential_criterion"]

SEQUENTIAL_CRITERIA = ("activation", "wanda")  # criteria with per-layer statistics


class SequentialError(ValueError):
    """A model or criterion the layer-by-layer path cannot handle."""


@dataclass
class Offloaded:
    """A model placed by accelerate, and where each part went."""

    model: nn.Module
    device_map: dict[str, Any] = field(default_factory=dict)  # module -> device or "disk"

    @property
    def offloaded(self) -> list[str]:
        """Modules whose weights wait on disk (or in CPU memory while GPUs compute)."""
        gpus = any(not isinstance(d, str) or d not in ("cpu", "disk")
                   for d in self.device_map.values())
        return [m for m, d in self.device_map.items() if d == "disk" or (gpus and d == "cpu")]


def load_offloaded(checkpoint: str | os.PathLike[str],
                   max_memory: Mapping[int | str, int | str] | None = None,
                   offload_folder: str | os.PathLike[str] | None = None,
                   dtype: torch.dtype | None = None) -> Offloaded:
    """A transformers checkpoint folder loaded within ``max_memory``, the rest offloaded.

    Args:
        checkpoint: a ``save_pretrained`` folder (safetensors, sharded or not).
        max_memory: per device caps, e.g. ``{0: "20GiB", "cpu": "60GiB"}`` or
            ``{"cpu": "2GiB"}``; what does not fit goes to ``offload_folder`` on disk.
            None: accelerate's default (what the devices have).
        offload_folder: where weights offloaded to disk are kept.
        dtype: load the weights as this dtype (default: as stored).

    Raises:
        SequentialError: the config names no transformers class.
    """
    import transformers
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    folder = Path(checkpoint)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise SequentialError(f"config of '{folder}' names architecture {arch!r}, which "
                              f"transformers does not have")
    config.use_cache = False  # calibration keeps no key/value cache
    with init_empty_weights():
        model = cls(config)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory) if max_memory
                                       else None, no_split_module_classes=no_split,
                                       dtype=dtype)
    if any(d == "disk" for d in device_map.values()) and offload_folder is None:
        raise SequentialError(f"the model does not fit in max_memory={dict(max_memory or {})}"
                              f"; pass offload_folder= for the weights that go to disk")
    model = load_checkpoint_and_dispatch(model, str(folder), device_map=device_map,
                                         offload_folder=None if offload_folder is None
                                         else str(offload_folder), dtype=dtype,
                                         no_split_module_classes=no_split)
    return Offloaded(model.eval(), dict(device_map))


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


def _first_inputs(model: nn.Module, first: nn.Module, calib: Calibration) -> list[Inputs]:
    """The inputs of ``first`` for every calibration batch (the model stops there)."""
    kept: list[Inputs] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kept.append((args, dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.batches:
            with contextlib.suppress(_Stop):
                model(*batch, **calib.kwargs)
    finally:
        handle.remove()
    if len(kept) != len(calib.batches):
        raise SequentialError("the model's forward did not reach its first decoder layer for "
                              "every calibration batch")
    return kept


def _with_hidden(inputs: Inputs, output: Any) -> Inputs:
    """The next layer's inputs: this layer's output in place of its hidden states."""
    hidden = output[0] if isinstance(output, tuple) else output
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def _resident(module: nn.Module) -> Iterator[None]:
    """Keep ``module``'s offloaded weights loaded for the whole block.

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
    recording the inputs of the consumers outside the layers (not those in ``skip``)."""
    inside = {id(m) for m in layers.modules()}
    outside = {n: m for n, m in model.named_modules() if id(m) not in inside and n not in skip}
    cursor = [0]
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorded(outputs, cursor)
    handles = [h for n, m in outside.items() if not list(m.children())  # each hooked once
               for h in input_norm_hooks(m, norms, n)]
    try:
        with torch.no_grad():
            for b, batch in enumerate(calib.batches):
                cursor[0] = b
                model(*batch, **calib.kwargs)
    finally:
        for h in handles:
            h.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return outside


def sequential_criterion(model: nn.Module, calib: Calibration,
                         criterion: str = "activation") -> Criterion:
    """Prepare ``criterion`` on ``model`` one decoder layer at a time (module docstring).

    Args:
        model: a transformers model, typically from `load_offloaded` (any placement).
        calib: calibration batches (as for the in-memory criteria).
        criterion: a criterion with per-layer statistics (`SEQUENTIAL_CRITERIA`).

    Returns:
        The prepared criterion: ``crit.scores(model, coupling, group)`` scores any group of
        a coupling traced on a ``meta`` copy of the same architecture.

    Raises:
        SequentialError: another criterion, or a model without repeated layers.
    """
    crit = make(criterion)
    if not isinstance(crit, Activation):
        raise SequentialError(f"criterion '{criterion}' has no layer-by-layer form; use one "
                              f"of {', '.join(SEQUENTIAL_CRITERIA)}")
    prefix, layers = decoder_layers(model)
    with torch.no_grad():
        head: dict[str, torch.Tensor] = {}
        inside = {id(m) for m in layers.modules()}
        handles = [h for n, m in model.named_modules()
                   if id(m) not in inside and not list(m.children())
                   for h in input_norm_hooks(m, head, n)]
        try:
            kept = _first_inputs(model, layers[0], calib)
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
                handles = input_norm_hooks(layer, norms, base)
                try:
                    outputs = [layer(*args, **kwargs) for args, kwargs in kept]
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
