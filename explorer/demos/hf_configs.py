"""The small built-in transformers configs: the ``hf:<family>`` specs
(`explorer.io.specs`) and the ``llama`` demo build from them (fast on CPU)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..quality.task import ModelKind

DEFAULT_SEQ_LEN = 16  # token ids per example input


@dataclass(frozen=True)
class HFFamily:
    """A built-in transformers family: its config type, model class and small default config."""

    model_type: str  # transformers ``model_type`` passed to ``AutoConfig.for_model``
    kind: ModelKind  # LM (AutoModelForCausalLM) or ENCODER (AutoModel)
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
        "llama": HFFamily("llama", ModelKind.LM, _decoder_defaults()),
        "qwen2": HFFamily("qwen2", ModelKind.LM, _decoder_defaults()),
        "mistral": HFFamily("mistral", ModelKind.LM, _decoder_defaults()),
        # gemma's default head_dim is 256, independent of hidden_size / heads.
        "gemma": HFFamily("gemma", ModelKind.LM, _decoder_defaults(head_dim=8)),
        # phi3's default bos/eos/pad ids (1/32000/32000) fall outside a 256-token vocab.
        "phi3": HFFamily("phi3", ModelKind.LM, _decoder_defaults(pad_token_id=0, eos_token_id=2)),
        "gpt2": HFFamily(
            "gpt2",
            ModelKind.LM,
            MappingProxyType(
                {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128, "vocab_size": 256,
                     "bos_token_id": 0, "eos_token_id": 0}
            ),
        ),
        "bert": HFFamily(
            "bert",
            ModelKind.ENCODER,
            MappingProxyType(
                {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 128}
            ),
        ),
    }
)
