"""Relative-position bias tables: indexed by an integer buffer, their heads axis is cut with
the attention heads and the index buffer itself is never offered for pruning."""
from __future__ import annotations

import torch
from torch import nn

from explorer import Pruner


class RelPosAttention(nn.Module):
    """Swin-style attention over 4 tokens with a (2N-1, heads) bias table."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", pos[:, None] - pos[None, :] + tokens - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))


def test_table_heads_follow_whole_heads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(RelPosAttention(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 4, 16)
    pruner = Pruner(model, (x,), ratio=0.5, heads="whole", ignored=["1"])
    index_groups = [g for g in pruner.groups if any(m.param == "0.index" for m in g.members)]
    assert index_groups and not any(a.prunable for g in index_groups for a in g.axes)
    report = pruner.step()
    assert not report.unsafe and report.forward_ok and report.output_shape_ok
    attn = model[0]
    assert attn.num_heads == 2 and attn.table.shape == (7, 2) and attn.index.shape == (4, 4)
    with torch.no_grad():
        assert model(x).shape == (2, 4, 3)
