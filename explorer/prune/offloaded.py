"""Reconstruction for models larger than memory: ``--compensate lstsq`` with ``--max-memory``.

The cut is chosen on a weightless ``meta`` copy (`explorer.prune.pruner.Pruner` with scores
computed layer by layer, `explorer.prune.sequential`); this module refits the layers that
read removed channels on the real weights, placed by accelerate (`load_offloaded`), with the
in-memory path's own code: the consumers are found as `explorer.prune.compensate` finds them
(`cut_targets`, `block_consumers`) and refit by `explorer.prune.reconstruct.reconstruct`,
block by block on the pruned stream of the blocks below, against the original outputs, each
choosing plain / bias / ridge on held-out calibration samples. Each decoder layer's weights
are loaded once while its consumers are fit (`sequential._resident`), and its refit tensors,
cut to the plan's output rows, go to ``sink`` (the caller writes them to disk) as soon as
the layer is done: memory holds one layer's weights and refits, the two streams' hidden
states and the moments of one consumer, never the whole model's refits.

What the in-memory path does and this one does not: consumers outside the decoder layers
(an LM head reading a cut residual stream: refit one-shot in memory) are left as cut, and
heads are not re-based before a head-dim cut (`explorer.prune.rebase`; it applies to plain
multi-head layouts, not to rotary or grouped-query attention); `refit_offloaded` names both.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.rng import kept_rng
from .calibration import Calibration
from .compensate import block_consumers, cut_targets
from .rebase import head_axes
from .reconstruct import Reconstruction, kept_rows, reconstruct
from .removal import Applied, Removal
from .sequential import _resident

__all__ = ["rebased_heads", "refit_offloaded"]


def rebased_heads(model: nn.Module, coupling: Coupling, removal: Removal) -> list[str]:
    """Modules whose heads the in-memory path would re-base before ``removal`` (none: both
    paths refit alike)."""
    return sorted({s.module for a in head_axes(model, coupling, removal) for s in a.sides})


def refit_offloaded(model: nn.Module, layout: nn.Module, applied: Applied, calib: Calibration,
                    sink: Callable[[dict[str, torch.Tensor]], None]) -> tuple[Reconstruction,
                                                                              list[str]]:
    """Refit the consumers of ``applied``'s cut on ``model``, one decoder layer at a time.

    Args:
        model: the unpruned checkpoint, placed by accelerate (`load_offloaded`).
        layout: the cut weightless copy the cut was chosen on (module types and ties).
        applied: that cut (`Pruner.applied`): kept indices and shapes before the cut.
        calib: the calibration batches the scores were computed on.
        sink: receives each decoder layer's refit tensors (weights and biases, with the
            output rows the cut keeps), in layer order.

    Returns:
        The reconstruction (its choices; its tensors went to ``sink``) and the consumers left
        as cut because they lie outside the decoder layers.
    """
    sizes = {name: before for name, (before, _after) in applied.shapes.items()}
    todo = cut_targets(layout, applied.keeps, sizes)
    consumers = block_consumers(layout, todo, applied.keeps)
    inside = {c.module for c in consumers}
    outside = sorted(t.module for t in todo if t.module not in inside)
    if not consumers:
        return Reconstruction(), outside

    def done(_block: int, rec: Reconstruction) -> None:
        tensors = {}
        for name in sorted(rec.tensors):
            tensors[name] = kept_rows(model, name, rec.tensors.pop(name), applied.keeps)
        sink(tensors)

    with kept_rng(model):
        rec = reconstruct(model, consumers, calib, resident=_resident, block_done=done)
    return rec, outside
