"""Bring a pruned transformers model's ``config`` in line with its new widths.

Attention and MLP modules of transformers models read their widths from the config when
they are built. After pruning, the modules hold the new widths (patched attributes and
resized weights) but ``model.config`` still describes the old model, so ``save_pretrained``
would write a folder that ``from_pretrained`` cannot load. `update_config` reads the widths
from every layer's weights, and when each is the same in every layer writes them into the
config. It then checks the result: the architecture the new config builds (on ``meta``) must
have exactly the pruned model's tensor shapes and module attributes, and rotary
frequencies recomputed from it must equal the pruned ones. ``ok`` says whether
``from_pretrained`` on a saved folder rebuilds this model exactly.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigUpdate", "update_config", "config_widths"]

Reader = Callable[[nn.Module], "dict[str, int] | None"]


@dataclass
class ConfigUpdate:
    """What `update_config` did."""

    changed: dict[str, list[int]] = field(default_factory=dict)  # config key -> [old, new]
    ok: bool = False  # a save_pretrained folder of the model reloads it exactly
    reason: str = ""  # why not, when ``ok`` is False


def _out(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])


def _heads_from(q_out: int, k_out: int | None, head_dim: int) -> dict[str, int] | None:
    if head_dim <= 0 or q_out % head_dim or (k_out is not None and k_out % head_dim):
        return None
    out = {"num_attention_heads": q_out // head_dim, "head_dim": head_dim}
    if k_out is not None:
        out["num_key_value_heads"] = k_out // head_dim
    return out


def _llama_attention(m: nn.Module) -> dict[str, int] | None:
    """Llama, Qwen2, Mistral, Gemma, Phi-3 style: q_proj/k_proj (or qkv_proj) and head_dim."""
    hd = getattr(m, "head_dim", None)
    if not isinstance(hd, int) or not hasattr(m, "o_proj"):
        return None
    if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
        return _heads_from(_out(m.q_proj), _out(m.k_proj), hd)
    return None


def _bert_attention(m: nn.Module) -> dict[str, int] | None:
    """BERT self-attention: query/key/value and attention_head_size."""
    hd = getattr(m, "attention_head_size", None)
    if not isinstance(hd, int) or not hasattr(m, "query"):
        return None
    out = _heads_from(_out(m.query), None, hd)
    if out is not None:
        del out["head_dim"]  # derived from hidden_size / heads in BERT's config
    return out


def _gpt2_attention(m: nn.Module) -> dict[str, int] | None:
    """GPT-2: c_attn (transposed Conv1D) with num_heads/head_dim attributes."""
    if not hasattr(m, "c_attn") or not isinstance(getattr(m, "num_heads", None), int):
        return None
    return {"num_attention_heads": int(m.num_heads)}


def _gated_mlp(m: nn.Module) -> dict[str, int] | None:
    if hasattr(m, "up_proj") and hasattr(m, "down_proj"):
        return {"intermediate_size": _out(m.up_proj)}
    return None


def _bert_intermediate(m: nn.Module) -> dict[str, int] | None:
    if type(m).__name__.endswith("Intermediate") and hasattr(m, "dense"):
        return {"intermediate_size": _out(m.dense)}
    return None


def _gpt2_mlp(m: nn.Module) -> dict[str, int] | None:
    if hasattr(m, "c_fc") and hasattr(m, "c_proj"):
        return {"n_inner": int(m.c_fc.weight.shape[1])}  # Conv1D weight is (in, out)
    return None


# Tried in order on every module; the first that answers describes it.
_READERS: tuple[Reader, ...] = (_llama_attention, _bert_attention, _gpt2_attention,
                                _gated_mlp, _bert_intermediate, _gpt2_mlp)


def config_widths(model: nn.Module) -> dict[str, dict[int, list[str]]]:
    """Config field -> width -> modules that have it (read from the pruned weights)."""
    widths: dict[str, dict[int, list[str]]] = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)  # ViT/Swin patch embeddings have a conv, no weight
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        widths["hidden_size"] = {int(weight.shape[1]): ["input embeddings"]}
    for name, module in model.named_modules():
        for reader in _READERS:
            found = reader(module)
            if found is not None:
                for key, value in found.items():
                    widths.setdefault(key, {}).setdefault(value, []).append(name)
                break
    return widths


def update_config(model: nn.Module) -> ConfigUpdate:
    """Write the pruned widths into ``model.config`` when every layer agrees.

    Returns which config keys changed, and ``ok``/``reason``: whether a ``save_pretrained``
    folder of the model reloads it exactly. The config is left as it was when the widths
    differ between layers or no config can describe the pruned shapes.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return ConfigUpdate(reason="not a transformers model (it has no config object)")
    values: dict[str, int] = {}
    for key, by_value in config_widths(model).items():
        if len(by_value) > 1:
            detail = "; ".join(f"{v} in {', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''}"
                               for v, mods in sorted(by_value.items()))
            return ConfigUpdate(reason=f"{key} differs between layers ({detail}); a "
                                       f"transformers config holds one value per field")
        values[key] = next(iter(by_value))
    candidate = copy.deepcopy(config)
    changed: dict[str, list[int]] = {}
    attribute_map = getattr(config, "attribute_map", {}) or {}
    for key, value in values.items():
        if key == "n_inner" and getattr(config, "n_inner", None) is None \
                and value == 4 * values.get("hidden_size", -1):
            continue  # GPT-2's default inner width (None = 4 x n_embd) still holds
        old = getattr(config, key, None)
        if key == "head_dim" and old is None and \
                values.get("hidden_size", -1) == value * values.get("num_attention_heads", -1):
            continue  # derived as hidden_size // num_attention_heads, and that still holds
        if old != value:
            setattr(candidate, key, value)
            changed[attribute_map.get(key, key)] = [old, value]
    shape_problem, problem = _mismatch(model, candidate)
    if shape_problem:
        return ConfigUpdate(reason=f"no config of {type(config).__name__} describes the "
                                   f"pruned model: {problem}")
    for key, value in values.items():
        if attribute_map.get(key, key) in changed:
            setattr(config, key, value)
    return ConfigUpdate(changed, ok=not problem, reason=problem)


