"""Sensitivity: how much the output (or loss) moves when one group is pruned alone.

`scan` measures it; `allocate` turns the measurements into guidance: per-group cut depths
that meet a parameter target with the least measured output change (a global ranking by
measured change per removed parameter, not by a uniform ratio).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..coupling.groups import Group
from ..graph.metrics import count_params
from ..graph.rng import kept_rng
from ..graph.walk import flat_floats, tensor_leaves
from .calibration import Calibration, compute_loss
from .importance import lowest
from .pruner import Pruner
from .removal import Removal, apply_removal, undo

Measure = Callable[[nn.Module], float]  # pruned model -> change (higher = worse)
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class SensitivityRow:
    """One (group, ratio) point of the scan."""

    group: int
    title: str
    ratio: float
    removed: int
    params_removed: int
    output_change: float  # relative L2 change of the outputs, loss increase, or the measure
    role: str = ""  # the role of the pruned axis
    error: str = ""  # why the pruned model did not run (then ``output_change`` is inf)


def _outputs(model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad(), kept_rng(model, inputs):
        return flat_floats(model(*inputs))


def default_measure(pruner: Pruner, calibration: Calibration | None = None) -> Measure:
    """Loss increase on ``calibration``, or else the relative L2 change of the outputs on
    the pruner's example inputs (both against the model as it is now)."""
    if calibration is not None:
        base_loss = _loss(pruner.model, calibration)
        return lambda model: _loss(model, calibration) - base_loss
    base = _outputs(pruner.model, pruner.inputs)
    return lambda model: float((_outputs(model, pruner.inputs) - base).norm()
                               / (base.norm() + 1e-12))


def scan(pruner: Pruner, ratios: Sequence[float] = (0.25, 0.5, 0.75),
         calibration: Calibration | None = None, measure: Measure | None = None,
         progress: Progress | None = None) -> list[SensitivityRow]:
    """Prune each candidate group alone at each ratio, measure the change, and undo it.

    The one sensitivity loop of the package (the app's scan and the teaching path's
    accuracy drop both run it). The model is pruned in place and restored exactly after
    every trial (same tensors); indices go lowest score first (a stable order).

    Args:
        pruner: the pruner whose candidates are scanned.
        ratios: fractions of each axis to remove.
        calibration: with it, the default measure is the loss increase on it.
        measure: pruned model -> change (default: `default_measure`).
        progress: called with (fraction done, what is running).
    """
    measure = measure or default_measure(pruner, calibration)
    rows: list[SensitivityRow] = []
    cands, _ = pruner.candidates()
    for i, c in enumerate(cands):
        if progress:
            progress(i / max(len(cands), 1), f"sensitivity of group {c.group.id}")
        size = c.group.axes[c.axis].size
        for r in ratios:
            n = min(int(round(size * r)), size - 1)
            if n > 0:
                rows.append(_trial(pruner, c.group, c.axis, lowest(c.scores, n), r, measure))
    return rows


def _trial(pruner: Pruner, group: Group, axis: int, idx: list[int], ratio: float,
           measure: Measure) -> SensitivityRow:
    removal = Removal()
    removal.add(group.id, axis, idx)
    model = pruner.model  # pruned in place and restored exactly (no copy)
    before = count_params(model)
    applied = apply_removal(model, pruner.coupling, removal)
    after, error = count_params(model), ""
    try:
        change = measure(model)
    except Exception as exc:  # noqa: BLE001 - a group that breaks the forward is maximal
        change, error = float("inf"), f"{type(exc).__name__}: {exc}"
    finally:
        undo(model, applied)
    role = group.axes[axis].role
    return SensitivityRow(group.id, f"{group.title} [{role}]", ratio, len(idx), before - after,
                          change, role, error)


def _loss(model: nn.Module, calib: Calibration) -> float:
    with torch.no_grad(), kept_rng(model, calib.batches):
        losses = [float(compute_loss(model, b, calib, calib.labels[i] if calib.labels else None))
                  for i, b in enumerate(calib.batches)]
    return sum(losses) / len(losses)


