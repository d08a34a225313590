"""Compensation: refit what removed channels fed into, from calibration activations.

Removing input channels ``R`` of a layer ``y = W x + b`` drops ``W[:, R] x_R`` from its
output. Two refits, from each consumer layer's inputs on the calibration data (padded tokens
left out):

* ``bias``: ``b += W[:, R] @ mean(x_R)``, the mean of what was dropped (in the unpruned
  model). Exact when the removed channels are constant on the data (dead or saturated
  units); a layer without a bias gets one where its forward reads ``self.bias`` (Linear,
  Conv).
* ``lstsq``: ridge least squares of the consumer's kept columns and bias (a layer without a
  bias is refit without one, so the refit model keeps its architecture: the same config
  describes it and a plan replays onto it). Consumers inside the model's repeated blocks
  (decoder or encoder layers; Linear, GPT-2's Conv1D) are refit **sequentially**
  (`explorer.prune.reconstruct`): block by block on the inputs the already cut and refit
  blocks below produce, against the original model's output, each choosing between the plain
  cut, ``bias`` and ridge fits by its error on calibration samples held out from the fit.
  Other consumers are refit one-shot on the unpruned model's inputs:
  ``[W' b'] = ([W b] G[:, K] + lam P) (G[K, K] + lam I)^-1`` with ``G`` the second moment
  of ``[x; 1]``, ``lam = ridge * mean(diag G[K, K])`` and ``P`` the ``bias`` solution, so the
  ridge pulls towards bias compensation rather than towards zero (others than Linear layers
  get ``bias``); the one-shot refits are kept only when they bring the model's outputs on the
  calibration data closer to the unpruned ones.

Before a head-dim cut, both first re-base the heads it cuts (`explorer.prune.rebase`): a
change of basis inside each head that keeps the function and moves the least energetic
dims of every head onto the cut indices (the cut removes the same indices from every head).

Both run inside the removal: the model is pruned and compensated, or left exactly as it was.
The replaced tensors go into the `Applied` record, so `undo` restores them too.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.walk import flat_floats
from .calibration import Calibration
from .importance import calibrating, calibration_pass, input_dim
from .rebase import head_axes, rebase
from .reconstruct import (
    Consumer,
    Reconstruction,
    affine,
    inside_blocks,
    kept_rows,
    reconstruct,
)
from .removal import Applied, Removal, apply_removal, removed_atoms, set_tensor, undo
from .sequential import SequentialError
from .trajectory import Trajectory

GUARD_BATCHES = 2  # calibration batches the end-to-end check compares outputs on


class Compensation(str, enum.Enum):
    """How to refit the consumers of removed channels."""

    BIAS = "bias"
    LSTSQ = "lstsq"


def compensation(value: str | Compensation | None) -> Compensation | None:
    """Parse a compensation name (None: no compensation)."""
    if value is None or isinstance(value, Compensation):
        return value
    try:
        return Compensation(value)
    except ValueError:
        raise ValueError(f"unknown compensation {value!r}; choose one of "
                         f"{[c.value for c in Compensation]} or None") from None


_BIAS_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # forward reads self.bias


@dataclass
class Target:
    """One consumer layer that loses input channels."""

    module: str
    weight: str  # qualified weight name
    in_dim: int
    kept: np.ndarray  # kept input indices (of the unpruned layer)
    removed: np.ndarray


@dataclass
class InputStats:
    """Statistics of a layer's inputs over the calibration data."""

    count: int  # tokens (or positions) seen
    total: torch.Tensor  # sum of x per input channel
    gram: torch.Tensor | None  # sum of [x; 1][x; 1]^T (lstsq only)