def _mismatch(model: nn.Module, config: Any) -> tuple[bool, str]:
    """(is it a shape difference, the first difference) between the pruned model and
    ``type(model)(config)``; ``(False, "")`` when they are the same model."""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as e:  # noqa: BLE001 - any build error means "config cannot say this"
        return True, (f"building {type(model).__name__} from the new config raised "
                      f"{type(e).__name__}: {e}")
    ours = {n: tuple(t.shape) for n, t in _named_tensors(model)}
    theirs = {n: tuple(t.shape) for n, t in _named_tensors(fresh)}
    for name in ours:
        if name not in theirs or theirs[name] != ours[name]:
            return True, (f"'{name}' is {ours[name]} but the config builds "
                          f"{theirs.get(name, 'nothing')}")
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None:
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in _SHAPE_ATTRS or \
                    not isinstance(value, (int, float, bool, tuple)):
                continue
            theirs_v = getattr(other, attr, value)
            if theirs_v != value:
                hint = (" (head-dim pruning keeps the original attention scaling; prune "
                        "whole heads for a transformers export)" if "scal" in attr else "")
                return False, (f"{name}.{attr} is {value!r} in the pruned model but "
                               f"{theirs_v!r} in one built from the config{hint}")
    return False, _rotary_mismatch(model, config)


# Attributes that only restate weight shapes (compared above, as shapes), or state.
_SHAPE_ATTRS = frozenset({"training", "in_features", "out_features", "num_embeddings",
                          "embedding_dim", "nx", "nf", "normalized_shape", "num_features",
                          "in_channels", "out_channels"})


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a checkpoint holds: parameters and persistent buffers (rotary frequencies and
    other non-persistent buffers are recomputed on load; `_rotary_mismatch` checks them)."""
    return list(model.state_dict(keep_vars=True).items())


def _rotary_mismatch(model: nn.Module, config: Any) -> str:
    """Rotary frequencies are recomputed, not loaded: pruned ones must equal fresh ones."""
    for name, module in model.named_modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.device.type == "meta":
            continue
        try:
            fresh = type(module)(config=config)
        except Exception:  # noqa: BLE001 - a rotary class we cannot rebuild: say so
            return f"cannot rebuild rotary embedding '{name}' to check its frequencies"
        if fresh.inv_freq.shape != inv.shape or not torch.allclose(fresh.inv_freq, inv.cpu()):
            return (f"rotary frequencies of '{name}' were pruned (head-dim pruning); "
                    f"transformers recomputes different ones from head_dim="
                    f"{getattr(config, 'head_dim', '?')}; prune whole heads for a "
                    f"transformers export")
    return ""
