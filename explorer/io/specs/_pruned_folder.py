"""``hf:<folder>`` of a pruned checkpoint that no transformers config describes.

`explorer.io.stream.replay_checkpoint` (and the ``safetensors`` export) write such a folder
when the pruned widths differ between layers or a refit added biases: the shards, ``plan.json``
and the unpruned ``original_config.json``. The spec builds the unpruned architecture from that
config, replays the plan on it and loads the shards (`explorer.load_pruned`: weights only, no
code named by the folder); the folder's tokenizer comes with it, so ``evaluate --model
hf:FOLDER`` and ``--generate`` work on it like on any checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...quality.task import ModelKind, Task
from ._hf_folder import AUTO_CLASS, KIND, example_inputs, load_tokenizer
from ._types import Built, ModelFamily, SpecError, one_line

PLAN = "plan.json"
ORIGINAL_CONFIG = "original_config.json"


def is_pruned_folder(folder: Path) -> bool:
    """A folder with ``plan.json`` and ``original_config.json`` and no ``config.json``."""
    return not (folder / "config.json").is_file() and (folder / PLAN).is_file() and \
        (folder / ORIGINAL_CONFIG).is_file()


def build_pruned(folder: Path, config: Any, task: Task, attn: str, device: str) -> Built:
    """The pruned model of ``folder`` (plan replayed on ``config``'s architecture, weights
    loaded; on ``meta`` the plan only), its tokenizer and example inputs.

    Raises:
        SpecError: the plan or the shards do not fit the architecture.
    """
    import transformers

    from ..plan import Plan
    from ..pruned import load_into, read_weights

    auto_cls = getattr(transformers, AUTO_CLASS[task])
    try:
        with torch.device(device):
            model = auto_cls.from_config(config, attn_implementation=attn,
                                         trust_remote_code=False)
        if torch.device(device).type == "meta":
            Plan.load(folder / PLAN).apply(model)
        else:
            plan = Plan.load(folder / PLAN)
            weights = folder / "model.safetensors"
            state = read_weights(weights, folder / "model.safetensors.index.json")
            model = load_into(model, folder, plan, state, weights)
    except (ValueError, OSError, RuntimeError) as e:
        raise SpecError(f"cannot rebuild the pruned model in '{folder}' from "
                        f"{ORIGINAL_CONFIG} and {PLAN}: {one_line(e)}") from e
    tokenizer = load_tokenizer(folder)
    vocab = getattr(config, "vocab_size", None)
    return Built(model, example_inputs(model, config, task, tokenizer), ModelFamily.HF,
                 KIND.get(task, ModelKind.ENCODER), hf_config=model.config,
                 vocab_size=int(vocab) if vocab else None, task=task, tokenizer=tokenizer,
                 source=str(folder), pretrained=torch.device(device).type != "meta",
                 notes=(f"{folder}: the pruned model rebuilt from {ORIGINAL_CONFIG} and "
                        f"{PLAN}",))
