"""Groups carved out of one split tensor have distinct keys, so each is proposed, cut and
remembered on its own (their first member is the same parameter dim)."""
from __future__ import annotations

import torch
from torch import nn

import explorer
from explorer import Pruner


class SplitByList(nn.Module):
    """One projection split by a list of sizes: three independent channel groups."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(16, 4), nn.Linear(24, 4)
        self.split_sizes = [8, 16, 24]  # follows the cut (a list a module passes to split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = torch.relu(self.proj(x)).split(self.split_sizes, dim=-1)
        return torch.cat([self.a(a), self.b(b), self.c(c)], dim=-1)


def test_parts_of_one_tensor_have_distinct_keys_and_are_all_cut() -> None:
    torch.manual_seed(0)
    model = SplitByList().eval()
    x = torch.randn(2, 16)
    groups = [g for g in explorer.trace(model, (x,)).groups()
              if g.members[0].param.startswith("proj.") and g.members[0].dim == 0]
    assert sorted(g.channels for g in groups) == [8, 16, 24]
    assert len({g.members[0].param for g in groups}) == 1  # they share the first member
    assert len({g.key for g in groups}) == 3 and sorted(g.part for g in groups) == [0, 1, 2]

    pruner = Pruner(model, (x,), ratio=0.5, ignored=["a", "b", "c"])
    assert len({p.key for p in pruner.pending()}) == len(pruner.pending()) == 3
    report = pruner.step()
    assert sorted(c.width_after for c in report.changes) == [4, 8, 12]
    assert (model.a.in_features, model.b.in_features, model.c.in_features) == (4, 8, 12)
    assert model.proj.out_features == 24 and model.split_sizes == [4, 8, 12]
    assert model(x).shape == (2, 12)
