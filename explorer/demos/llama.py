"""A tiny random-init Llama causal LM from the built-in ``hf:llama`` config."""

from __future__ import annotations

import torch
from torch import nn

from .hf_configs import DEFAULT_SEQ_LEN, HF_FAMILIES


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """LlamaForCausalLM with ``hf:llama``'s small config (hidden 64, 8 heads, 2 KV heads,
    2 layers, 256-token vocab) on (1, 16) token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy import, only when asked for

    config = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation goes through **kwargs
        **HF_FAMILIES["llama"].defaults, use_cache=False, attn_implementation="eager"
    )
    model = LlamaForCausalLM(config)
    return model, (torch.randint(0, config.vocab_size, (1, DEFAULT_SEQ_LEN)),)