def as_table(rows: list[SensitivityRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (for plotting and JSON)."""
    return [asdict(r) for r in rows]


@dataclass(frozen=True)
class Share:
    """How much of one candidate axis the measured allocation removes."""

    group: int
    axis: int
    title: str
    ratio: float  # of the axis' current width
    removed: int
    params_removed: int  # measured with this group pruned alone
    output_change: float  # measured with this group pruned alone at ``ratio``


@dataclass(frozen=True)
class Allocation:
    """Per-group ratios chosen from measurements to meet a parameter target."""

    shares: list[Share]
    params_target: int
    params_predicted: int  # parameter count after `removal` (exact, from kept indices)

    def removal(self, pruner: Pruner) -> Removal:
        """The indices to remove: the lowest-scored of each axis under the pruner's criterion."""
        cands, _ = pruner.candidates()
        scores = {(c.group.id, c.axis): c.scores for c in cands}
        out = Removal()
        for s in self.shares:
            if s.removed:
                out.add(s.group, s.axis, lowest(scores[(s.group, s.axis)], s.removed))
        return out


def allocate(pruner: Pruner, target_params: float, calibration: Calibration,
             ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)) -> Allocation:
    """Measured guidance: which groups to cut how much to reach a parameter target.

    Every candidate axis is pruned alone at every ratio (lowest scores first under the
    pruner's criterion) and the relative L2 change of the model's outputs on the
    calibration batches is measured; then, greedily, the cut with the least measured change
    per removed parameter is deepened until the parameters left reach ``target_params``
    (a fraction of today's count). The model is restored exactly after every trial.

    Args:
        pruner: the pruner (its criterion ranks the indices inside each axis).
        target_params: fraction of the current parameter count to keep, in (0, 1].
        calibration: the batches to measure on (use other data to evaluate the result).
        ratios: the cut levels measured per axis.
    """
    if not 0.0 < target_params <= 1.0:
        raise ValueError(f"target_params is a fraction of the parameters in (0, 1], got "
                         f"{target_params}")
    model = pruner.model
    total = sum(p.numel() for p in model.parameters())
    budget = total - int(target_params * total)
    base = _calibration_outputs(model, calibration)
    levels = _levels(pruner, sorted(set(ratios)), calibration, base)
    chosen = dict.fromkeys(levels, 0)  # index into [no cut] + levels
    removed = 0
    while removed < budget:
        best: tuple[float, tuple[int, int]] | None = None
        for key, steps in levels.items():
            k = chosen[key]
            if k >= len(steps) - 1:
                continue
            gain = steps[k + 1].params_removed - steps[k].params_removed
            cost = (steps[k + 1].output_change - steps[k].output_change) / max(gain, 1)
            if best is None or cost < best[0]:
                best = (cost, key)
        if best is None:
            break
        key = best[1]
        steps = levels[key]
        removed += steps[chosen[key] + 1].params_removed - steps[chosen[key]].params_removed
        chosen[key] += 1
    shares = [levels[key][k] for key, k in chosen.items()]
    alloc = Allocation(shares, total - budget, 0)
    predicted = pruner.predict_params(alloc.removal(pruner))
    return Allocation(shares, total - budget, predicted)


def _levels(pruner: Pruner, ratios: list[float], calibration: Calibration,
            base: torch.Tensor) -> dict[tuple[int, int], list[Share]]:
    """(group, axis) -> [no cut, cut at each ratio], each measured alone by `_trial` (the
    one trial-and-undo of the module); a cut that breaks the forward removes nothing."""
    def measure(model: nn.Module) -> float:
        return float((_calibration_outputs(model, calibration) - base).norm()
                     / (base.norm() + 1e-12))

    cands, _ = pruner.candidates()
    out: dict[tuple[int, int], list[Share]] = {}
    for c in cands:
        size = c.group.axes[c.axis].size
        title = f"{c.group.title} [{c.group.axes[c.axis].role}]"
        steps = [Share(c.group.id, c.axis, title, 0.0, 0, 0, 0.0)]
        for r in ratios:
            n = min(int(round(size * r)), size - 1)
            if n <= steps[-1].removed:
                continue
            row = _trial(pruner, c.group, c.axis, lowest(c.scores, n), r, measure)
            steps.append(Share(c.group.id, c.axis, title, n / size, n,
                               0 if row.error else row.params_removed, row.output_change))
        out[(c.group.id, c.axis)] = steps
    return out


def _calibration_outputs(model: torch.nn.Module, calib: Calibration) -> torch.Tensor:
    """Every floating output of every calibration batch, flattened (real tokens only)."""
    parts = []
    with torch.no_grad(), kept_rng(model, calib.batches):
        for batch in calib.batches:
            out = model(*batch, **calib.kwargs)
            mask = calib.token_mask(batch)
            for _p, t in tensor_leaves(out):
                if t.is_floating_point():
                    if mask is not None and t.dim() >= 2 and \
                            tuple(t.shape[:2]) == tuple(mask.shape):
                        t = t[mask]
                    parts.append(t.detach().float().reshape(-1))
    return torch.cat(parts)
