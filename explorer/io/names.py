"""Checkpoint tensor names against a model's own names, as transformers maps them on load.

transformers renames some keys when it loads a checkpoint (GPT-NeoX checkpoints store the
LM head as ``embed_out.weight``; old ones name norm weights ``gamma``/``beta``) and converts
others (per-expert weights fused into one tensor), and its ``save_pretrained`` writes the
checkpoint's names back. Whatever reads or writes tensors by name outside transformers
(streamed replay, ``load_pruned``) reads the model's conversion mapping here.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["CheckpointNames", "checkpoint_names", "dropped_on_load"]


@dataclass
class CheckpointNames:
    """How checkpoint names map to the model's."""

    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    converted: dict[str, str] = field(default_factory=dict)  # -> the tensor it is fused into


def checkpoint_names(model: nn.Module, names: Iterable[str]) -> CheckpointNames:
    """Which of ``names`` transformers would rename or convert loading them into ``model``
    (names the model has are left alone; nothing for a model transformers did not make)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not a transformers model, or another version
        return CheckpointNames()
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out = CheckpointNames()
    for name in names:
        if name in state:
            continue
        new, converter = rename_source_key(name, renamings, converters, prefix, state)
        if converter is not None:
            out.converted[name] = new
        elif new != name:
            out.renamed[name] = new
    return out


def dropped_on_load(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Which of ``names`` are no tensor of the model but ones transformers drops on load
    (``_keys_to_ignore_on_load_unexpected``, e.g. GPT-2's causal-mask ``attn.bias`` buffers
    that old checkpoints hold)."""
    state = model.state_dict()
    patterns = [re.compile(p) for p in
                getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    return {n for n in names if n not in state and any(p.search(n) for p in patterns)}
