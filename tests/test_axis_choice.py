"""Axis choice: when the innermost axis of an (outer x inner) layout is unsafe, the pruner
falls back to an outer channel axis (whole blocks of inner channels) and says so."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explorer import Pruner


class LinearToDeconv(nn.Module):
    """A linear layer reshaped into a 256 x 4 x 4 feature map for transposed convs, the
    channel count read from the first deconv (the layout of Torch-Pruning's reshape test)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 256 * 16)
        self.up1 = nn.ConvTranspose2d(256, 32, kernel_size=4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 8, kernel_size=4, stride=2, padding=1)
        self.final = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x))
        x = x.view(-1, self.up1.in_channels, 4, 4)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        y: torch.Tensor = self.final(torch.flatten(x, 1))
        return y


def test_unsafe_inner_axis_falls_back_to_whole_blocks() -> None:
    torch.manual_seed(0)
    model = LinearToDeconv().eval()
    x = torch.randn(1, 64)
    original = model.fc.weight.detach().clone()
    pruner = Pruner(model, (x,), ratio=0.5, ignored=["final"])
    fc_group = next(g for g in pruner.groups if g.members[0].param == "fc.weight")
    assert [a.size for a in fc_group.axes] == [256, 4, 4]  # (channels x 4 x 4)
    report = pruner.step()
    assert report.unsafe == [] and report.forward_ok and report.output_shape_ok
    (change,) = [c for c in report.changes if c.fallback]
    assert (change.width_before, change.width_after) == (256, 128)
    assert "innermost axis" in change.fallback and "whole blocks of 16 channels" in \
        change.fallback and "test_axis_choice.py" in change.fallback  # the failing line
    assert any(change.fallback in n for n in report.notes)
    assert model.up1.in_channels == 128 and model.fc.out_features == 128 * 16
    # the kept rows of fc are whole 4 x 4 blocks of the original, in order
    rows = original.view(256, 16, 64)
    kept = [c for c in range(256) if c not in set(change.removed)]
    assert torch.equal(model.fc.weight.detach().view(128, 16, 64), rows[kept])
    assert model(x).shape == (1, 10)


def test_safe_inner_axes_need_no_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    report = Pruner(model, (torch.randn(1, 3, 8, 8),), ratio=0.5, ignored=["4"]).step()
    assert report.changes and not any(c.fallback for c in report.changes)
    assert report.unsafe == []


class WindowSplits(nn.Module):
    """Channels split by a list attribute into window groups (CoaT's ``channel_splits``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.channel_splits = [4, 8]
        self.win_a = nn.Linear(4, 6)
        self.win_b = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.proj(x), self.channel_splits, dim=-1)
        y: torch.Tensor = self.out(self.win_a(a) + self.win_b(b))
        return y


def test_split_size_list_follows_pruning_and_undo() -> None:
    torch.manual_seed(0)
    model = WindowSplits().eval()
    x = torch.randn(2, 8)
    pruner = Pruner(model, (x,), ratio=0.5, ignored=["out"])
    report = pruner.step()
    assert report.unsafe == [] and report.forward_ok and report.output_shape_ok
    assert model.channel_splits == [model.win_a.in_features, model.win_b.in_features]
    assert model.channel_splits != [4, 8] and model.proj.out_features == \
        sum(model.channel_splits)
    assert report.attributes[""]["channel_splits"] == [[4, 8], model.channel_splits]
    assert model(x).shape == (2, 3)
    pruner.undo()
    assert model.channel_splits == [4, 8] and model.proj.out_features == 12


class TwoReaders(nn.Module):
    """One width ``C = h.shape[-1]`` read at two lines: the residual and the first branch
    fail alone at the first line, the second branch alone at the second. A third branch
    with a hard-coded ``reshape(n, 4, 4)`` stays unsafe (so the pre-flight must bisect)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.a, self.pa = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b, self.pb = nn.Linear(16, 16), nn.Linear(16, 16)
        self.d, self.pd = nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        n, c = h.shape
        a = self.a(h).reshape(n, 2, c // 2).flip(1)
        b = self.b(h).reshape(n, 2, c // 2).flip(1)
        d = self.d(h).reshape(n, 4, 4).flip(1)
        y: torch.Tensor = self.out(h + self.pa(a.reshape(n, -1)) + self.pb(b.reshape(n, -1))
                                   + self.pd(d.reshape(n, -1)))
        return y


def test_sets_failing_at_each_others_lines_are_cut_together() -> None:
    torch.manual_seed(0)
    model = TwoReaders().eval()
    x = torch.randn(3, 4)
    report = Pruner(model, (x,), ratio=0.5, ignored=["out"]).step()
    assert report.forward_ok and report.output_shape_ok
    assert [u.location.rpartition(":")[2] for u in report.unsafe] == \
        [str(TwoReaders.forward.__code__.co_firstlineno + 5)]  # only the 4 x 4 branch
    widths = (model.embed.out_features, model.a.out_features, model.b.out_features,
              model.d.out_features)
    assert widths == (8, 8, 8, 16)
    assert model(x).shape == (3, 3)


def test_interactive_mode_offers_the_outer_axis_and_replays_it() -> None:
    """One group at a time: the unsafe inner cut gets an outer-axis proposal (as `step`
    would cut), accepting it cuts whole blocks, undo is exact, and the session log replays."""
    from explorer.app.session import Session

    torch.manual_seed(0)
    model = LinearToDeconv().eval()
    x = torch.randn(1, 64)
    s = Session(model, (x,))  # works on its own copy
    model = s.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s.configure("magnitude", 0.5, "dims", False, 1)
    p = next(q for q in s.proposals() if q.group.members[0].param == "fc.weight")
    assert not s.preflight(p).ok
    fix = s.joint(p)
    assert fix is not None and fix.fallback and not fix.joint
    assert "innermost axis" in fix.reason and fix.changes[0].width_after == 128
    assert s.accept(fix)
    assert model.up1.in_channels == 128 and model.fc.out_features == 128 * 16
    assert model(x).shape == (1, 10)
    accepted = model.fc.weight.detach().clone()
    actions = list(s.actions)

    s.undo()
    assert model.fc.out_features == 256 * 16
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    torch.manual_seed(0)
    replayed = Session(LinearToDeconv().eval(), (x,))
    assert replayed.replay(actions) == len(actions)
    again = replayed.model
    assert again.fc.out_features == 128 * 16 and again.up1.in_channels == 128
    assert torch.equal(again.fc.weight.detach(), accepted)  # the same blocks, replayed
