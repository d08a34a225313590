"""The error and records shared by the spec builders: ``SpecError``, ``LoadedModel``, ``Built``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ...quality.task import Task

if TYPE_CHECKING:
    from ._sentence import SentenceFolder


class SpecError(ValueError):
    """A model spec, input shape or weights file the user gave is wrong.

    The message says what is wrong, where, and what to do about it.
    """


def one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (whitespace collapsed, cut at ``limit``)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a spec, ready to trace."""

    model: nn.Module  # in eval mode
    example_inputs: tuple[Any, ...]  # positional args for model(*example_inputs)
    spec: str  # the spec string it was built from
    family: str  # "timm" | "hf" | "demo" | "factory"
    kind: str  # "vision" | "lm" | "encoder" | "other": what the inputs are
    hf_config: Any | None = None  # transformers PretrainedConfig for hf models, else None
    task: Task = Task.OTHER  # what the model does: decides how quality is measured
    tokenizer: Any | None = None  # the checkpoint's tokenizer (hf:<folder>), for text data
    pretrained: bool = False  # True when real weights were loaded (folder or weights file)
    notes: tuple[str, ...] = ()  # loading caveats to show the user (e.g. a new head)
    sentence: SentenceFolder | None = None  # the sentence-transformers pipeline, if any


@dataclass(frozen=True)
class Built:
    """What a family builder returns before inputs are resized, weights loaded and eval set."""

    model: nn.Module
    example_inputs: tuple[Any, ...]
    family: str
    kind: str
    hf_config: Any | None = None
    vocab_size: int | None = None  # token-id range for "lm"/"encoder" inputs
    task: Task = Task.OTHER
    tokenizer: Any | None = None
    source: str = ""  # the checkpoint folder the weights came from, if any
    pretrained: bool = False
    notes: tuple[str, ...] = ()
    sentence: SentenceFolder | None = None
