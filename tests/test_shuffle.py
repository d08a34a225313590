"""Channel shuffle and equal splits: ShuffleNet v2's ``chunk(2)`` + ``view / transpose / view``
is coupled exactly, so every group is safe and removing channels equals zeroing them."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torchvision.models import shufflenet_v2_x0_5  # type: ignore[import-untyped]

from explorer import Pruner, trace
from explorer.coupling.analyze import Coupling
from explorer.prune.preflight import Preflight
from explorer.prune.removal import Removal, apply_removal, removed_atoms


def _shufflenet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = shufflenet_v2_x0_5(weights=None).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced channel changes the output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, (torch.rand(1, 3, 64, 64),)


def _zeroed(model: nn.Module, coupling: Coupling, removal: Removal) -> nn.Module:
    """A copy with the parameters of removed channels zeroed (BN weight and bias included,
    so a removed channel is exactly 0 wherever it flows)."""
    masked = copy.deepcopy(model)
    keeps = coupling.keep_indices(removed_atoms(coupling, removal))
    tensors = dict(masked.named_parameters())
    with torch.no_grad():
        for (name, dim), keep in keeps.items():
            if name in tensors:
                t = tensors[name]
                drop = sorted(set(range(t.shape[dim])) - set(keep.tolist()))
                t.index_fill_(dim, torch.tensor(drop, dtype=torch.long), 0.0)
    return masked


def test_shufflenet_every_group_is_safe_and_exact() -> None:
    model, inputs = _shufflenet()
    mg = trace(model, inputs)
    assert not mg.coupling.conflicts
    removal = Removal()
    for g in mg.groups():
        for i, a in enumerate(g.axes):
            if a.prunable and a.inner:
                removal.add(g.id, i, list(range(1, a.size, 2)))
    assert len(removal.picks) >= 15
    flight = Preflight(model, inputs, mg.coupling)
    for (gid, axis), idx in removal.picks.items():  # each group alone
        part = Removal()
        part.add(gid, axis, idx)
        verdict = flight.check(part)
        assert verdict.ok, (mg.groups()[gid].title, verdict.location, verdict.error)
    masked = _zeroed(model, mg.coupling, removal)
    pruned = copy.deepcopy(model)
    apply_removal(pruned, mg.coupling, removal)
    n = sum(p.numel() for p in pruned.parameters())
    assert n < 0.5 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), masked(*inputs), atol=1e-5, rtol=1e-4)


def test_shufflenet_step_has_no_unsafe_group() -> None:
    model, inputs = _shufflenet()
    report = Pruner(model, inputs, ratio=0.5, ignored=["fc"]).step()
    assert report.unsafe == [] and report.forward_ok and report.output_shape_ok
    assert report.params_after / report.params_before < 0.6


class ChunkMix(nn.Module):
    """One conv output cut in two halves that go different ways: by ``chunk(2)`` (the
    halves are re-cut equally at run time) or by ``split([8, 8])`` (fixed sizes)."""

    def __init__(self, by_sizes: bool) -> None:
        super().__init__()
        self.by_sizes = by_sizes
        self.conv = nn.Conv2d(3, 16, 1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        a, b = h.split([8, 8], dim=1) if self.by_sizes else h.chunk(2, dim=1)
        y: torch.Tensor = self.left(a) + self.right(b)
        return y


def _conv_groups(by_sizes: bool) -> list[Any]:
    mg = trace(ChunkMix(by_sizes).eval(), (torch.rand(1, 3, 4, 4),))
    return [g for g in mg.groups()
            if ("conv.weight", 0) in {(m.param, m.dim) for m in g.members}]


def test_equal_split_ties_its_parts_split_by_sizes_does_not() -> None:
    (tied,) = _conv_groups(by_sizes=False)
    assert tied.channels == 8  # 16 channels, tied in pairs: the halves stay equal
    assert {"left.weight", "right.weight"} <= {m.param for m in tied.members}
    free = _conv_groups(by_sizes=True)  # each half its own group
    assert [g.channels for g in free] == [8, 8]
    assert [{m.param for m in g.members} - {"conv.weight", "conv.bias"} for g in free] == \
        [{"left.weight"}, {"right.weight"}]
