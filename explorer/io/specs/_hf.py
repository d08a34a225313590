"""``hf:<family>`` and ``hf:<config.json>``: random-init transformers models from small configs.

``HF_FAMILIES`` (`explorer.demos.hf_configs`) holds the built-in families and their small
default configs (fast on CPU); the ``llama`` demo builds from the same llama defaults.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...demos.hf_configs import DEFAULT_SEQ_LEN, HF_FAMILIES
from ...quality.task import ModelKind, Task
from ..own_code import refuse_own_code
from ._gguf import build_gguf, gguf_target
from ._hf_folder import KIND, build_folder, choose_task, read_config_json
from ._pruned_folder import ORIGINAL_CONFIG, build_pruned, is_pruned_folder
from ._query import is_count, split_query
from ._types import ATTENTION, Built, ModelFamily, SpecError, one_line


def build_hf(text: str, device: str) -> Built:
    """A built-in family or a local config file, with query options overriding config fields.

    Raises:
        SpecError: for an unknown family, a missing or unreadable config, or an unknown field.
    """
    name, overrides = split_query(text, "hf")
    attn = overrides.pop("attn_implementation", ATTENTION)
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
        if not name.endswith(".json") and not Path(name).exists():
            raise SpecError(f"no folder {name!r} (from 'hf:{text}'); give a transformers "
                            f"checkpoint folder, a .gguf file or a config.json that exist")
        config, kind = _hf_config_from_file(Path(name), overrides)
        if requested_task is not None:
            kind = KIND.get(choose_task(config, requested_task, f"'hf:{text}'"),
                            ModelKind.ENCODER)
    else:
        raise SpecError(
            f"unknown transformers family {name!r} in 'hf:{text}' (and no folder of that "
            f"name here); use one of {', '.join(HF_FAMILIES)}, a checkpoint folder or a "
            f"path to a local config.json"
        )
    from transformers import AutoModel, AutoModelForCausalLM

    auto_cls = AutoModelForCausalLM if kind is ModelKind.LM else AutoModel
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
    task = Task.CAUSAL_LM if kind is ModelKind.LM else Task.ENCODER
    return Built(model, (ids,), ModelFamily.HF, kind, hf_config=config, vocab_size=vocab, task=task)


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


def _hf_config_from_file(path: Path, overrides: Mapping[str, Any]) -> tuple[Any, ModelKind]:
    """Config and kind (LM or ENCODER) from a local config.json (random weights)."""
    refuse_own_code(path, SpecError)
    data = read_config_json(path)
    model_type = data.pop("model_type")
    config = _hf_config(model_type, {**data, "use_cache": False}, overrides)
    return config, _hf_kind(config)


def _hf_kind(config: Any) -> ModelKind:
    """LM for causal LMs, else ENCODER, from ``architectures`` or the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None)  # a list, unless hand-edited
    if isinstance(architectures, list) and architectures:
        causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        return ModelKind.LM if causal else ModelKind.ENCODER
    if config.model_type in HF_FAMILIES:
        return HF_FAMILIES[config.model_type].kind
    return ModelKind.LM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
        else ModelKind.ENCODER


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
