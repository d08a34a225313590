"""``hf:<local folder>``: a transformers checkpoint on disk, weights and tokenizer included.

Everything goes through ``from_pretrained(folder, local_files_only=True,
trust_remote_code=False)``, so nothing is ever downloaded and no code of the folder is imported
(`explorer.io.own_code` refuses folders that ask for it before); ``pytorch_model.bin``
checkpoints load with ``weights_only=True`` (no pickled code runs), and the shards an index
names must be files inside the folder (`explorer.io.paths.shard_files`). The auto class comes
from ``?task=`` or else the config's ``architectures``; a sentence-transformers folder
(``modules.json``) is its encoder (`._sentence`).

A head the checkpoint lacks is never used silently: when the task came from
``architectures`` the base model is loaded instead, with one note saying so; a task asked
for with ``?task=`` gets its head newly initialised (one note), except a language-model head,
through which every quality measure would be noise: that load is refused. transformers' own
load report is silenced (`explorer.io.quiet`): the note replaces it.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...quality.task import ModelKind, Task, task_of_architecture
from ..jsonfile import read_json
from ..paths import shard_files
from ..quiet import quiet_transformers
from ._files import (
    check_folder,
    mismatch_error,
    pickle_files,
    pickle_refusal,
    quiet_unpickler,
)
from ._sentence import read_sentence_folder
from ._types import Built, ModelFamily, SpecError, one_line

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
    Task.ENCODER_CLS: "AutoModel",
    Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
}
KIND = {Task.CAUSAL_LM: ModelKind.LM, Task.IMAGE_CLASSIFICATION: ModelKind.VISION}  # else ENCODER
_NEEDS_HEAD = (Task.CAUSAL_LM, Task.MASKED_LM)  # measured through the head's own weights


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
    archs = getattr(config, "architectures", None)
    for arch in archs if isinstance(archs, list) else []:  # a list, unless hand-edited
        task = task_of_architecture(str(arch))
        if task is not None:
            return task
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return Task.CAUSAL_LM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
        else Task.ENCODER


def build_folder(folder: Path, config: Any, task: Task, attn: str, device: str,
                 requested: bool = False) -> Built:
    """The model of ``folder`` with its weights (random weights on meta or without weight
    files), its tokenizer and example inputs made from real text.

    Args:
        requested: ``task`` was asked for with ``?task=`` (else it came from the config).

    Raises:
        SpecError: if transformers cannot build or load the checkpoint, or the checkpoint
            lacks the language-model head ``?task=`` asked for.
    """
    sentence = read_sentence_folder(folder)
    notes: list[str] = []
    if sentence is not None:
        if not requested:
            task = Task.ENCODER_CLS if sentence.pooling_mode == "cls" else Task.ENCODER
        notes.append(sentence.summary())
    model, loaded = _load(folder, config, task, attn, device, notes)
    head = _missing_head(model, loaded)
    if head and requested and task in _NEEDS_HEAD:
        raise SpecError(f"{folder} holds no weights for the {task.value} head that ?task="
                        f"{task.value} asks for ({_keys(head)}); a random head makes its "
                        f"quality noise: use ?task=encoder to prune the encoder it holds")
    if head and not requested and task not in (Task.ENCODER, Task.ENCODER_CLS):
        names = ", ".join(map(str, getattr(config, "architectures", None) or [task.value]))
        model, loaded = _load(folder, config, Task.ENCODER, attn, device, [])
        notes.append(f"{folder} holds no weights for the head of {names} ({_keys(head)}): "
                     f"loaded the base model {type(model).__name__} instead (its hidden "
                     f"states are what quality measures)" +
                     ("" if task in _NEEDS_HEAD else
                      f"; ask for a new, randomly initialised head with ?task={task.value}"))
        task = Task.ENCODER
    elif head:
        notes.append(f"{folder} holds no weights for the {task.value} head ({_keys(head)}): "
                     f"it is newly initialised (random), as ?task={task.value} asks")
    notes += _loading_notes(loaded, folder, set(head))
    tokenizer = load_tokenizer(folder)
    try:
        inputs = example_inputs(model, config, task, tokenizer)
    except Exception as e:  # noqa: BLE001 - a hand-edited tokenizer config fails in any type
        raise SpecError(f"the tokenizer in {str(folder)!r} cannot encode text: "
                        f"{type(e).__name__}: {one_line(e)}") from e
    vocab = getattr(config, "vocab_size", None)
    return Built(model, inputs, ModelFamily.HF, KIND.get(task, ModelKind.ENCODER), hf_config=config,
                 vocab_size=int(vocab) if vocab else None, task=task, tokenizer=tokenizer,
                 source=str(folder), pretrained=has_weights(folder) and
                 torch.device(device).type != "meta", notes=tuple(notes), sentence=sentence)


def _load(folder: Path, config: Any, task: Task, attn: str, device: str, notes: list[str]
          ) -> tuple[nn.Module, Mapping[str, Any]]:
    """The auto class of ``task`` from ``folder``'s weights (or random ones on meta or
    without weight files), and transformers' loading info (empty when nothing was loaded)."""
    import transformers

    auto_cls = getattr(transformers, AUTO_CLASS[task])
    on_meta = torch.device(device).type == "meta"
    info: Mapping[str, Any] = {}
    if not on_meta:
        for index in WEIGHT_FILES:
            if index.endswith(".index.json") and (folder / index).is_file():
                shard_files(folder / index, SpecError)  # shards inside the folder, or refused
    try:
        if has_weights(folder) and not on_meta:
            check_folder(folder)  # a truncated shard: named here, not deep in the loader
            # no bar, no load report (our notes say what matters), no unpickler warnings
            with quiet_transformers(), quiet_unpickler():
                model, info = auto_cls.from_pretrained(
                    str(folder), config=config, local_files_only=True, weights_only=True,
                    attn_implementation=attn, output_loading_info=True,
                    ignore_mismatched_sizes=True,  # refused below, by name
                    trust_remote_code=False)
            mismatch = mismatch_error(folder, info.get("mismatched_keys") or ())
            if mismatch is not None:
                raise mismatch
            model.to(device)
        else:
            with torch.device(device):
                model = auto_cls.from_config(config, attn_implementation=attn,
                                             trust_remote_code=False)
            if not on_meta:
                notes.append(f"{folder} holds no weights file ({', '.join(WEIGHT_FILES)}): "
                             "the model has random weights")
    except SpecError:
        raise
    except pickle.UnpicklingError as e:  # a weights-only load refused a pickled file
        files = pickle_files(folder)
        culprit = files[0] if len(files) == 1 else f"a pickled weights file of '{folder}'"
        raise SpecError(pickle_refusal(culprit, e)) from e
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        raise SpecError(f"cannot load the transformers checkpoint {str(folder)!r} as "
                        f"{auto_cls.__name__}: {type(e).__name__}: {one_line(e)}") from e
    return model, info


