"""The error and records shared by the spec builders: ``SpecError``, ``LoadedModel``, ``Built``,
``SentenceFolder`` (read by `._sentence`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...quality.task import ModelKind, Task

# The attention kernel transformers models are built with, unless a spec asks for another
# (``?attn_implementation=``): the in-memory models and the large-model path's offloaded one
# run the same arithmetic, so their scores (and the cuts chosen from them) agree in bf16 too.
ATTENTION = "eager"


class SpecError(ValueError):
    """A model spec, input shape or weights file the user gave is wrong.

    The message says what is wrong, where, and what to do about it.
    """


def one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (whitespace collapsed, cut at ``limit``)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ModelFamily(str, enum.Enum):
    """Which builder a spec went to (its prefix)."""

    TIMM = "timm"  # timm:<name> or timm:<folder>
    HF = "hf"  # hf:<family>, hf:<folder>, hf:<config.json>, hf:<file.gguf>
    DEMO = "demo"  # demo:<name>
    FACTORY = "factory"  # <file.py>:<callable>

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SentenceFolder:
    """What a sentence-transformers folder adds to its encoder."""

    folder: str  # the checkpoint folder
    modules: tuple[tuple[str, str, str], ...]  # (name, path, class name) in pipeline order
    pooling: tuple[tuple[str, Any], ...]  # 1_Pooling/config.json items
    supported: str = ""  # why an export cannot carry the pipeline over ("" when it can)

    @property
    def pooling_mode(self) -> str:
        """The pooling's mode: ``mean``, ``cls``, ``max``... (``mean`` when unstated)."""
        modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                 for k, v in self.pooling if k.startswith("pooling_mode_") and v is True]
        return "+".join(modes) or "mean"

    @property
    def normalized(self) -> bool:
        return any(kind == "Normalize" for _n, _p, kind in self.modules)

    def summary(self) -> str:
        """One line for people: what the folder is and what quality measures."""
        text = (f"{self.folder} is a sentence-transformers folder ("
                f"{' -> '.join(kind for _n, _p, kind in self.modules)}): the encoder is "
                f"pruned, its quality is the cosine of the {self.pooling_mode}-pooled"
                f"{', normalised' if self.normalized else ''} embedding")
        if self.pooling_mode not in ("mean", "cls"):
            text += (f" (measured on mean-pooled hidden states: {self.pooling_mode} pooling "
                     f"is not measured apart)")
        return text


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a spec, ready to trace."""

    model: nn.Module  # in eval mode
    example_inputs: tuple[Any, ...]  # positional args for model(*example_inputs)
    spec: str  # the spec string it was built from
    family: ModelFamily
    kind: ModelKind  # what the inputs are
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
    family: ModelFamily
    kind: ModelKind
    hf_config: Any | None = None
    vocab_size: int | None = None  # token-id range for "lm"/"encoder" inputs
    task: Task = Task.OTHER
    tokenizer: Any | None = None
    source: str = ""  # the checkpoint folder the weights came from, if any
    pretrained: bool = False
    notes: tuple[str, ...] = ()
    sentence: SentenceFolder | None = None
