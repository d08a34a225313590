"""A tiny random-init Llama causal LM from a transformers config."""

from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 256
SEQ_LEN = 16


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """LlamaForCausalLM (hidden 64, 8 heads, 2 KV heads, 2 layers) on (1, 16) token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy import, only when asked for

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=128,
        use_cache=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    return model, (torch.randint(0, VOCAB_SIZE, (1, SEQ_LEN)),)