def _missing_head(model: nn.Module, info: Mapping[str, Any]) -> list[str]:
    """Weights outside the base model that the checkpoint did not hold (a task head)."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return []  # the model is its own base: no head to lack
    return sorted(str(k) for k in info.get("missing_keys") or []
                  if not str(k).startswith(prefix + "."))


def _keys(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_tokenizer(folder: Path) -> Any | None:
    """The folder's tokenizer (``AutoTokenizer``, local files only), or None if it has none.

    Raises:
        SpecError: if tokenizer files are there but cannot be read.
    """
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a hand-edited tokenizer config fails in any type
        raise SpecError(f"cannot load the tokenizer in {str(folder)!r}: {type(e).__name__}: "
                        f"{e}".splitlines()[0]) from e


def _loading_notes(info: Mapping[str, Any], folder: Path, said: set[str]) -> list[str]:
    """One note per kind of key that did not load cleanly, beyond the head ones in ``said``."""
    notes = []
    for label, key in (("newly initialised (not in the checkpoint)", "missing_keys"),
                       ("in the checkpoint but unused", "unexpected_keys"),
                       ("skipped for a shape mismatch", "mismatched_keys")):
        keys = sorted(str(k) for k in info.get(key) or [] if str(k) not in said)
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
    data = read_json(file, "transformers config", SpecError)
    if not isinstance(data, dict) or "model_type" not in data:
        raise SpecError(
            f"transformers config {str(file)!r} has no 'model_type' field; "
            "add one, e.g. \"model_type\": \"llama\""
        )
    return data
