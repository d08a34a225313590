"""``hf:<family>`` and ``hf:<config.json>``: random-init transformers models from small configs.

``HF_FAMILIES`` holds the built-in families and their small default configs (fast on CPU); the
``llama`` demo builds from the same llama defaults.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ...quality.task import Task
from ..own_code import refuse_own_code
from ._gguf import build_gguf, gguf_target
from ._hf_folder import KIND, build_folder, choose_task, read_config_json
from ._pruned_folder import ORIGINAL_CONFIG, build_pruned, is_pruned_folder
from ._query import is_count, split_query
from ._types import Built, SpecError, one_line

DEFAULT_SEQ_LEN = 16  # token ids per example input


@dataclass(frozen=True)
class HFFamily:
    """A built-in transformers family: its config type, model class and small default config."""

    model_type: str  # transformers ``model_type`` passed to ``AutoConfig.for_model``
    kind: str  # "lm" (AutoModelForCausalLM) or "encoder" (AutoModel)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # small shape, fast on CPU


def _decoder_defaults(**extra: Any) -> Mapping[str, Any]:
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    }
    return MappingProxyType({**base, **extra})


HF_FAMILIES: Mapping[str, HFFamily] = MappingProxyType(
    {
        "llama": HFFamily("llama", "lm", _decoder_defaults()),
        "qwen2": HFFamily("qwen2", "lm", _decoder_defaults()),
        "mistral": HFFamily("mistral", "lm", _decoder_defaults()),
        # gemma's default head_dim is 256, independent of hidden_size / heads.
        "gemma": HFFamily("gemma", "lm", _decoder_defaults(head_dim=8)),
        # phi3's default bos/eos/pad ids (1/32000/32000) fall outside a 256-token vocab.
        "phi3": HFFamily("phi3", "lm", _decoder_defaults(pad_token_id=0, eos_token_id=2)),
        "gpt2": HFFamily(
            "gpt2",
            "lm",
            MappingProxyType(
                {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128, "vocab_size": 256,
                     "bos_token_id": 0, "eos_token_id": 0}
            ),
        ),
        "bert": HFFamily(
            "bert",
            "encoder",
            MappingProxyType(
                {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 128}
            ),
        ),
    }
)


def build_hf(text: str, device: str) -> Built:
    """A built-in family or a local config file, with query options overriding config fields.

    Raises:
        SpecError: for an unknown family, a missing or unreadable config, or an unknown field.
    """
    name, overrides = split_query(text, "hf")
    attn = overrides.pop("attn_implementation", "eager")
    requested_task = overrides.pop("task", None)
    gguf = gguf_target(name, overrides)
    if gguf is not None:
        return build_gguf(*gguf, overrides, requested_task, attn, device)
    if Path(name).is_dir():
        folder = Path(name)
        refuse_own_code(folder, SpecError)  # before transformers reads any of it
        if is_pruned_folder(folder):  # a streamed replay's plan + original config
            data = read_config_json(folder / ORIGINAL_CONFIG)
            config = _hf_config(data.pop("model_type"), {**data, "use_cache": False}, overrides)
            task = choose_task(config, requested_task, f"'hf:{text}'")
            return build_pruned(folder, config, task, attn, device)
        data = read_config_json(folder / "config.json")
        config = _hf_config(data.pop("model_type"), {**data, "use_cache": False}, overrides)
        task = choose_task(config, requested_task, f"'hf:{text}'")
        return build_folder(folder, config, task, attn, device, requested_task is not None)
    if name in HF_FAMILIES:
        family = HF_FAMILIES[name]
        config = _hf_config(family.model_type, {**family.defaults, "use_cache": False}, overrides)
        kind = family.kind
    elif name.endswith(".json") or os.sep in name or "/" in name:
        config, kind = _hf_config_from_file(Path(name), overrides)
        if requested_task is not None:
            kind = KIND.get(choose_task(config, requested_task, f"'hf:{text}'"), "encoder")
    else:
        raise SpecError(
            f"unknown transformers family {name!r} in 'hf:{text}'; use one of "
            f"{', '.join(HF_FAMILIES)} or a path to a local config.json"
        )
    from transformers import AutoModel, AutoModelForCausalLM

    auto_cls = AutoModelForCausalLM if kind == "lm" else AutoModel
    try:
        with torch.device(device):
            # transformers leaves from_config unannotated
            model = auto_cls.from_config(  # type: ignore[no-untyped-call]
                config, attn_implementation=attn, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types on bad configs
        raise SpecError(
            f"transformers could not build 'hf:{text}': {type(e).__name__}: {one_line(e)}; "
            "check the config fields (and use attn_implementation=eager or sdpa)"
        ) from e
    vocab = int(config.vocab_size)
    ids = torch.randint(0, vocab, (1, DEFAULT_SEQ_LEN))
    task = Task.CAUSAL_LM if kind == "lm" else Task.ENCODER
    return Built(model, (ids,), "hf", kind, hf_config=config, vocab_size=vocab, task=task)


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
    known |= {n for cls in type(reference).__mro__ for n, v in vars(cls).items()
              if isinstance(v, property) and v.fset is not None}  # e.g. ``num_labels``
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{model_type} config has no field {key!r}{hint}")
    merged = {**base, **overrides}
    for key, value in merged.items():
        _check_field(model_type, key, value, getattr(reference, key, None))
    try:
        return AutoConfig.for_model(model_type, **merged)
    except Exception as e:  # noqa: BLE001 - config classes validate with many error types
        raise SpecError(f"{model_type} config rejected its fields: {one_line(e)}") from e


def _check_field(model_type: str, key: str, value: Any, reference: Any) -> None:
    """Sizes and counts are positive integers; a field that is an int stays an int."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, int) and not isinstance(reference, bool) and value is not None \
            and not is_int:
        raise SpecError(f"{model_type} config field {key!r} must be an integer, got {value!r}")
    if is_count(key) and is_int and value < 1:
        raise SpecError(f"{model_type} config field {key!r} must be at least 1, got {value}")


def _hf_config_from_file(path: Path, overrides: Mapping[str, Any]) -> tuple[Any, str]:
    """Config and kind ("lm" or "encoder") from a local config.json (random weights)."""
    refuse_own_code(path, SpecError)
    data = read_config_json(path)
    model_type = data.pop("model_type")
    config = _hf_config(model_type, {**data, "use_cache": False}, overrides)
    return config, _hf_kind(config)


def _hf_kind(config: Any) -> str:
    """"lm" for causal LMs, else "encoder", from ``architectures`` or the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None)  # a list, unless hand-edited
    if isinstance(architectures, list) and architectures:
        causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        return "lm" if causal else "encoder"
    if config.model_type in HF_FAMILIES:
        return HF_FAMILIES[config.model_type].kind
    return "lm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
