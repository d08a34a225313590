"""Small transformers Llama specs the app tests build (random weights, seconds to trace): one
home for the shape they share, 64 wide with 4 heads of 16, an MLP of 128 and 100 tokens."""
from __future__ import annotations


def small_llama(layers: int, kv_heads: int) -> str:
    """An ``hf:llama`` spec of ``layers`` decoder layers with ``kv_heads`` key/value heads
    (4: plain multi-head attention; 2: grouped-query, 2 query heads per key/value head)."""
    return (f"hf:llama?hidden_size=64&num_hidden_layers={layers}&num_attention_heads=4"
            f"&num_key_value_heads={kv_heads}&intermediate_size=128&vocab_size=100")


MHA_LLAMA = small_llama(3, 4)  # the Model page's switch between model kinds
GQA_LLAMA = small_llama(3, 2)  # decisions on grouped-query attention (Session, Groups page)
# Llama-2-7B's shape (32 layers of 32 heads x 128, MLP 11008), explored on meta: no weights
LLAMA_7B = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
            "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")
