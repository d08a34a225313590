"""Sensitivity scan: how much the output (or loss) moves when one group is pruned alone."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..graph.metrics import count_params
from ..graph.walk import tensor_leaves
from .calibration import Calibration, compute_loss
from .pruner import Pruner
from .removal import Removal, apply_removal, undo


@dataclass(frozen=True)
class SensitivityRow:
    """One (group, ratio) point of the scan."""

    group: int
    title: str
    ratio: float
    removed: int
    params_removed: int
    output_change: float  # relative L2 change of the outputs (or loss increase)


def _outputs(model: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return torch.cat([t.detach().float().reshape(-1) for _p, t in tensor_leaves(out)
                      if t.is_floating_point()])


def scan(pruner: Pruner, ratios: Sequence[float] = (0.25, 0.5, 0.75),
         calibration: Calibration | None = None) -> list[SensitivityRow]:
    """Prune each candidate group alone at each ratio, measure the change, and undo it.

    The model is pruned in place and restored exactly after every trial (same tensors).

    With ``calibration`` the change is the loss increase on it; otherwise the relative L2
    change of the model's outputs on the example inputs.
    """
    rows: list[SensitivityRow] = []
    base = _outputs(pruner.model, pruner.inputs)
    base_loss = _loss(pruner.model, calibration) if calibration else 0.0
    cands, _ = pruner.candidates()
    for c in cands:
        size = c.group.axes[c.axis].size
        for r in ratios:
            n = min(int(round(size * r)), size - 1)
            if n <= 0:
                continue
            removal = Removal()
            removal.add(c.group.id, c.axis, sorted(int(i) for i in c.scores.argsort()[:n]))
            model = pruner.model  # pruned in place and restored exactly (no copy)
            before = count_params(model)
            applied = apply_removal(model, pruner.coupling, removal)
            after = count_params(model)
            try:
                if calibration:
                    change = _loss(model, calibration) - base_loss
                else:
                    out = _outputs(model, pruner.inputs)
                    change = float((out - base).norm() / (base.norm() + 1e-12))
            except Exception:  # noqa: BLE001 - a group that breaks the forward is maximal
                change = float("inf")
            finally:
                undo(model, applied)
            rows.append(SensitivityRow(c.group.id, f"{c.group.title} [{c.group.axes[c.axis].role}]",
                                       r, n, before - after, change))
    return rows


def _loss(model: torch.nn.Module, calib: Calibration) -> float:
    with torch.no_grad():
        losses = [float(compute_loss(model, b, calib, calib.labels[i] if calib.labels else None))
                  for i, b in enumerate(calib.batches)]
    return sum(losses) / len(losses)


def as_table(rows: list[SensitivityRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (for plotting and JSON)."""
    return [asdict(r) for r in rows]
