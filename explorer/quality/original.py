"""The original model, kept beside the one being pruned for quality measures, at no weight cost.

A deep copy of a 135 M-parameter LLM doubles what pruning holds in memory (0.5 GB of the
2 GB a SmolLM2 prune and evaluation may take). Every change the library makes to a model
replaces tensors (cuts, refits, undo) instead of writing into them, so a copy of the
modules that *shares* the tensors (`explorer.prune.preflight.shared_clone`) stays the
original: each tensor a cut replaces is then held once, by the copy. A digest of every
shared tensor, taken at the start and checked before use, turns a write in place (a bug, or
code outside the library) into a clear error instead of a silently wrong "before".
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..prune.preflight import clone_model, shared_clone


class OriginalChanged(RuntimeError):
    """A tensor the kept original shares with the pruned model was written in place."""


class Original:
    """The model as it was when kept, for `explorer.evaluate` and reports.

    Args:
        model: the model about to be pruned (only read; not kept).
        share: share its tensors (the default; see the module docstring) instead of copying
            them.
    """

    def __init__(self, model: nn.Module, share: bool = True) -> None:
        self.share = share
        self._copy = shared_clone(model) if share else clone_model(model)
        self._digests = _digests(self._copy) if share else {}

    def get(self) -> nn.Module:
        """The original model (share it read-only).

        Raises:
            OriginalChanged: if a shared tensor was written in place since it was kept.
        """
        if self.share:
            now = _digests(self._copy)
            changed = [n for n, d in self._digests.items() if now.get(n) != d]
            if changed:
                raise OriginalChanged(
                    f"tensor '{changed[0]}' of the original was written in place while the "
                    f"model was pruned ({len(changed)} tensor(s)); quality against it would "
                    "be wrong: keep the original with Original(model, share=False)")
        return self._copy


def _digests(model: nn.Module) -> dict[str, bytes]:
    """A BLAKE2 digest of every parameter's and buffer's bytes (meta tensors skipped)."""
    out: dict[str, bytes] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        data = t.detach().cpu().contiguous().reshape(-1)
        raw = data.view(torch.uint8) if data.numel() else data.to(torch.uint8)
        out[name] = hashlib.blake2b(raw.numpy().data, digest_size=16).digest()
    return out