def cut_targets(model: nn.Module, keeps: Mapping[tuple[str, int], Sequence[int] | np.ndarray],
                sizes: Mapping[str, Sequence[int]] | None = None) -> list[Target]:
    """The consumer layers that keeping ``keeps`` ((tensor, dim) -> kept indices) cuts.

    Args:
        model: the model (its module types and ties; its weights may be cut already).
        keeps: kept indices per tensor dimension (`Applied.keeps`, say).
        sizes: the tensors' shapes before the cut, when ``model`` is cut already.
    """
    shared = _shared_weights(model)
    out: list[Target] = []
    for (name, dim), kept in sorted(keeps.items()):
        module_name, _, attr = name.rpartition(".")
        if attr != "weight" or name in shared:
            continue
        module = model.get_submodule(module_name)
        refits = isinstance(module, _BIAS_LAYERS) or affine(module) is not None
        if not refits or input_dim(module) != dim:
            continue
        size = sizes[name][dim] if sizes is not None else _weight(module).shape[dim]
        kept_arr = np.asarray(kept, dtype=np.int64)
        removed = np.setdiff1d(np.arange(size), kept_arr)
        if len(removed):
            out.append(Target(module_name, name, dim, kept_arr, removed))
    return out


def _shared_weights(model: nn.Module) -> set[str]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def input_stats(model: nn.Module, modules: list[str], calib: Calibration,
                gram: bool) -> dict[str, InputStats]:
    """Sums (and second moments) of the inputs of ``modules`` over the calibration data."""
    stats: dict[str, InputStats] = {}
    current: list[torch.Tensor | None] = [None]
    handles = [model.get_submodule(m).register_forward_pre_hook(
        _input_hook(m, stats, current, gram)) for m in modules]
    calibration_pass(model, calib, handles, current)
    return stats


def _input_hook(name: str, stats: dict[str, InputStats], current: list[torch.Tensor | None],
                gram: bool) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = _rows(module, args[0].detach().double(), current[0])
        g = None
        if gram:
            aug = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            g = aug.T @ aug
        old = stats.get(name)
        if old is not None:
            g = None if g is None or old.gram is None else old.gram + g
            stats[name] = InputStats(old.count + x.shape[0], old.total + x.sum(0), g)
        else:
            stats[name] = InputStats(x.shape[0], x.sum(0), g)
    return hook


