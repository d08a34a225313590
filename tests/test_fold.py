"""Folding a constant into the part of a fused projection that produces the scaled value
(`explorer.prune.fixups.fold`), on a small attention with one ``qkv`` projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explorer.prune.fixups.fold import folded


class FusedAttention(nn.Module):
    """``qkv`` split into q, k and v; ``scaling`` passed to SDPA. ``leak`` adds a slice of
    the projection's output (rows ``leak``) to the output: a second use of those rows."""

    def __init__(self, leak: slice | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 3 * 16)
        self.out = nn.Linear(16, 16)
        self.scaling = 0.5
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        fused = self.qkv(x)
        q, k, v = fused.view(b, s, 2, 3 * 8).transpose(1, 2).split(8, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        y = self.out(y.transpose(1, 2).reshape(b, s, 16))
        return y if self.leak is None else y + fused[..., self.leak].sum(-1, keepdim=True)


def _inputs() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def test_fold_scales_only_the_q_rows() -> None:
    torch.manual_seed(0)
    model = FusedAttention().eval()
    x = _inputs()
    with torch.no_grad():
        before = model(x)
    weight, bias = model.qkv.weight.detach().clone(), model.qkv.bias.detach().clone()
    q_rows = [24 * h + d for h in range(2) for d in range(8)]  # (head, q|k|v, dim)
    with folded(model, {("", "scaling"): 0.25}, (x,)) as fold:
        assert not fold.reason
        assert fold.scaled == {"qkv.weight": 2.0, "qkv.bias": 2.0}
        assert fold.elements == {"qkv.weight": (0, q_rows), "qkv.bias": (0, q_rows)}
        assert model.scaling == 0.25
        torch.testing.assert_close(model.qkv.weight[q_rows], weight[q_rows] * 2.0)
        rest = [r for r in range(48) if r not in q_rows]
        assert torch.equal(model.qkv.weight[rest], weight[rest])
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert model.scaling == 0.5 and torch.equal(model.qkv.weight, weight)  # restored
    assert torch.equal(model.qkv.bias, bias)


def test_fold_refuses_rows_used_elsewhere() -> None:
    """Rows 16..23 are head 0's v (not scaled): another use of them is fine. Rows 0..7 are
    head 0's q: scaling them would change the other use, so nothing is folded."""
    torch.manual_seed(0)
    model = FusedAttention(leak=slice(16, 24)).eval()
    with folded(model, {("", "scaling"): 0.25}, (_inputs(),)) as fold:
        assert not fold.reason and len(fold.elements["qkv.bias"][1]) == 16
    model = FusedAttention(leak=slice(0, 8)).eval()
    weight = model.qkv.weight.detach().clone()
    with folded(model, {("", "scaling"): 0.25}, (_inputs(),)) as fold:
        assert "cannot absorb it: a part of addmm it scales is also used by sum at " \
            in fold.reason, fold.reason
        assert not fold.scaled and model.scaling == 0.5
        assert torch.equal(model.qkv.weight, weight)
