"""Width attributes that a module's forward reads, patched without the module owning a
resized tensor (OLMo's weightless LayerNorm, LeViT's split sizes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explorer import Pruner


class WeightlessNorm(nn.Module):
    """OLMo's LayerNorm: no parameters, the width lives in ``normalized_shape``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.normalized_shape = (width,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, 1e-5)


class SplitAttention(nn.Module):
    """LeViT-style attention: q/k/v split by attribute sizes, merged by an attribute width."""

    def __init__(self, dim: int = 16, heads: int = 2, key_dim: int = 4, val_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.val_attn_dim = heads * val_dim
        self.qkv = nn.Linear(dim, heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)).softmax(dim=-1)
        x = (attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = WeightlessNorm(16)
        self.attn = SplitAttention()
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.attn(self.norm(h))
        return self.out(self.norm(h))


def test_forward_widths_follow_pruning() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 8)
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", ignored=["out"])
    report = pruner.step()
    assert not report.unsafe and report.forward_ok and report.output_shape_ok
    assert model.norm.normalized_shape == (8,)
    attn = model.attn
    assert (attn.key_dim, attn.val_dim, attn.val_attn_dim) == (2, 4, 8)
    assert report.attributes["norm"] == {"normalized_shape": [(16,), (8,)]}
    assert report.attributes["attn"]["val_attn_dim"] == [16, 8]
    with torch.no_grad():
        assert model(x).shape == (2, 5, 3)
    pruner.undo()  # the attributes come back with the tensors
    assert model.norm.normalized_shape == (16,) and attn.key_dim == 4 and attn.val_dim == 8
