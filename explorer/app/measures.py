"""What the app measures of a session's model against the original: quality on held-out data,
the price of a would-be cut, greedy continuations. Cached per model version.

Streamlit-free; the session holds one `Measures` and its pages read them through it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..prune.calibration import Calibration, random_like
from ..prune.removal import Removal
from ..quality.evaluate import Quality
from ..quality.generate import DEFAULT_NEW_TOKENS, Continuation, continuations
from ..quality.probe import QualityProbe
from ..quality.task import Task

# Held-out samples the app measures quality on: a forward of the original and of each
# would-be cut runs on them (on SmolLM2 at 128 tokens, two samples keep a measurement near a
# second on two CPU cores; the report and the CLI's --eval measure on every held-out sample).
PROBE_SAMPLES = 2


class Measures:
    """Quality, costs and continuations of one session's model (``None`` / ``[]`` on meta,
    which has no weights to measure).

    Args:
        original: the unpruned model (the session's copy; never changed here).
        example_inputs: positional inputs for one forward (random held-out data from them).
        heldout: held-out data for quality (random inputs when None).
        task: what the model does (inferred when None).
        tokenizer: the checkpoint's tokenizer, for continuations.
    """

    def __init__(self, original: nn.Module, example_inputs: tuple[Any, ...],
                 heldout: Calibration | None, task: Task | None, tokenizer: Any | None
                 ) -> None:
        self.original = original
        self.example_inputs = example_inputs
        self.heldout = heldout
        self.task = task
        self.tokenizer = tokenizer
        self._probe: QualityProbe | None = None
        self._texts: dict[tuple[Any, ...], list[Continuation]] = {}

    def quality(self, model: nn.Module, version: int) -> Quality | None:
        """Quality of ``model`` (at ``version``) against the original on a small held-out
        batch; None on meta."""
        probe = self._quality_probe(model)
        return None if probe is None else probe.current(model, version)

    def cost(self, model: nn.Module, coupling: Coupling, removal: Callable[[], Removal],
             key: tuple[Any, ...]) -> Quality | None:
        """Quality after ``removal`` on a CPU copy with weights (cached under ``key``); None
        on meta."""
        probe = self._quality_probe(model)
        return None if probe is None else probe.cost(model, coupling, removal, key)

    def adopt(self, cost_key: tuple[Any, ...], version: int) -> bool:
        """The model at ``version`` is the cut whose cost was measured under ``cost_key`` (an
        accept with no refit): its quality is that cost (`QualityProbe.adopt`)."""
        return self._probe is not None and self._probe.adopt(cost_key, version)

    def cached_cost(self, key: tuple[Any, ...]) -> Quality | None:
        """The `cost` measured under ``key``, or None when it was not measured yet."""
        return None if self._probe is None else self._probe.cached_cost(key)

    def continuations(self, model: nn.Module, version: int, prompts: Sequence[str],
                      new_tokens: int = DEFAULT_NEW_TOKENS) -> list[Continuation]:
        """Greedy continuations of ``prompts`` by the original and ``model``; [] on meta.

        Raises:
            GenerateError: if the model has no tokenizer or cannot generate text.
        """
        if _on_meta(model) or not prompts:
            return []
        key = (version, tuple(prompts), new_tokens)
        if key not in self._texts:
            self._texts[key] = continuations(model, self.original, self.tokenizer,
                                             list(prompts), new_tokens)
        return self._texts[key]

    @property
    def source(self) -> str:
        """What the quality is measured on, in words."""
        if self.heldout is None:
            return "random inputs (no held-out data given)"
        return _batch_words(self.heldout.head(PROBE_SAMPLES).batches[0])

    def _quality_probe(self, model: nn.Module) -> QualityProbe | None:
        if _on_meta(model):
            return None
        if self._probe is None:
            data = (self.heldout.head(PROBE_SAMPLES) if self.heldout is not None else
                    Calibration(random_like(self.example_inputs, 1, 4, seed=1)))
            self._probe = QualityProbe(self.original, data, self.task)
        return self._probe


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _batch_words(batch: tuple[Any, ...]) -> str:
    """``2 held-out samples × 128 tokens`` (tokens for token ids)."""
    first = next((a for a in batch if isinstance(a, torch.Tensor) and a.dim()), None)
    rows = int(first.shape[0]) if first is not None else 1
    tokens = first is not None and first.dim() == 2 and not first.is_floating_point()
    return f"{rows} held-out samples" + (f" × {first.shape[1]} tokens" if tokens and
                                         first is not None else "")
