"""What a model does, which decides how its quality is measured."""
from __future__ import annotations

import enum

from torch import nn


class Task(enum.Enum):
    """The job of a model; each has a headline quality `Metric`."""

    CAUSAL_LM = "causal-lm"  # next-token logits: perplexity
    MASKED_LM = "masked-lm"  # per-token vocabulary logits: agreement with the original
    ENCODER = "encoder"  # hidden states: cosine of the mask-pooled embedding
    ENCODER_CLS = "encoder-cls"  # hidden states: cosine of the first ([CLS]) token's state
    SEQUENCE_CLASSIFICATION = "sequence-classification"  # class logits per text: top-1 agreement
    IMAGE_CLASSIFICATION = "image-classification"  # class logits per image: top-1 agreement
    OTHER = "other"  # any output: cosine similarity


class ModelKind(str, enum.Enum):
    """What a model's example inputs are: decides how an input shape is read and resized."""

    VISION = "vision"  # images: (batch, channels, height, width)
    LM = "lm"  # token ids of a causal language model: (batch, tokens)
    ENCODER = "encoder"  # token ids of an encoder: (batch, tokens)
    OTHER = "other"  # anything else (plain feature vectors, a user's own inputs)

    def __str__(self) -> str:
        return self.value


class Metric(enum.Enum):
    """A quality measure of a pruned model against the original on held-out data."""

    PERPLEXITY = "perplexity"  # exp(mean next-token NLL); lower is better
    COSINE = "cosine"  # cosine similarity of outputs to the original's; 1 = unchanged
    TOP1 = "top1"  # fraction of argmax predictions equal to the original's; 1 = unchanged


HEADLINE: dict[Task, Metric] = {
    Task.CAUSAL_LM: Metric.PERPLEXITY,
    Task.MASKED_LM: Metric.TOP1,
    Task.ENCODER: Metric.COSINE,
    Task.ENCODER_CLS: Metric.COSINE,
    Task.SEQUENCE_CLASSIFICATION: Metric.TOP1,
    Task.IMAGE_CLASSIFICATION: Metric.TOP1,
    Task.OTHER: Metric.COSINE,
}

# transformers class-name endings -> task (the class names are the architectures in config.json)
_SUFFIXES: tuple[tuple[tuple[str, ...], Task], ...] = (
    (("ForCausalLM", "LMHeadModel"), Task.CAUSAL_LM),
    (("ForMaskedLM",), Task.MASKED_LM),
    (("ForSequenceClassification",), Task.SEQUENCE_CLASSIFICATION),
    (("ForImageClassification",), Task.IMAGE_CLASSIFICATION),
)


def task_of_architecture(name: str) -> Task | None:
    """The task a transformers architecture name (``"LlamaForCausalLM"``) stands for.

    Returns:
        The task, ``Task.ENCODER`` for a bare ``...Model``, or None for anything else.
    """
    for suffixes, task in _SUFFIXES:
        if name.endswith(suffixes):
            return task
    return Task.ENCODER if name.endswith("Model") else None


def infer_task(model: nn.Module) -> Task:
    """The task of ``model`` from its class (transformers) or its head (timm classifiers)."""
    task = task_of_architecture(type(model).__name__)
    if task is not None and type(model).__module__.startswith("transformers."):
        return task
    classes: object = getattr(model, "num_classes", None)
    if type(model).__module__.startswith("timm.") and isinstance(classes, int) and classes > 0:
        return Task.IMAGE_CLASSIFICATION
    return Task.OTHER
