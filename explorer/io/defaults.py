"""What a prune reads when the user did not say: its criterion, its calibration data and
its head mode.

One home for the CLI and the app. A causal language model's weight magnitudes say little of
what its channels carry (on SmolLM2-135M, 20 % of every MLP cut by ``magnitude`` gives a
held-out perplexity of 184,554, by ``activation`` 34.89, dense 29.12: README's decoder
table), so a language model with a tokenizer is scored by ``activation`` on calibration text,
and without a calibration file on `BUILTIN_TEXT` (real prose every Python ships), kept apart
from the evaluation text. Every other model keeps ``magnitude`` (no data needed). Such a model
with real weights also keeps its attention unless asked (`head_default`). A criterion, data,
head mode or target the user named is never replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..coupling.targets import parse_targets
from ..coupling.vocab import Target
from ..prune.importance import CRITERIA
from ..quality.task import Task
from .data import BUILTIN_SAMPLES, BUILTIN_TEXT
from .specs import LoadedModel

DATA_FREE = "magnitude"  # the default where no data can be read
LANGUAGE_MODEL = "activation"  # the default of a causal language model with a tokenizer


DIMS = "dims"  # the head mode where quality is not at stake (structure, random weights)
KEEP = "keep"  # the head mode of a language model with real weights


@dataclass(frozen=True)
class Defaults:
    """The criterion, calibration source and head mode a prune uses, and a line saying what
    was chosen for the user (None when they named everything)."""

    importance: str
    calibration: str | None  # a path, `BUILTIN_TEXT`, or None (no data)
    note: str | None = None
    heads: str = DIMS


def head_default(lm: LoadedModel, targets: str | None, weights: bool = True
                 ) -> tuple[str, str | None]:
    """The head mode when none was named, and the line saying so (None: nothing to say).

    A causal language model with real weights keeps its attention (``keep``): on
    SmolLM2-135M at ratio 0.2, cutting 20 % of the dims of every head (64 -> 52) as well as
    the MLP gives a held-out perplexity of 178.4 against 32.0 for the MLP alone (dense 27.0;
    docs/real-models.md, "Which heads by default"). Targets that name heads or the residual
    stream ask for an attention change, so they get ``dims``, as every other model does.
    Real weights: loaded (``lm.pretrained``), or a checkpoint read layer by layer (the
    large-model path: ``weights`` True for a model on ``meta``), so both paths choose alike.
    """
    asked = parse_targets(targets) if targets else frozenset()
    on_meta = any(p.device.type == "meta" for p in lm.model.parameters())
    real = lm.pretrained or (weights and on_meta)
    if lm.task is not Task.CAUSAL_LM or not real or asked & {Target.HEADS, Target.RESIDUAL}:
        return DIMS, None
    return KEEP, ("heads 'keep' (the default for a language model with real weights: cutting "
                  "dims inside its heads costs far more quality than the MLP does; --heads "
                  "dims, whole or query to cut attention)")


def choose(lm: LoadedModel, importance: str | None, calibration: str | None,
           num_samples: int | None = None, weights: bool = True, heads: str | None = None,
           targets: str | None = None) -> Defaults:
    """Fill in what the user left out for ``lm``.

    Args:
        lm: the loaded model (its task and tokenizer decide).
        importance: the criterion the user named, or None.
        calibration: the calibration source the user named, or None.
        num_samples: how many samples the user asked for (the note says how many are read).
        weights: False when the model has no weights to run (``meta`` without a checkpoint
            to read layer by layer): then no data-aware default is chosen.
        heads: the head mode the user named, or None (`head_default`).
        targets: the targets the user named (comma-separated), or None.
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
    mode, why = (heads, None) if heads is not None else head_default(lm, targets, weights)
    if why:
        said.append(why)
    return Defaults(chosen, source, "; ".join(said) if said else None, mode)
