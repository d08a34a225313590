"""What accepting a pruning would cost, measured on a small held-out batch before deciding.

The pre-flight runs on a weightless ``meta`` copy, which cannot say anything about quality, so
the probe applies the removal to a CPU copy *with* weights and evaluates it against the
original. Results are cached by the caller's key (model version and proposal), so redrawing a
page costs nothing.

Memory: the original's outputs on the probe batch are kept (the batch is small: the app gives
a few held-out samples, `explorer.app.measures.PROBE_SAMPLES`); each measurement runs a few
rows at a time and keeps only running sums; the trial copy of a cost shares every tensor the
removal does not replace (`shared_clone`), so it costs the cut tensors, not a model.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..coupling.analyze import Coupling
from ..prune.calibration import Calibration
from ..prune.preflight import shared_clone
from ..prune.removal import Removal, apply_removal
from .evaluate import Output, Quality, compare, reference_outputs
from .task import Task, infer_task


@dataclass
class QualityProbe:
    """Quality of a model and of would-be prunings of it, against a fixed original.

    Args:
        original: the unpruned model with weights (never changed).
        data: a small held-out batch (kept apart from calibration data).
        task: what the model does; inferred from ``original`` when None.
    """

    original: nn.Module
    data: Calibration
    task: Task | None = None
    _cache: dict[Hashable, Quality] = field(default_factory=dict, repr=False)
    _reference: list[Output] | None = field(default=None, repr=False)  # original's outputs

    def current(self, model: nn.Module, key: Hashable) -> Quality:
        """Quality of ``model`` (the pruned-so-far model) against the original."""
        if ("current", key) not in self._cache:
            same = shares_all(model, self.original)  # unpruned: no forward to run
            self._cache["current", key] = self._measure(None if same else model)
        return self._cache["current", key]

    def cost(self, model: nn.Module, coupling: Coupling, removal: Callable[[], Removal],
             key: Hashable) -> Quality:
        """Quality after applying ``removal()`` to a copy of ``model`` (``model`` is untouched).

        Raises:
            PruneError: if the removal cannot be applied.
        """
        if ("cost", key) not in self._cache:
            trial = shared_clone(model)  # a cut replaces tensors, never writes into them
            apply_removal(trial, coupling, removal())
            self._cache["cost", key] = self._measure(trial)
            del trial
        return self._cache["cost", key]

    def adopt(self, cost_key: Hashable, key: Hashable) -> bool:
        """The model at ``key`` (a `current` key) is the cut measured under ``cost_key``:
        its quality is that cost, with no forward. False when that cost was not measured."""
        if ("cost", cost_key) not in self._cache:
            return False
        self._cache["current", key] = self._cache["cost", cost_key]
        return True

    def cached_cost(self, key: Hashable) -> Quality | None:
        """The `cost` measured under ``key``, or None when it was not measured yet."""
        return self._cache.get(("cost", key))

    def _measure(self, model: nn.Module | None) -> Quality:
        if self.task is None:
            self.task = infer_task(self.original)
        if self._reference is None:
            self._reference = reference_outputs(self.original, self.data)
        return compare(model, self._reference, self.data, self.task)


def shares_all(model: nn.Module, original: nn.Module) -> bool:
    """Whether ``model`` is ``original`` tensor for tensor (same names, the same storage,
    shape and strides): an unpruned model sharing the kept original's tensors."""
    ours = _views(model)
    return ours is not None and ours == _views(original)


def _views(model: nn.Module) -> dict[str, tuple[Any, ...]] | None:
    """Each tensor's storage and view; None on meta (no values to share)."""
    out: dict[str, tuple[Any, ...]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            return None
        out[name] = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     t.stride(), t.dtype)
    return out
