"""``hf:<local folder>``: a transformers checkpoint on disk, weights and tokenizer included.

Everything goes through ``from_pretrained(folder, local_files_only=True)``, so nothing is ever
downloaded; ``pytorch_model.bin`` checkpoints load with ``weights_only=True`` (no pickled code
runs). The auto class comes from ``?task=`` or else the config's ``architectures``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...quality.task import Task, task_of_architecture
from ..quiet import quiet_transformers
from ._types import Built, SpecError

# weight files of a transformers checkpoint folder, in the order from_pretrained prefers them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model",
                   "vocab.json")
EXAMPLE_TEXT = "Structural pruning removes whole channels, heads and units from a network."

AUTO_CLASS = {
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.MASKED_LM: "AutoModelForMaskedLM",
    Task.ENCODER: "AutoModel",
    Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
}
KIND = {Task.CAUSAL_LM: "lm", Task.IMAGE_CLASSIFICATION: "vision"}  # else "encoder"


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers weights file (single or sharded)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def choose_task(config: Any, requested: Any, where: str) -> Task:
    """``?task=`` if given, else the task of the config's first known architecture.

    Raises:
        SpecError: for an unknown task name.
    """
    if requested is not None:
        try:
            return Task(str(requested))
        except ValueError:
            names = ", ".join(t.value for t in AUTO_CLASS)
            raise SpecError(f"unknown task {requested!r} in {where}; use one of {names}") \
                from None
    for arch in getattr(config, "architectures", None) or []:
        task = task_of_architecture(str(arch))
        if task is not None:
            return task
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return Task.CAUSAL_LM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
        else Task.ENCODER


def build_folder(folder: Path, config: Any, task: Task, attn: str, device: str) -> Built:
    """The model of ``folder`` with its weights (random weights on meta or without weight
    files), its tokenizer and example inputs made from real text.

    Raises:
        SpecError: if transformers cannot build or load the checkpoint.
    """
    import transformers

    auto_cls = getattr(transformers, AUTO_CLASS[task])
    on_meta = torch.device(device).type == "meta"
    notes: list[str] = []
    try:
        if has_weights(folder) and not on_meta:
            with quiet_transformers():  # no "Loading weights" bar on the caller's stderr
                model, info = auto_cls.from_pretrained(
                    str(folder), config=config, local_files_only=True, weights_only=True,
                    attn_implementation=attn, output_loading_info=True)
            model.to(device)
            notes += _loading_notes(info, folder)
        else:
            with torch.device(device):
                model = auto_cls.from_config(config, attn_implementation=attn)
            if not on_meta:
                notes.append(f"{folder} holds no weights file ({', '.join(WEIGHT_FILES)}): "
                             "the model has random weights")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SpecError(f"cannot load the transformers checkpoint {str(folder)!r} as "
                        f"{auto_cls.__name__}: {type(e).__name__}: {e}".splitlines()[0]) from e
    tokenizer = load_tokenizer(folder)
    inputs = example_inputs(model, config, task, tokenizer)
    vocab = getattr(config, "vocab_size", None)
    return Built(model, inputs, "hf", KIND.get(task, "encoder"), hf_config=config,
                 vocab_size=int(vocab) if vocab else None, task=task, tokenizer=tokenizer,
                 source=str(folder), pretrained=has_weights(folder) and not on_meta,
                 notes=tuple(notes))


def load_tokenizer(folder: Path) -> Any | None:
    """The folder's tokenizer (``AutoTokenizer``, local files only), or None if it has none.

    Raises:
        SpecError: if tokenizer files are there but cannot be read.
    """
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise SpecError(f"cannot load the tokenizer in {str(folder)!r}: {e}".splitlines()[0]) \
            from e


def _loading_notes(info: Mapping[str, Any], folder: Path) -> list[str]:
    """One note per kind of key that did not load cleanly (e.g. a new classifier head)."""
    notes = []
    for label, key in (("newly initialised (not in the checkpoint)", "missing_keys"),
                       ("in the checkpoint but unused", "unexpected_keys"),
                       ("skipped for a shape mismatch", "mismatched_keys")):
        keys = sorted(str(k) for k in info.get(key) or [])
        if keys:
            notes.append(f"{len(keys)} weight(s) {label} in {folder}: {', '.join(keys[:3])}"
                         f"{' ...' if len(keys) > 3 else ''}")
    return notes


def example_inputs(model: nn.Module, config: Any, task: Task,
                    tokenizer: Any | None) -> tuple[Any, ...]:
    """Token ids of `EXAMPLE_TEXT` (random ids without a tokenizer), or random pixels."""
    if task is Task.IMAGE_CLASSIFICATION:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        return (torch.randn(1, getattr(config, "num_channels", 3), size, size),)
    if tokenizer is not None:
        ids = tokenizer(EXAMPLE_TEXT, return_tensors="pt")["input_ids"]
        return (ids.long(),)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    return (torch.randint(0, vocab, (1, 16)),)


def read_config_json(file: Path) -> dict[str, Any]:
    """The dict in a config.json.

    Raises:
        SpecError: if it is missing or not a JSON object with ``model_type``.
    """
    if not file.is_file():
        raise SpecError(f"transformers config file {str(file)!r} does not exist")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read transformers config {str(file)!r}: {e}") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise SpecError(
            f"transformers config {str(file)!r} has no 'model_type' field; "
            "add one, e.g. \"model_type\": \"llama\""
        )
    return data
