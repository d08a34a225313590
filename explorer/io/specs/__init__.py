"""Model specs: turn a short string into a random-init model plus example inputs.

Accepted forms:

* ``timm:<name>[?k=v&...]``: ``timm.create_model(name, pretrained=False, **kwargs)``.
* ``hf:<family>[?k=v&...]``: a small built-in transformers config (see ``hf_families()``); query
  fields override config fields, e.g. ``hf:llama?hidden_size=4096&num_hidden_layers=32``.
* ``hf:<local folder>[?task=...&k=v]``: a transformers checkpoint folder (config, single or
  sharded weights, tokenizer) via ``from_pretrained(..., local_files_only=True)``; ``task`` is
  causal-lm, masked-lm, encoder, encoder-cls, sequence-classification or image-classification
  (default: the config's ``architectures``; a sentence-transformers folder is its encoder).
* ``hf:<file.gguf>[?task=...]`` or ``hf:<folder>?gguf_file=NAME``: a llama.cpp GGUF checkpoint
  (weights, config and tokenizer in one file), dequantized by transformers to a plain float
  model that exports as safetensors.
* ``hf:<path/to/config.json>[?k=v&...]``: a local transformers config file (with ``model_type``),
  random weights.
* ``demo:<name>``: a built-in demo from ``explorer.demos`` (see ``list_demos()``).
* ``<path>.py:<callable>``: a user factory returning a module or ``(module, example_inputs)``.

Weights are never downloaded; ``load_model(..., weights=...)`` loads a local state dict (a
``.safetensors`` file, a sharded ``*.index.json`` or a ``torch.save``-d dict).

One module per spec form (``_timm``, ``_hf``, ``_factory``; demos are built here), plus the
option query (``_query``), example inputs (``_inputs``), local weights (``_weights``) and the
shared error and records (``_types``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...demos.hf_configs import HF_FAMILIES
from ...graph.walk import to_device
from ...prune.validate import nonfinite_text, nonfinite_weights
from ...quality.task import Task, infer_task
from ._factory import build_factory
from ._files import check_folder as check_checkpoint_files
from ._hf import build_hf
from ._hf_folder import has_weights
from ._inputs import check_input_shape, resized_inputs, seeded
from ._inputs import parse_input_shape as parse_input_shape
from ._offloaded import Offloaded as Offloaded
from ._offloaded import load_offloaded as load_offloaded
from ._query import parse_value as _parse_value  # noqa: F401  (tests import it from here)
from ._query import split_query
from ._sentence import SentenceFolder as SentenceFolder
from ._sentence import write_sentence_files as write_sentence_files
from ._timm import build_timm
from ._types import ATTENTION as ATTENTION
from ._types import Built
from ._types import LoadedModel as LoadedModel
from ._types import ModelFamily as ModelFamily
from ._types import SpecError as SpecError
from ._weights import load_weights

__all__ = [
    "ATTENTION",
    "LoadedModel",
    "ModelFamily",
    "Offloaded",
    "SentenceFolder",
    "SpecError",
    "check_checkpoint_files",
    "checkpoint_folder",
    "hf_families",
    "is_code_spec",
    "list_demos",
    "load_model",
    "load_offloaded",
    "parse_input_shape",
    "spec_paths",
    "write_sentence_files",
]

SPEC_FORMS = (
    "timm:<name>[?k=v&...]",
    "hf:<family>[?k=v&...]",
    "hf:<local checkpoint folder>[?task=...]",
    "hf:<file.gguf>",
    "hf:<path/to/config.json>",
    "demo:<name>",
    "<path/to/file.py>:<callable>",
)


def list_demos() -> list[str]:
    """Names accepted by ``demo:<name>``."""
    from explorer.demos import DEMOS

    return list(DEMOS)


def hf_families() -> list[str]:
    """Names accepted by ``hf:<family>``."""
    return list(HF_FAMILIES)


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_weights: bool = False,
    allow_code: bool = True,
) -> LoadedModel:
    """Build the model a spec names, with random weights (seeded with 0) or a local state dict.

    Args:
        spec: one of the forms in the module docstring.
        device: where to build; ``"meta"`` builds shapes only, without memory for weights.
        input_shape: replaces the default example input shape: the full image shape with batch
            for vision models, ``(batch, seq_len)`` for language models.
        weights: a local ``.safetensors`` file or a ``torch.save``-d state dict
            (raw, or under a ``"state_dict"`` / ``"model"`` key).
        trust_weights: allow arbitrary pickles in ``torch.load`` (``weights_only=False``);
            only for files you trust.
        allow_code: build ``file.py:fn`` specs (this imports and runs the file); servers and
            loaders of untrusted input pass False.

    Returns:
        The model in eval mode and its example inputs, on ``device``.

    Raises:
        SpecError: if the spec, the input shape or the weights file is wrong.
    """
    shape = check_input_shape(input_shape)
    if not allow_code and is_code_spec(spec):
        raise SpecError(
            f"model spec {spec!r} names a Python file, and running code from a spec is off "
            "here; use a timm:, hf: or demo: spec (the app enables factory specs only when "
            "started with PRUNING_EXPLORER_ALLOW_FACTORY=1)"
        )
    if weights is not None and torch.device(device).type == "meta":
        raise SpecError(
            f"cannot load weights {os.fspath(weights)!r} into a model on the meta device; "
            "build on 'cpu' (or a GPU) to load weights, or drop the weights for a meta build"
        )
    with seeded(device):
        built = _build(spec, device)
        inputs = built.example_inputs
        if shape is not None:
            inputs = resized_inputs(inputs, shape, built, spec)
    model = built.model
    notes = built.notes
    if weights is not None:
        load_weights(model, Path(weights), trust_weights)
    if weights is not None or built.pretrained:
        found = nonfinite_weights(model)
        if found:
            source = os.fspath(weights) if weights is not None else built.source or spec
            notes += (f"the weights of {source} are not finite: {nonfinite_text(found)}; "
                      "tracing works, pruning refuses them",)
    model.eval()
    return LoadedModel(
        model=model,
        example_inputs=tuple(to_device(x, device) for x in inputs),
        spec=spec,
        family=built.family,
        kind=built.kind,
        hf_config=built.hf_config,
        task=built.task if built.task is not Task.OTHER else infer_task(model),
        tokenizer=built.tokenizer,
        pretrained=built.pretrained or weights is not None,
        notes=notes,
        sentence=built.sentence,
    )


def is_code_spec(spec: str) -> bool:
    """Whether building ``spec`` imports and runs a user's Python file (``file.py:fn``).

    Only a caller who passes such a spec itself may build it: it is code execution.
    """
    prefix, sep, _rest = spec.partition(":")
    if sep and prefix in ("timm", "hf", "demo"):
        return False
    path, sep, _attr = spec.rpartition(":")
    return bool(sep) and path.endswith(".py")


def _build(spec: str, device: str) -> Built:
    """Dispatch on the spec's form to its builder."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "timm":
        return build_timm(rest, device)
    if sep and prefix == "hf":
        return build_hf(rest, device)
    if sep and prefix == "demo":
        return _build_demo(rest, device)
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return build_factory(Path(path), attr, device)
    raise SpecError(
        f"model spec {spec!r} is not recognised; use one of: " + ", ".join(SPEC_FORMS)
    )