def _rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(positions, channels): one row per token (real ones) or spatial position."""
    if affine(module) is not None:  # channels last (Linear, transformers' Conv1D)
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask].reshape(-1, x.shape[-1])
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def prune_and_compensate(model: nn.Module, coupling: Coupling, removal: Removal,
                         calib: Calibration, mode: Compensation | str | None,
                         ridge: float = 0.5,
                         stats: Mapping[str, InputStats] | None = None,
                         notes: list[str] | None = None,
                         trajectory: Trajectory | None = None) -> Applied:
    """`apply_removal`, then refit the consumers of the removed channels; all or nothing.

    Args:
        model: the model, pruned in place.
        coupling: its coupling (of the unpruned model).
        removal: what to remove.
        calib: calibration batches (their inputs to each consumer are measured before).
        mode: ``bias`` or ``lstsq``.
        ridge: the ridge strength relative to the mean input energy (``lstsq``).
        stats: `input_stats` of this (unpruned) model on ``calib``, measured once to prune
            it several ways; layers missing from it are measured here.
        notes: receives a line when the refit is dropped because it moved the model's
            outputs on the calibration data further from the unpruned ones than the plain
            cut does (the refit is kept only when it helps end to end).
        trajectory: the unpruned blocks' outputs recorded by a pass over ``calib``'s batches
            in `reconstruct.in_order` (the scoring pass), which the sequential refit then
            reads instead of running the original blocks again (`explorer.prune.trajectory`).

    Returns:
        The `Applied` record; its ``previous`` also holds the tensors compensation replaced
        (None for a bias it created), so `undo` reverts both.
    """
    kind = compensation(mode)
    if kind is None:
        return apply_removal(model, coupling, removal)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(f"compensation '{kind.value}' needs real weights, but the model is on "
                         f"the meta device; prune without it (--compensate none)")
    keeps = coupling.keep_indices(removed_atoms(coupling, removal))
    todo = cut_targets(model, keeps)
    if not todo and notes is not None:
        notes.append(f"compensation '{kind.value}' refit nothing: no layer that reads the "
                     f"removed channels is one it refits (Linear or convolution layers, "
                     f"weights not shared); the plain cut")
    gram = kind is Compensation.LSTSQ
    cache: list[list[torch.Tensor]] = []  # the unpruned outputs, measured when first needed

    def reference() -> list[torch.Tensor]:
        if not cache:
            cache.append(_outputs(model, calib))
        return cache[0]

    stats, rebased = _rebase_heads(model, coupling, removal, calib, reference, stats or {},
                                   notes)
    try:
        rec = _sequential(model, todo, calib, notes, trajectory, keeps) if gram \
            else Reconstruction()
        done = {f.module for f in rec.fits}
        todo = [t for t in todo if t.module not in done]  # the rest: one-shot, as before
        known = {k: v for k, v in stats.items() if not gram or v.gram is not None}
        missing = [t.module for t in todo if t.module not in known]
        stats = {**known, **(input_stats(model, missing, calib, gram) if missing else {})}
        original = {t.module: _dense(model.get_submodule(t.module)) for t in todo}
        if todo:
            reference()
        applied = apply_removal(model, coupling, removal)
    except BaseException:
        _put_back(model, rebased)  # the re-basing too: nothing of this call stays
        raise
    applied.previous.update(rebased)  # undo restores the weights from before the re-basing
    try:
        for name, tensor in sorted(rec.tensors.items()):
            _install(model, name, kept_rows(model, name, tensor, applied.keeps), applied)
        new: dict[str, torch.Tensor] = {}
        for t in todo:
            if t.module not in stats:  # not run on the calibration data: nothing to fit
                continue
            new.update(_refit(model, t, stats[t.module], original[t.module], kind, ridge,
                              applied.keeps))
        plain = {name: _param(model.get_submodule(name.rpartition(".")[0]),
                              name.rpartition(".")[2]) for name in new}
        for name, tensor in new.items():
            _install(model, name, tensor, applied)
        if new:
            _keep_if_better(model, calib, reference(), new, plain, kind, notes)
    except Exception:
        undo(model, applied)
        raise
    return applied


def _sequential(model: nn.Module, todo: list[Target], calib: Calibration,
                notes: list[str] | None, trajectory: Trajectory | None = None,
                keeps: Mapping[tuple[str, int], Sequence[int] | np.ndarray] | None = None
                ) -> Reconstruction:
    """`reconstruct` of the consumers inside the model's repeated blocks (none when
    it has no such blocks); its summary goes into ``notes``."""
    consumers = block_consumers(model, todo, keeps)
    if not consumers:
        return Reconstruction()
    try:
        rec = reconstruct(model, consumers, calib, trajectory=trajectory)
    except SequentialError:  # the forward does not reach the blocks: refit one-shot
        return Reconstruction()
    if notes is not None and rec.fits:
        notes.append(rec.summary())
    return rec


def block_consumers(model: nn.Module, todo: Sequence[Target],
                    keeps: Mapping[tuple[str, int], Sequence[int] | np.ndarray] | None = None
                    ) -> list[Consumer]:
    """The targets `reconstruct` refits: layers `reconstruct.affine` reads (Linear,
    transformers' Conv1D) inside the repeated blocks; with the cut's ``keeps``, each with
    its producers: the layers of its block whose output channels the cut keeps exactly as
    it keeps the consumer's inputs (an MLP's gate and up projections for its down
    projection), which `reconstruct` may run at the cut width."""
    inside = inside_blocks(model, [t.module for t in todo])
    rows: dict[int, list[tuple[str, np.ndarray]]] = {}  # block -> (layer, kept output rows)
    if keeps:
        for (name, dim), kept in keeps.items():
            module, _, attr = name.rpartition(".")
            if attr != "weight":
                continue
            where = inside_blocks(model, [module])
            form = affine(model.get_submodule(module)) if where else None
            if form is not None and form.out_dim == dim:
                rows.setdefault(where[module], []).append((module, np.asarray(kept)))
    return [Consumer(t.module, t.weight, t.kept, tuple(sorted(
        m for m, kept in rows.get(inside[t.module], [])
        if m != t.module and np.array_equal(kept, t.kept))))
        for t in todo if t.module in inside]


REBASE_TOLERANCE = 1e-8  # relative squared output change a re-basing may cause (rounding)


def _rebase_heads(model: nn.Module, coupling: Coupling, removal: Removal, calib: Calibration,
                  reference: Callable[[], list[torch.Tensor]], stats: Mapping[str, InputStats],
                  notes: list[str] | None) -> tuple[dict[str, InputStats],
                                                    dict[str, torch.Tensor]]:
    """Re-base the heads whose dims ``removal`` cuts (see `explorer.prune.rebase`).

    Returns:
        The input statistics in the new bases (an output projection's inputs change basis
        with its heads), and the parameters the re-basing replaced (empty: nothing done).
    """
    axes = head_axes(model, coupling, removal)
    out = dict(stats)
    if not axes:
        return out, {}
    writers = sorted({s.module for a in axes for s in a.sides if not s.columns})
    readers = sorted({s.module for a in axes for s in a.sides if s.columns})
    fresh = [m for m in writers + readers if m not in out or out[m].gram is None]
    out.update(input_stats(model, fresh, calib, gram=True) if fresh else {})
    # a layer the calibration data never ran has no moments: its heads are cut as they are
    axes = [a for a in axes if all(s.module in out and out[s.module].gram is not None
                                   for s in a.sides)]
    if not axes:
        return out, {}
    grams = {m: g / max(out[m].count, 1) for m in writers + readers
             if m in out and (g := out[m].gram) is not None}
    try:
        done = rebase(model, axes, grams)
    except (RuntimeError, KeyError, ValueError):  # e.g. a singular moment even with the ridge
        return out, {}
    moved = _deviation(_outputs(model, calib), reference())
    if moved > REBASE_TOLERANCE:
        _put_back(model, done.previous)
        if notes is not None:
            notes.append(f"head dims were cut without re-basing the heads: the re-based "
                         f"model's outputs moved (relative error {moved:.3g})")
        return out, {}
    for m, basis in done.input_bases.items():  # the output projection reads re-based dims
        old = out.pop(m)
        if old.gram is not None:  # (always: measured with moments above)
            out[m] = InputStats(old.count, basis[:-1, :-1] @ old.total,
                                basis @ old.gram @ basis.T)
    return out, done.previous


def _put_back(model: nn.Module, previous: Mapping[str, torch.Tensor | None]) -> None:
    for name, tensor in previous.items():
        set_tensor(model, name, tensor)


def _outputs(model: nn.Module, calib: Calibration) -> list[torch.Tensor]:
    """The model's floating outputs on the first `GUARD_BATCHES` calibration batches."""
    with torch.no_grad(), calibrating(model):
        return [flat_floats(model(*batch, **calib.kwargs))
                for batch in calib.batches[:GUARD_BATCHES]]


