"""Model specs: turn a short string into a random-init model plus example inputs.

Accepted forms:

* ``timm:<name>[?k=v&...]``: ``timm.create_model(name, pretrained=False, **kwargs)``.
* ``hf:<family>[?k=v&...]``: a small built-in transformers config (see ``hf_families()``); query
  fields override config fields, e.g. ``hf:llama?hidden_size=4096&num_hidden_layers=32``.
* ``hf:<path/to/config.json>[?k=v&...]``: a local transformers config file (with ``model_type``).
* ``demo:<name>``: a built-in demo from ``explorer.demos`` (see ``list_demos()``).
* ``<path>.py:<callable>``: a user factory returning a module or ``(module, example_inputs)``.

Weights are never downloaded; ``load_model(..., weights=...)`` loads a local state dict.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import torch
from torch import nn

__all__ = [
    "LoadedModel",
    "SpecError",
    "hf_families",
    "list_demos",
    "load_model",
    "parse_input_shape",
]

SPEC_FORMS = (
    "timm:<name>[?k=v&...]",
    "hf:<family>[?k=v&...]",
    "hf:<path/to/config.json>",
    "demo:<name>",
    "<path/to/file.py>:<callable>",
)
_DEFAULT_SEQ_LEN = 16
_DEFAULT_IMAGE = (3, 224, 224)


class SpecError(ValueError):
    """A model spec, input shape or weights file the user gave is wrong.

    The message says what is wrong, where, and what to do about it.
    """


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a spec, ready to trace."""

    model: nn.Module  # in eval mode
    example_inputs: tuple[Any, ...]  # positional args for model(*example_inputs)
    spec: str  # the spec string it was built from
    family: str  # "timm" | "hf" | "demo" | "factory"
    kind: str  # "vision" | "lm" | "encoder" | "other": what the inputs are
    hf_config: Any | None = None  # transformers PretrainedConfig for hf models, else None


@dataclass(frozen=True)
class _HFFamily:
    """A built-in transformers family: its config type, model class and small default config."""

    model_type: str  # transformers ``model_type`` passed to ``AutoConfig.for_model``
    kind: str  # "lm" (AutoModelForCausalLM) or "encoder" (AutoModel)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # small shape, fast on CPU


def _decoder_defaults(**extra: Any) -> Mapping[str, Any]:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return MappingProxyType({**base, **extra})


_HF_FAMILIES: Mapping[str, _HFFamily] = MappingProxyType(
    {
        "llama": _HFFamily("llama", "lm", _decoder_defaults()),
        "qwen2": _HFFamily("qwen2", "lm", _decoder_defaults()),
        "mistral": _HFFamily("mistral", "lm", _decoder_defaults()),
        # gemma's default head_dim is 256, independent of hidden_size / heads.
        "gemma": _HFFamily("gemma", "lm", _decoder_defaults(head_dim=8)),
        # phi3's default bos/eos/pad ids (1/32000/32000) fall outside a 256-token vocab.
        "phi3": _HFFamily("phi3", "lm", _decoder_defaults(pad_token_id=0, eos_token_id=2)),
        "gpt2": _HFFamily(
            "gpt2",
            "lm",
            MappingProxyType(
                dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=256,
                     bos_token_id=0, eos_token_id=0)
            ),
        ),
        "bert": _HFFamily(
            "bert",
            "encoder",
            MappingProxyType(
                dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                     intermediate_size=128, vocab_size=256, max_position_embeddings=128)
            ),
        ),
    }
)


@dataclass(frozen=True)
class _Built:
    """What a family builder returns before inputs are resized, weights loaded and eval set."""

    model: nn.Module
    example_inputs: tuple[Any, ...]
    family: str
    kind: str
    hf_config: Any | None = None
    vocab_size: int | None = None  # token-id range for "lm"/"encoder" inputs


# ----------------------------------------------------------------------------- public API


def list_demos() -> list[str]:
    """Names accepted by ``demo:<name>``."""
    from explorer.demos import DEMOS

    return list(DEMOS)


