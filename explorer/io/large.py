"""The large-model path's refit: ``prune --device meta --max-memory SIZE --compensate lstsq
--plan FILE``.

The cut is chosen on the weightless copy; `explorer.prune.offloaded.refit_offloaded` refits
the layers that read removed channels on the checkpoint placed by accelerate, one decoder
layer at a time, and each layer's refit tensors go straight to disk (`RefitWriter`); the
file beside the plan (`explorer.io.refit.refit_file`) and the plan's `Refit` record (names,
shapes, the biases the refit added, the file's sha256) are what ``replay --checkpoint``
writes into the pruned checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..prune.calibration import Calibration
from ..prune.offloaded import refit_offloaded
from ..prune.removal import Applied
from .plan import Refit
from .refit import RefitWriter

__all__ = ["LargeRefit", "refit_to_file"]


@dataclass
class LargeRefit:
    """What the refit of the large-model path wrote, for the plan and for people."""

    refit: Refit | None  # the plan's record (None: no layer kept a refit)
    notes: list[str] = field(default_factory=list)


def refit_to_file(model: nn.Module, layout: nn.Module, applied: Applied, calib: Calibration,
                  target: str | os.PathLike[str],
                  work: str | os.PathLike[str] | None = None) -> LargeRefit:
    """Refit ``applied``'s consumers on the offloaded ``model`` into the file ``target``.

    Args:
        model: the unpruned checkpoint placed by accelerate.
        layout: the cut weightless copy (`Pruner.model` after its step).
        applied: the cut (`Pruner.applied[0]`).
        calib: the calibration batches.
        target: the refit file to write (beside the plan).
        work: where each layer's refit waits on disk until the file is written.

    Returns:
        The plan's `Refit` record (None, and no file, when every layer kept the plain cut)
        and notes for the report.
    """
    with RefitWriter(work) as writer:
        rec, outside = refit_offloaded(model, layout, applied, calib, writer.add)
        notes = [rec.summary()] if rec.fits else []
        if outside:
            notes.append(f"not refit on the large-model path (outside the decoder layers; "
                         f"the in-memory path refits them one-shot): {', '.join(outside)}")
        if not writer.shapes:
            return LargeRefit(None, notes)
        digest = writer.finish(target)
        shapes = writer.shapes
    created = sorted(n for n in shapes if n.endswith(".bias") and
                     getattr(layout.get_submodule(n.rpartition(".")[0]), "bias", None) is None)
    record = Refit([[n, list(s)] for n, s in sorted(shapes.items())], created,
                   Path(target).name, digest)
    return LargeRefit(record, notes)
