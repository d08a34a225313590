"""The closed vocabularies of the coupling analysis: every analysis compares these, never text.

User-facing wording (pin reasons, titles) is free text for people; decisions are taken on
these enums. They are ``str`` enums so JSON output keeps the plain values.
"""
from __future__ import annotations

import enum


class AxisRole(str, enum.Enum):
    """What one axis of a group indexes."""

    CHANNELS = "channels"  # plain channels / hidden units
    HEADS = "heads"  # attention heads (key/value heads under GQA: the outermost head axis)
    HEAD_REPEAT = "head-repeat"  # query heads per key/value head (GQA)
    HEAD_DIM = "head-dim"  # dims inside each head
    GROUPS = "groups"  # conv / group-norm groups
    FIXED = "fixed"  # a pinned factor of a composite layout (e.g. the q/k/v split)

    def __str__(self) -> str:
        return self.value

    def words(self, size: int = 0, gqa: bool = False) -> str:
        """What a person calls this axis (the one home of these words: the statement, the
        Groups page, the Model page's table): ``dims per head``, ``key/value groups`` for the
        heads axis under GQA (``gqa``), ``q/k/v`` for a fixed axis of ``size`` 3."""
        if self is AxisRole.FIXED:
            return "q/k/v" if size == 3 else "fixed"
        if self is AxisRole.HEADS and gqa:
            return "key/value groups"
        return _ROLE_WORDS[self]


_ROLE_WORDS = {AxisRole.CHANNELS: "channels", AxisRole.HEADS: "heads",
               AxisRole.HEAD_REPEAT: "query heads per key/value group",
               AxisRole.HEAD_DIM: "dims per head", AxisRole.GROUPS: "groups"}


class HeadMode(str, enum.Enum):
    """How the pruner treats attention heads."""

    DIMS = "dims"  # remove the same dims from every head
    WHOLE = "whole"  # remove whole heads (whole key/value groups with their query heads, GQA)
    QUERY = "query"  # query heads inside every key/value group, keys/values kept (no GQA: whole)
    KEEP = "keep"  # leave attention alone: no attention parameter changes

    def __str__(self) -> str:
        return self.value


class Target(str, enum.Enum):
    """What a group is, for choosing what to cut (`explorer.coupling.targets.target_of`)."""

    MLP = "mlp"  # hidden units of a feed-forward block (between linear layers)
    HEADS = "heads"  # attention heads and the dims inside them
    RESIDUAL = "residual"  # a residual stream: the hidden size, with embeddings and norms
    CHANNELS = "channels"  # any other channels: convolutions, plain layers

    def __str__(self) -> str:
        return self.value


class PinKind(str, enum.Enum):
    """Why elements are pinned (must not be pruned); the pin's text says it for people."""

    MODEL_IO = "model-io"  # a model input or output dim
    CONSTANT = "constant"  # a plain tensor attribute or constant the engine cannot resize
    SPATIAL = "spatial"  # spatial positions, kernel taps: not channels at all
    INDEXED = "indexed"  # selected by a constant, indexed or ordered by data
    STRUCTURE = "structure"  # a layout the engine follows but must keep (q/k/v split, gates)
    UNSUPPORTED = "unsupported"  # an op with no rule, a failing rule, an opaque view
    CONFLICT = "conflict"  # reshapes that factor the same channels incompatibly

    def __str__(self) -> str:
        return self.value


class Tag(str, enum.Enum):
    """Marks rules put on element dims so the analysis can name axes."""

    ATTENTION_HEAD = "attention-head"
    ATTENTION_BATCH = "attention-batch"
    CONV_GROUPS = "conv-groups"
    NORM_GROUPS = "norm-groups"

    def __str__(self) -> str:
        return self.value


HEAD_TAGS = frozenset({Tag.ATTENTION_HEAD, Tag.ATTENTION_BATCH})
GROUP_TAGS = frozenset({Tag.CONV_GROUPS, Tag.NORM_GROUPS})
