"""Weights of a pruned export loaded into a model: the plan replayed, then every tensor
checked (keys, shapes, dtypes) before any is copied. No pickle is read.

The one home of reading a pruned folder's weights, for `explorer.io.export.load_pruned` and
for ``hf:<folder>`` of a pruned checkpoint (`explorer.io.specs._pruned_folder`); it imports no
model loader, so the loaders can use it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..prune.transaction import transaction
from ..prune.validate import nonfinite_text, nonfinite_weights
from .names import checkpoint_names, dropped_on_load
from .paths import shard_files
from .plan import Plan

__all__ = ["ExportError", "load_into", "read_weights"]


class ExportError(ValueError):
    """An export or reload that cannot be done as asked."""


def read_weights(weights: Path, index: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` (one file) or, when it is absent, of the shards ``index``
    names (only shards inside its folder)."""
    return _read_safetensors(weights) if weights.is_file() else _read_shards(index)


def load_into(model: nn.Module, folder: Path, plan: Plan, state: dict[str, torch.Tensor],
              weights: Path, inputs: Sequence[Any] | None = None) -> nn.Module:
    """``plan`` replayed on the unpruned ``model`` and ``state`` loaded into it, all or
    nothing; a warning when the weights are not finite. Returns the model in eval mode.

    Raises:
        explorer.PlanError: the plan does not fit the model.
        ExportError: the weights do not fit the replayed model.
    """
    with transaction(model):
        plan.apply(model, example_inputs=inputs)
        renamed = checkpoint_names(model, state).renamed  # a streamed replay keeps
        dropped = dropped_on_load(model, state)  # the checkpoint's names and extra buffers
        state = {renamed.get(n, n): t for n, t in state.items() if n not in dropped}
        _add_created_biases(model, state)
        _load_checked(model, state, weights)
    found = nonfinite_weights(model)
    if found:
        warnings.warn(f"the weights in '{folder}' are not finite: {nonfinite_text(found)}; "
                      "pruning refuses them", RuntimeWarning, stacklevel=2)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"'{path}' is not a readable safetensors file "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards an index names (the model is being built in memory); only
    shards inside the index's folder (`explorer.io.paths.shard_files`)."""
    state: dict[str, torch.Tensor] = {}
    for part in shard_files(index, ExportError).values():
        state.update(_read_safetensors(part))
    return state


_BIASED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose forward reads .bias


def _add_created_biases(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give a bias-less layer the bias the weights file holds for it: `bias` compensation
    creates one where the original layer had none (a plan records cuts, not new tensors)."""
    for name, tensor in state.items():
        owner, _, attr = name.rpartition(".")
        if attr != "bias" or not owner:
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue  # not a module of this model: `_load_checked` names it
        if isinstance(module, _BIASED) and module.bias is None and tensor.dim() == 1 and \
                tensor.shape[0] == module.weight.shape[0]:
            module.bias = nn.Parameter(torch.zeros_like(tensor, dtype=module.weight.dtype,
                                                        device=module.weight.device),
                                       requires_grad=module.weight.requires_grad)


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` into ``model`` after checking every key, shape and dtype (so no copy
    can fail half way). Tied tensors need one of their names in the file."""
    expected = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, t in expected.items():
        by_tensor.setdefault(id(t), []).append(name)
    unexpected = sorted(set(state) - set(expected))
    missing = [names[0] for names in by_tensor.values() if not any(n in state for n in names)]
    bad = [f"{n} {tuple(state[n].shape)}/{state[n].dtype} vs model "
           f"{tuple(expected[n].shape)}/{expected[n].dtype}" for n in state
           if n in expected and (state[n].shape != expected[n].shape
                                 or state[n].dtype != expected[n].dtype)]
    for label, names in (("unexpected tensors", unexpected), ("missing tensors", missing),
                         ("mismatched tensors", bad)):
        if names:
            raise ExportError(f"weights '{path}' do not fit the replayed model: {label} "
                              f"({len(names)}): {', '.join(names[:3])}"
                              f"{' ...' if len(names) > 3 else ''}")
    with torch.no_grad():
        for names in by_tensor.values():
            src = next(state[n] for n in names if n in state)
            expected[names[0]].copy_(src)
