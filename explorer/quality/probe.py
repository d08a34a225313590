"""What accepting a pruning would cost, measured on a small held-out batch before deciding.

The pre-flight runs on a weightless ``meta`` copy, which cannot say anything about quality, so
the probe applies the removal to a CPU copy *with* weights and evaluates it against the
original. Results are cached by the caller's key (model version and proposal), so redrawing a
page costs nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from torch import nn

from ..coupling.analyze import Coupling
from ..prune.calibration import Calibration
from ..prune.preflight import clone_model
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
            self._cache["current", key] = self._measure(model)
        return self._cache["current", key]

    def cost(self, model: nn.Module, coupling: Coupling, removal: Callable[[], Removal],
             key: Hashable) -> Quality:
        """Quality after applying ``removal()`` to a copy of ``model`` (``model`` is untouched).

        Raises:
            PruneError: if the removal cannot be applied.
        """
        if ("cost", key) not in self._cache:
            trial = clone_model(model)
            apply_removal(trial, coupling, removal())
            self._cache["cost", key] = self._measure(trial)
        return self._cache["cost", key]

    def cached_cost(self, key: Hashable) -> Quality | None:
        """The `cost` measured under ``key``, or None when it was not measured yet."""
        return self._cache.get(("cost", key))

    def _measure(self, model: nn.Module) -> Quality:
        if self.task is None:
            self.task = infer_task(self.original)
        if self._reference is None:
            self._reference = reference_outputs(self.original, self.data)
        return compare(model, self._reference, self.data, self.task)
