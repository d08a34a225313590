"""SmolLM2's real weights dressed as other decoder families (issue 20: "checked from outside on
held-out real decoders of other families"): the same function written as a Mistral, a Qwen2
(zero q/k/v biases), a Phi3 (fused ``qkv_proj`` and ``gate_up_proj``) or a Gemma (norms that
multiply by ``1 + w``, embeddings scaled by sqrt(hidden size)) transformers model, and as bf16
safetensors shards. Each is exactly the same model as the Llama it came from, up to float
rounding, so the explorer must cut, count and measure it the same way.

``python tests/dressed.py OUT [--layers N] [--shards SIZE]`` writes one folder per family
under ``OUT`` and prints the largest logit difference of each to the Llama on real prose."""
from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json", "special_tokens_map.json")
# fields every dressed config copies from the Llama's (the function's shape and constants)
_SHARED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
           "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
           "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
Tensors = dict[str, torch.Tensor]


def _llama(config: dict[str, Any], sd: Tensors) -> tuple[dict[str, Any], Tensors]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "attention_bias": False, "mlp_bias": False}, sd


def _mistral(config: dict[str, Any], sd: Tensors) -> tuple[dict[str, Any], Tensors]:
    return {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "sliding_window": None}, sd


def _qwen2(config: dict[str, Any], sd: Tensors) -> tuple[dict[str, Any], Tensors]:
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[name.replace(".weight", ".bias")] = torch.zeros(w.shape[0], dtype=w.dtype)
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": False, "sliding_window": None}, out


def _phi3(config: dict[str, Any], sd: Tensors) -> tuple[dict[str, Any], Tensors]:
    out: Tensors = {}
    for name, w in sd.items():
        if name.endswith("q_proj.weight"):
            base = name[:-len("q_proj.weight")]
            out[base + "qkv_proj.weight"] = torch.cat(
                [w, sd[base + "k_proj.weight"], sd[base + "v_proj.weight"]])
        elif name.endswith("gate_proj.weight"):
            base = name[:-len("gate_proj.weight")]
            out[base + "gate_up_proj.weight"] = torch.cat([w, sd[base + "up_proj.weight"]])
        elif not name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            out[name] = w
    rope = {**config["rope_parameters"], "partial_rotary_factor": 1.0}
    return {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "sliding_window": None,
            "original_max_position_embeddings": config["max_position_embeddings"],
            "rope_parameters": rope, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, out


def _gemma(config: dict[str, Any], sd: Tensors) -> tuple[dict[str, Any], Tensors]:
    """Gemma multiplies the (tied) embedding by sqrt(hidden) and every norm by ``1 + w``: the
    embedding is divided by sqrt(hidden), which the final norm multiplies back into the
    logits."""
    if not config.get("tie_word_embeddings"):
        raise ValueError("a Gemma dressing needs tied embeddings (Gemma scales its input "
                         "embedding, which the tied head reads back through the final norm)")
    scale = math.sqrt(config["hidden_size"])
    out: Tensors = {}
    for name, w in sd.items():
        if name == "model.embed_tokens.weight":
            out[name] = w / scale
        elif name == "model.norm.weight":
            out[name] = w * scale - 1
        elif name.endswith("layernorm.weight"):
            out[name] = w - 1
        elif name != "lm_head.weight":
            out[name] = w
    return {"model_type": "gemma", "architectures": ["GemmaForCausalLM"],
            "attention_bias": False, "hidden_activation": config["hidden_act"]}, out


_DRESS: dict[str, Callable[[dict[str, Any], Tensors], tuple[dict[str, Any], Tensors]]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "phi3": _phi3, "gemma": _gemma}


def dress_model(source: Path, family: str, layers: int | None = None,
                attn: str = "eager") -> Any:
    """SmolLM2's ``source`` folder (float32 Llama) as a ``family`` transformers model with the
    same function, its first ``layers`` decoder layers only when given."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in _DRESS:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    config = json.loads((source / "config.json").read_text())
    sd = load_file(str(source / "model.safetensors"))
    if layers is not None:
        config["num_hidden_layers"] = layers
        sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.")
              or int(k.split(".")[2]) < layers}
    extra, sd = _DRESS[family](config, sd)
    fields = {k: config[k] for k in _SHARED if k in config}
    fields.update(extra)
    model_type = fields.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{family}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model.eval()


def dress(source: Path, family: str, dest: Path, layers: int | None = None,
          shards: str | None = None) -> Path:
    """Write ``family``'s dressing of ``source`` to ``dest`` (float32, one file; or bfloat16 in
    shards of ``shards``, e.g. ``"50MB"``, tied embeddings stored once) with the tokenizer."""
    model = dress_model(source, family, layers)
    if shards is not None:
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(dest, max_shard_size=shards)
    else:
        model.save_pretrained(dest)
    for name in _TOKENIZER:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    return dest


def _main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2 import folder

    from explorer import load_model
    from explorer.io.data import DataOptions, load_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--shards", help="also write FAMILY-shards in bf16 shards this size")
    parser.add_argument("--text", type=Path, default=Path("/work/models/text2/heldout.txt"))
    args = parser.parse_args()
    src = folder()
    ref = load_model(f"hf:{src}")
    held = load_data(str(args.text), ref, DataOptions(num_samples=4, seq_len=128))
    with torch.no_grad():
        want = [ref.model(*b).logits for b in held.batches]
    for family in args.families:
        dest = dress(src, family, args.out / family, args.layers)
        got = load_model(f"hf:{dest}").model
        with torch.no_grad():
            diff = max(float((got(*b).logits - w).abs().max())
                       for b, w in zip(held.batches, want, strict=True))
        print(f"{family}: {type(got).__name__}, largest logit difference {diff:.2e}")
        if args.shards:
            dress(src, family, args.out / f"{family}-shards", args.layers, args.shards)


if __name__ == "__main__":
    _main()
