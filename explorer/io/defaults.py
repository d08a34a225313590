"""What a prune reads when the user did not say: its criterion and its calibration data.

One home for the CLI and the app. A causal language model's weight magnitudes say little of
what its channels carry (on SmolLM2-135M, 20 % of every MLP cut by ``magnitude`` gives a
held-out perplexity of 184,554, by ``activation`` 34.89, dense 29.12: README's decoder
table), so a language model with a tokenizer is scored by ``activation`` on calibration text,
and without a calibration file on `BUILTIN_TEXT` (real prose every Python ships), kept apart
from the evaluation text. Every other model keeps ``magnitude`` (no data needed). A criterion
or data the user named is never replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..prune.importance import CRITERIA
from ..quality.task import Task
from .data import BUILTIN_SAMPLES, BUILTIN_TEXT
from .specs import LoadedModel

DATA_FREE = "magnitude"  # the default where no data can be read
LANGUAGE_MODEL = "activation"  # the default of a causal language model with a tokenizer


@dataclass(frozen=True)
class Defaults:
    """The criterion and calibration source a prune uses, and a line saying what was chosen
    for the user (None when they named both)."""

    importance: str
    calibration: str | None  # a path, `BUILTIN_TEXT`, or None (no data)
    note: str | None = None


def choose(lm: LoadedModel, importance: str | None, calibration: str | None,
           num_samples: int | None = None, weights: bool = True) -> Defaults:
    """Fill in what the user left out for ``lm``.

    Args:
        lm: the loaded model (its task and tokenizer decide).
        importance: the criterion the user named, or None.
        calibration: the calibration source the user named, or None.
        num_samples: how many samples the user asked for (the note says how many are read).
        weights: False when the model has no weights to run (``meta`` without a checkpoint
            to read layer by layer): then no data-aware default is chosen.
    """
    text = lm.task is Task.CAUSAL_LM and lm.tokenizer is not None and weights
    chosen = importance or (LANGUAGE_MODEL if text or (calibration and weights
                                                       and lm.task is Task.CAUSAL_LM)
                            else DATA_FREE)
    cls = CRITERIA.get(chosen)
    wants_data = cls is not None and cls.needs_data
    source = calibration
    said = []
    if importance is None and chosen != DATA_FREE:
        said.append(f"importance '{chosen}' (the default for a language model: weight "
                    f"magnitudes say little of what its channels carry; --importance "
                    f"magnitude to override)")
    if source is None and wants_data and text:
        source = BUILTIN_TEXT
        said.append(f"calibration: {num_samples or BUILTIN_SAMPLES} paragraphs of Python's "
                    f"reference manual ({BUILTIN_TEXT}, none shared with the evaluation "
                    f"text); --calibration FILE for text like the model's own use")
    return Defaults(chosen, source, "; ".join(said) if said else None)