def _build_demo(name: str, device: str) -> Built:
    """``demo:<name>``: a built-in demo from ``explorer.demos``."""
    from explorer.demos import DEMOS, KIND

    if name not in DEMOS:
        raise SpecError(f"unknown demo {name!r}; use one of {', '.join(DEMOS)}")
    with torch.device(device):
        model, inputs = DEMOS[name]()
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    return Built(model, tuple(inputs), ModelFamily.DEMO, KIND[name], vocab_size=vocab)


def checkpoint_folder(spec: str) -> Path | None:
    """The local transformers folder with weights that an ``hf:FOLDER[?...]`` spec names,
    else None."""
    if not spec.startswith("hf:"):
        return None
    name, options = split_query(spec[3:], "hf")
    if "gguf_file" in options or name.lower().endswith(".gguf"):
        return None  # one GGUF file, not a folder of safetensors shards
    folder = Path(name)
    return folder if folder.is_dir() and has_weights(folder) else None


def spec_paths(spec: str) -> list[Path]:
    """The local files and folders building ``spec`` reads (a checkpoint folder, a config
    file, a factory's file); none for built-in names. Writers keep clear of them
    (`explorer.io.paths.check_out_apart`)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("hf", "timm"):
        name = rest.partition("?")[0]
        return [Path(name)] if name and Path(name).exists() else []
    if is_code_spec(spec):
        return [Path(spec.rpartition(":")[0])]
    return []