def _deviation(outs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative squared distance of ``outs`` to ``reference``."""
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(outs, reference, strict=True))
    return num / max(sum(float((r ** 2).sum()) for r in reference), 1e-30)


def _keep_if_better(model: nn.Module, calib: Calibration, reference: list[torch.Tensor],
                    new: Mapping[str, torch.Tensor], plain: Mapping[str, torch.Tensor | None],
                    kind: Compensation, notes: list[str] | None) -> None:
    """Keep the refit only when it brings the outputs closer to the unpruned model's.

    Each layer's refit is optimal for that layer on the calibration data, yet the model can
    still get worse (a mean carried by a few tokens, moved onto every token, then
    normalised); the end-to-end comparison catches it and keeps the plain cut instead.
    """
    with_refit = _deviation(_outputs(model, calib), reference)
    for name, tensor in plain.items():
        set_tensor(model, name, tensor)
    without = _deviation(_outputs(model, calib), reference)
    if with_refit <= without:
        for name, tensor in new.items():
            set_tensor(model, name, nn.Parameter(tensor.contiguous(),
                                                 requires_grad=_requires_grad(model, name)))
        if notes is not None:
            layers = len({n.rpartition(".")[0] for n in new})
            notes.append(f"compensation '{kind.value}' (one refit of {layers} layer(s) at "
                         f"once) kept: relative output error on the calibration data "
                         f"{without:.3g} without it, {with_refit:.3g} with it")
    elif notes is not None:
        notes.append(f"compensation '{kind.value}' was not kept: on the calibration data it "
                     f"moved the outputs further from the unpruned model's (relative error "
                     f"{with_refit:.3g} with it, {without:.3g} without)")


def _requires_grad(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rpartition(".")[0])
    return _weight(owner).requires_grad


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = _param(module, "bias")
    return _weight(module).detach().clone(), None if bias is None else bias.detach().clone()


def _param(module: nn.Module, attr: str) -> torch.Tensor | None:
    value = module._parameters.get(attr)
    return value if isinstance(value, torch.Tensor) else None


def _weight(module: nn.Module) -> torch.Tensor:
    weight = _param(module, "weight")
    if weight is None:
        raise ValueError(f"{type(module).__name__} has no weight parameter to refit")
    return weight


def _refit(model: nn.Module, t: Target, stats: InputStats,
           original: tuple[torch.Tensor, torch.Tensor | None], kind: Compensation,
           ridge: float, keeps: dict[tuple[str, int], list[int]]) -> dict[str, torch.Tensor]:
    """New (pruned-shape) weight and bias of one consumer."""
    module = model.get_submodule(t.module)
    weight, bias = original
    out_rows = keeps.get((t.weight, 0))  # Linear and Conv weights: dim 0 is the output
    bias_name = f"{t.module}.bias"
    if kind is Compensation.LSTSQ and isinstance(module, nn.Linear) and stats.gram is not None:
        w, b = _lstsq(weight.double(), bias, stats, t.kept, ridge)
        rows = torch.as_tensor(out_rows if out_rows is not None else range(w.shape[0]))
        dtype = _weight(module).dtype
        if bias is None:  # refit without a bias: the result keeps the layer's architecture
            return {t.weight: w[rows].to(dtype)}
        return {t.weight: w[rows].to(dtype), bias_name: b[rows].to(dtype)}
    mean = stats.total / max(stats.count, 1)
    removed = torch.as_tensor(t.removed)
    dropped = weight.double().index_select(t.in_dim, removed)
    if dropped.dim() > 2:  # conv: every kernel tap sees the mean (exact away from padding)
        dropped = dropped.sum(dim=list(range(2, dropped.dim())))
    shift = dropped @ mean[removed] if t.in_dim == 1 else dropped.T @ mean[removed]
    full = shift if bias is None else bias.double() + shift
    rows = torch.as_tensor(out_rows if out_rows is not None else range(full.shape[0]))
    return {bias_name: full[rows].to(_weight(module).dtype)}


def _lstsq(weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats,
           kept: np.ndarray, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge refit of [W b] on the kept inputs: returns (W' (out, |K|), b' (out,)).

    The ridge pulls towards the bias-compensated layer (not towards zero), so a strong
    ridge gives ``bias`` compensation back and a weak one the plain least squares. A layer
    without a bias (``bias`` None) is fit without one (b' is zero), towards the plain cut.
    """
    if stats.gram is None:
        raise ValueError("least squares needs the second moments of the inputs")
    n = weight.shape[1]
    b = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.double()
    aug = torch.cat([weight, b.unsqueeze(1)], dim=1)
    cols = torch.as_tensor(np.append(kept, n) if bias is not None else kept)
    g = stats.gram / max(stats.count, 1)
    removed = torch.as_tensor(np.setdiff1d(np.arange(n), kept))
    prior = aug[:, cols].clone()
    if bias is not None:
        prior[:, -1] += weight[:, removed] @ g[removed, n]  # g[:, n] is the mean input
    g_kk = g[cols][:, cols]
    lam = ridge * float(torch.diagonal(g_kk).mean())
    reg = g_kk + lam * torch.eye(len(cols), dtype=g.dtype)
    rhs = aug @ g[:, cols] + lam * prior  # (out, |K| + 1)
    sol = torch.linalg.solve(reg, rhs.T).T  # reg is symmetric
    if bias is None:
        return sol, torch.zeros(sol.shape[0], dtype=sol.dtype)
    return sol[:, :-1], sol[:, -1]


def _install(model: nn.Module, name: str, tensor: torch.Tensor, applied: Applied) -> None:
    """Put ``tensor`` in as parameter ``name``; remember what it replaced (once)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters.get(attr)
    if name not in applied.previous:
        applied.previous[name] = old  # None: the bias did not exist
    requires_grad = (old if old is not None else _weight(owner)).requires_grad
    owner._parameters[attr] = nn.Parameter(tensor.contiguous(), requires_grad=requires_grad)
