"""Sensitivity scan: how much the output (or loss) moves when one group is pruned alone."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..coupling.groups import Group
from ..graph.metrics import count_params
from ..graph.walk import tensor_leaves
from .calibration import Calibration, compute_loss
from .proposal import lowest
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
    with torch.no_grad():
        out = model(*inputs)
    return torch.cat([t.detach().float().reshape(-1) for _p, t in tensor_leaves(out)
                      if t.is_floating_point()])


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
    with torch.no_grad():
        losses = [float(compute_loss(model, b, calib, calib.labels[i] if calib.labels else None))
                  for i, b in enumerate(calib.batches)]
    return sum(losses) / len(losses)


def as_table(rows: list[SensitivityRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (for plotting and JSON)."""
    return [asdict(r) for r in rows]
