"""Remove atoms (channels, heads, head dims) from a model, in place, all or nothing."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from .fixups.attention import patch_attention
from .fixups.configs import config_field
from .fixups.patch import PatchInfo, patch_module, resize_tensor
from .fixups.scoped import patch_scoped_widths
from .fixups.widths import patch_widths
from .transaction import transaction


class PruneError(ValueError):
    """A pruning request that cannot be applied (bad group, axis or index)."""


@dataclass
class Removal:
    """Indices to remove, per group and axis (positions in the axis' canonical order)."""

    picks: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def add(self, group: int, axis: int, indices: list[int]) -> None:
        cur = self.picks.setdefault((group, axis), [])
        seen = set(cur)  # a set: a 7B model's widths make list membership quadratic
        for i in indices:
            if i not in seen:
                seen.add(i)
                cur.append(i)

    def __bool__(self) -> bool:
        return any(self.picks.values())


def removed_atoms(coupling: Coupling, removal: Removal) -> np.ndarray:
    """Validate a removal against the coupling and return the atom classes it removes."""
    atoms: list[np.ndarray] = []
    for (gid, axis), idx in removal.picks.items():
        if not 0 <= gid < len(coupling.groups):
            raise PruneError(f"group {gid} does not exist (the model has "
                             f"{len(coupling.groups)} groups)")
        group = coupling.groups[gid]
        if not 0 <= axis < len(group.axes):
            raise PruneError(f"group {gid} has no axis {axis}")
        ax = group.axes[axis]
        if idx and not ax.prunable:
            raise PruneError(f"group {gid} axis {axis} ({ax.role}) is not prunable: {ax.reason}")
        arr = np.asarray(sorted(set(idx)), dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= ax.size):
            raise PruneError(f"index out of range for group {gid} axis {axis} of size {ax.size}")
        if len(arr) >= ax.size:
            raise PruneError(f"removing all {ax.size} indices of group {gid} axis {axis} "
                             f"would delete the layer; keep at least one")
        atoms.append(coupling.family_atoms[ax.family][arr])
    return np.concatenate(atoms) if atoms else np.zeros(0, np.int64)


@dataclass
class Applied:
    """What an application changed: tensor shapes and patched attributes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # name -> (before, after)
    attributes: dict[str, dict[str, list[object]]]  # module -> attr -> [old, new]
    keeps: dict[tuple[str, int], list[int]]  # (tensor name, dim) -> indices kept
    # the replaced tensor objects, for an exact undo (not part of plans); None: a parameter
    # that did not exist (a bias created by compensation)
    previous: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False,
                                                     compare=False)
    # constants the config derives, folded into the weights after the cut so that
    # ``type(model)(model.config)`` computes the same function (`fixups.fold.fold_into`):
    # (module, attr) -> [old, new]; the scaled tensors' old objects are in ``previous``
    constants: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # module -> the config object it held before it was given its own copy
    # (`fixups.configs`; its fields are in ``attributes`` as ``config.<field>``), for an
    # undo that puts the shared object itself back (not part of plans)
    configs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def apply_removal(model: nn.Module, coupling: Coupling, removal: Removal) -> Applied:
    """Shrink every member parameter/buffer of the removed atoms and patch modules.

    The new tensors are computed first; the model is changed only when every one of them
    could be built, and a failure while swapping them in or patching attributes puts the
    model back exactly as it was (`explorer.prune.transaction`).
    """
    dead = removed_atoms(coupling, removal)
    keeps = coupling.keep_indices(dead)
    per_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for (name, dim), kept in keeps.items():
        per_tensor.setdefault(name, {})[dim] = torch.as_tensor(kept, dtype=torch.long)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    new: dict[str, torch.Tensor] = {}
    for name, keep in per_tensor.items():
        src = params.get(name, buffers.get(name))
        if src is None:
            raise PruneError(f"the model has no parameter or buffer '{name}'")
        new[name] = resize_tensor(src, keep)
    with transaction(model):
        return _commit(model, coupling, removal, dead, keeps, new, params, buffers)


def _commit(model: nn.Module, coupling: Coupling, removal: Removal, dead: np.ndarray,
            keeps: dict[tuple[str, int], np.ndarray], new: dict[str, torch.Tensor],
            params: Mapping[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> Applied:
    """Swap the resized tensors in and patch modules (inside `apply_removal`'s transaction)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    previous: dict[str, torch.Tensor | None] = {}
    touched: set[str] = set()
    for name, tensor in new.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        previous[name] = old
        shapes[name] = (tuple(old.shape), tuple(tensor.shape))
        if isinstance(old, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = tensor
        touched.add(owner_name)
    touched |= {n.rpartition('.')[0] for n in _retie(model, params, buffers, previous)}
    _shadow_buffers(model, keeps, buffers, previous, shapes)
    attributes: dict[str, dict[str, list[object]]] = {}
    for mod_name in sorted(touched | set(coupling.group_axes)):
        module = model.get_submodule(mod_name)
        info = PatchInfo()
        ids = coupling.group_axes.get(mod_name)
        if ids is not None:
            info.groups = coupling.kept_count(ids, dead)
        patch_module(module, info)
        if info.changed:
            attributes[mod_name] = dict(info.changed)
    removed_counts: dict[int, dict[int, int]] = {}
    for (gid, axis), idx in removal.picks.items():
        if idx:
            removed_counts.setdefault(gid, {})[axis] = len(set(idx))
    configs: dict[str, Any] = {}
    for name, log in patch_attention(model, coupling, removed_counts, keeps, configs,
                                     dead).items():
        attributes.setdefault(name, {}).update(log)
    for name, log in patch_widths(model, shapes, attributes).items():
        attributes.setdefault(name, {}).update(log)
    for name, log in patch_scoped_widths(model, coupling, dead, attributes).items():
        attributes.setdefault(name, {}).update(log)
    return Applied(shapes, attributes, {k: v.tolist() for k, v in keeps.items()}, previous,
                   configs=configs)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Put ``tensor`` in place of the parameter (if it is one) or buffer called ``name``.

    None puts back an absent parameter (such as ``bias=False``).
    """
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if tensor is None or isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner._buffers[attr] = tensor


def undo(model: nn.Module, applied: Applied) -> None:
    """Put back the exact tensors, attribute values and config objects an application
    replaced."""
    for name, tensor in applied.previous.items():
        set_tensor(model, name, tensor)
    for mod_name, attrs in applied.attributes.items():
        module = model.get_submodule(mod_name)
        for attr, (old, _new) in attrs.items():
            if config_field(attr) is None:  # a config's field: its object is put back below
                setattr(module, attr, old)
    for mod_name, config in applied.configs.items():
        setattr(model.get_submodule(mod_name), "config", config)  # noqa: B010 - not a tensor
    for (mod_name, attr), (old, _new) in applied.constants.items():
        setattr(model.get_submodule(mod_name), attr, old)


def _shadow_buffers(model: nn.Module, keeps: dict[tuple[str, int], np.ndarray],
                    buffers: dict[str, torch.Tensor], previous: dict[str, torch.Tensor | None],
                    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """``original_<name>`` buffers that the forward never read follow ``<name>``.

    Rotary embeddings keep ``original_inv_freq`` beside ``inv_freq`` to restore it after
    dynamic scaling; it is not in the trace, but it must keep the same frequencies.
    """
    for (name, dim), keep in keeps.items():
        owner, _, attr = name.rpartition(".")
        shadow = f"{owner}.original_{attr}" if owner else f"original_{attr}"
        src = buffers.get(shadow)
        before = previous.get(name, src)
        if src is None or shadow in previous or before is None or src.shape != before.shape:
            continue
        module = model.get_submodule(owner)
        previous[shadow] = src
        new = resize_tensor(src, {dim: torch.as_tensor(keep, dtype=torch.long)})
        module._buffers[f"original_{attr}"] = new
        shapes[shadow] = (tuple(src.shape), tuple(new.shape))


def _retie(model: nn.Module, params: Mapping[str, torch.Tensor],
           buffers: Mapping[str, torch.Tensor],
           previous: dict[str, torch.Tensor | None]) -> list[str]:
    """Parameters that were one tensor under several names (tied weights) stay tied.

    Returns the names that were re-pointed (their modules need their attributes patched).
    """
    retied: list[str] = []
    by_id: dict[int, list[str]] = {}
    for name, p in {**params, **buffers}.items():
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        if len(names) < 2:
            continue
        first_owner, _, first_attr = names[0].rpartition(".")
        src = getattr(model.get_submodule(first_owner), first_attr)
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            mod = model.get_submodule(owner)
            if getattr(mod, attr) is not src:
                previous.setdefault(other, getattr(mod, attr))
                retied.append(other)
            if isinstance(src, nn.Parameter):
                mod._parameters[attr] = src
            else:
                mod._buffers[attr] = src
    return retied