def hf_families() -> list[str]:
    """Names accepted by ``hf:<family>``."""
    return list(_HF_FAMILIES)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` or ``"1x3x224x224"`` into a tuple of positive ints.

    Raises:
        SpecError: if the text is empty or holds anything but positive integers.
    """
    cleaned = text.strip().strip("()[]").lower().replace("x", ",")
    parts = [p.strip() for p in cleaned.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # allow a trailing comma, as in "(1, 16,)"
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise SpecError(
            f"input shape {text!r} is not a list of positive integers; "
            "write it like '1,3,224,224' or '1x3x224x224'"
        )
    return dims


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_weights: bool = False,
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

    Returns:
        The model in eval mode and its example inputs, on ``device``.

    Raises:
        SpecError: if the spec, the input shape or the weights file is wrong.
    """
    shape = _check_input_shape(input_shape)
    if weights is not None and torch.device(device).type == "meta":
        raise SpecError(
            f"cannot load weights {os.fspath(weights)!r} into a model on the meta device; "
            "build on 'cpu' (or a GPU) to load weights, or drop the weights for a meta build"
        )
    with _seeded(device):
        built = _build(spec, device)
        inputs = built.example_inputs
        if shape is not None:
            inputs = _resized_inputs(inputs, shape, built, spec)
    model = built.model
    if weights is not None:
        _load_weights(model, Path(weights), trust_weights)
    model.eval()
    return LoadedModel(
        model=model,
        example_inputs=tuple(_to_device(x, device) for x in inputs),
        spec=spec,
        family=built.family,
        kind=built.kind,
        hf_config=built.hf_config,
    )


# ----------------------------------------------------------------------------- dispatch


def _build(spec: str, device: str) -> _Built:
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "timm":
        return _build_timm(rest, device)
    if sep and prefix == "hf":
        return _build_hf(rest, device)
    if sep and prefix == "demo":
        return _build_demo(rest, device)
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return _build_factory(Path(path), attr, device)
    raise SpecError(
        f"model spec {spec!r} is not recognised; use one of: " + ", ".join(SPEC_FORMS)
    )


def _split_query(text: str, spec_kind: str) -> tuple[str, dict[str, Any]]:
    """Split ``name?k=v&k2=v2`` into the name and parsed keyword values."""
    name, _, query = text.partition("?")
    kwargs: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(
                f"{spec_kind} spec option {item!r} in {text!r} is not 'key=value'; "
                "write options like '?num_classes=7&drop_rate=0.1'"
            )
        if key in kwargs:
            raise SpecError(f"{spec_kind} spec option {key!r} is given twice in {text!r}")
        kwargs[key] = _parse_value(value)
    return name.strip(), kwargs


def _parse_value(text: str) -> Any:
    """Parse a query value: int, float, true/false, none/null, a tuple/list literal such as
    ``(1,1,2,1)``, or else the string itself."""
    lowered = text.strip().lower()
    if text.strip()[:1] in ("(", "["):
        import ast
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            return text
        return tuple(value) if isinstance(value, (list, tuple)) else value
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


# ----------------------------------------------------------------------------- timm


def _build_timm(text: str, device: str) -> _Built:
    import timm

    name, kwargs = _split_query(text, "timm")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(
            f"unknown timm model {name!r}{hint} (timm {timm.__version__}; "
            f"list names with timm.list_models('*{name[:4]}*'))"
        )
    try:
        with torch.device(device):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise SpecError(f"timm model {name!r} rejected options {kwargs}: {e}") from e
    return _Built(model, (torch.randn(1, *_timm_input_size(model, kwargs)),), "timm", "vision")


def _timm_input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """(C, H, W) from the model's cfg, with ``img_size`` / ``in_chans`` options applied.

    timm keeps the pretrained cfg's ``input_size`` even when ``img_size`` is overridden.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chans, height, width = tuple(cfg.get("input_size", _DEFAULT_IMAGE))
    img_size = kwargs.get("img_size")
    if isinstance(img_size, int):
        height = width = img_size
    chans = kwargs.get("in_chans", chans)
    return (int(chans), int(height), int(width))


# ----------------------------------------------------------------------------- transformers


def _build_hf(text: str, device: str) -> _Built:
    name, overrides = _split_query(text, "hf")
    attn = overrides.pop("attn_implementation", "eager")
    if name in _HF_FAMILIES:
        family = _HF_FAMILIES[name]
        config = _hf_config(family.model_type, {**family.defaults, "use_cache": False}, overrides)
        kind = family.kind
    elif name.endswith(".json") or os.sep in name or "/" in name:
        config, kind = _hf_config_from_file(Path(name), overrides)
    else:
        raise SpecError(
            f"unknown transformers family {name!r} in 'hf:{text}'; use one of "
            f"{', '.join(_HF_FAMILIES)} or a path to a local config.json"
        )
    from transformers import AutoModel, AutoModelForCausalLM

    auto_cls = AutoModelForCausalLM if kind == "lm" else AutoModel
    with torch.device(device):
        model = auto_cls.from_config(config, attn_implementation=attn)
    vocab = int(config.vocab_size)
    ids = torch.randint(0, vocab, (1, _DEFAULT_SEQ_LEN))
    return _Built(model, (ids,), "hf", kind, hf_config=config, vocab_size=vocab)


def _hf_config(model_type: str, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """A transformers config of ``model_type`` from ``base`` updated with checked ``overrides``."""
    from transformers import AutoConfig

    try:
        reference = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise SpecError(
            f"transformers {_transformers_version()} does not know model_type {model_type!r}"
        ) from e
    known = set(reference.to_dict()) | set(getattr(reference, "attribute_map", {}))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{model_type} config has no field {key!r}{hint}")
    return AutoConfig.for_model(model_type, **{**base, **overrides})


def _hf_config_from_file(path: Path, overrides: Mapping[str, Any]) -> tuple[Any, str]:
    """Config and kind ("lm" or "encoder") from a local config.json (or a folder holding one)."""
    file = path / "config.json" if path.is_dir() else path
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
    model_type = data.pop("model_type")
    config = _hf_config(model_type, {**data, "use_cache": False}, overrides)
    return config, _hf_kind(config)


def _hf_kind(config: Any) -> str:
    """"lm" for causal LMs, else "encoder", from ``architectures`` or the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        return "lm" if causal else "encoder"
    if config.model_type in _HF_FAMILIES:
        return _HF_FAMILIES[config.model_type].kind
    return "lm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


# ----------------------------------------------------------------------------- demos


def _build_demo(name: str, device: str) -> _Built:
    from explorer.demos import DEMOS, KIND

    if name not in DEMOS:
        raise SpecError(f"unknown demo {name!r}; use one of {', '.join(DEMOS)}")
    with torch.device(device):
        model, inputs = DEMOS[name]()
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    return _Built(model, tuple(inputs), "demo", KIND[name], vocab_size=vocab)


# ----------------------------------------------------------------------------- factories


def _build_factory(path: Path, attr: str, device: str) -> _Built:
    if not path.is_file():
        raise SpecError(f"factory file {str(path)!r} does not exist (spec '{path}:{attr}')")
    module = _import_file(path)
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise SpecError(
            f"{str(path)!r} has no callable {attr!r}; "
            f"callables there: {', '.join(public) or 'none'}"
        )
    try:
        result = factory()
    except Exception as e:  # any user error: report where it happened in the user's file
        raise SpecError(
            f"factory {path}:{attr}() raised {type(e).__name__}: {e} (at {_user_frame(e, path)})"
        ) from e
    model, inputs = _unpack_factory_result(result, path, attr)
    return _Built(model.to(device), inputs, "factory", _guess_kind(inputs))


def _import_file(path: Path) -> ModuleType:
    """Import a Python file by path under a fresh module name."""
    name = f"_explorer_factory_{path.stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken user file: say where
        del sys.modules[name]
        raise SpecError(
            f"importing {str(path)!r} raised {type(e).__name__}: {e} (at {_user_frame(e, path)})"
        ) from e
    return module


def _user_frame(error: BaseException, path: Path) -> str:
    """``file:line`` of the innermost traceback frame inside ``path`` (or the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    target = path.resolve()
    mine = [f for f in frames if Path(f.filename).resolve() == target]
    frame = (mine or frames)[-1] if frames else None
    return f"{frame.filename}:{frame.lineno}" if frame else str(path)


def _unpack_factory_result(result: Any, path: Path, attr: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if isinstance(result, nn.Module):
        return result, (_default_input_for(result, path, attr),)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        inputs = result[1]
        if isinstance(inputs, torch.Tensor):
            return result[0], (inputs,)
        if isinstance(inputs, (tuple, list)):
            return result[0], tuple(inputs)
    raise SpecError(
        f"{path}:{attr}() returned {type(result).__name__}; it must return an nn.Module or "
        "(nn.Module, example_inputs) with example_inputs a tensor or a tuple of them"
    )


def _default_input_for(model: nn.Module, path: Path, attr: str) -> torch.Tensor:
    """A (1, in_features) or (1, C, 224, 224) input guessed from the first Linear / Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, 224, 224)
        if isinstance(module, nn.Linear):
            return torch.randn(1, module.in_features)
    raise SpecError(
        f"{path}:{attr}() returned only a module and no Linear/Conv2d to guess its input from; "
        "return (module, example_inputs) instead"
    )


def _guess_kind(inputs: tuple[Any, ...]) -> str:
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor):
        if first.is_floating_point() and first.dim() == 4:
            return "vision"
        if not first.is_floating_point() and first.dim() == 2:
            return "lm"
    return "other"


# ----------------------------------------------------------------------------- inputs


def _check_input_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    dims = tuple(shape)
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise SpecError(f"input_shape {shape!r} must be a non-empty sequence of positive ints")
    return dims


def _resized_inputs(
    inputs: tuple[Any, ...], shape: tuple[int, ...], built: _Built, spec: str
) -> tuple[Any, ...]:
    """Replace the first example input with one of ``shape``, keeping its dtype."""
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise SpecError(f"{spec!r} has no tensor example input for input_shape {shape} to replace")
    first = inputs[0]
    if built.kind == "vision" and len(shape) != 4:
        raise SpecError(
            f"input_shape {shape} for {spec!r} must be a full image shape (batch, channels, "
            "height, width), e.g. (1, 3, 224, 224)"
        )
    if first.is_floating_point():
        new = torch.randn(shape, dtype=first.dtype)
    else:
        if built.kind in ("lm", "encoder") and len(shape) != 2:
            raise SpecError(
                f"input_shape {shape} for {spec!r} must be (batch, seq_len), e.g. (1, 32)"
            )
        high = built.vocab_size or (int(first.max()) + 1 if first.device.type != "meta" else 1)
        new = torch.randint(0, max(high, 1), shape, dtype=first.dtype)
    return (new, *inputs[1:])


def _to_device(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@contextmanager
def _seeded(device: str) -> Iterator[None]:
    """Seed with 0 for reproducible random weights, restoring the caller's RNG state after."""
    dev = torch.device(device)
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        yield


# ----------------------------------------------------------------------------- weights


def _load_weights(model: nn.Module, path: Path, trust: bool) -> None:
    state = _read_state_dict(path, trust)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise SpecError(
            f"weights {str(path)!r} do not fit the model: " + "; ".join(problems)
            + ". Check that the spec and its options build the same architecture"
        )
    model.load_state_dict(state, strict=True)


def _read_state_dict(path: Path, trust: bool) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... per cause
        hint = "" if trust else "; if you trust this file, pass trust_weights=True"
        raise SpecError(f"cannot load weights {str(path)!r}: {type(e).__name__}: {e}{hint}") from e
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise SpecError(
        f"weights {str(path)!r} hold a {type(obj).__name__}, not a state dict; save "
        "model.state_dict() (or a dict with it under 'state_dict' or 'model')"
    )
