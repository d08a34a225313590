"""Closed lists of ATen op packets that several analyses must agree on (keyed by identity)."""
from __future__ import annotations

import torch

aten = torch.ops.aten

#: Fused scaled-dot-product attention kernels (q, k, v are the first three arguments).
SDPA_OPS = frozenset({
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_attention_math,
    aten._scaled_dot_product_fused_attention_overrideable,
})

#: Ops whose first argument is an attention query: fused kernels and the q @ k^T bmm.
ATTENTION_OPS = SDPA_OPS | {aten.bmm}

#: Element-wise sums: two activations added (``x + f(x)``) make a residual connection.
ADD_OPS = frozenset({aten.add, aten.add_})

#: Table lookups by index (``weight[ids]``): token embeddings when the ids are a model input.
TOKEN_EMBEDDING_OPS = frozenset({aten.embedding, aten._embedding_bag, aten.embedding_bag})

#: Ops that hand their first argument's values on unchanged (a new shape, a copy): token ids
#: stay token ids through them (GPT-2 does ``input_ids.view(-1, seq)`` before its lookup).
SAME_VALUES_OPS = frozenset({
    aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unsqueeze, aten.squeeze,
    aten.expand, aten.clone, aten.contiguous, aten._to_copy, aten.alias, aten.detach,
    aten.lift_fresh, aten.lift_fresh_copy,
})
