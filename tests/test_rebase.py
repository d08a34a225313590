"""Re-basing heads before a head-dim cut: function kept, rank oracles, undo, other layouts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explorer import Pruner
from explorer.io.specs import load_model
from explorer.prune.calibration import Calibration
from explorer.prune.compensate import input_stats, prune_and_compensate
from explorer.prune.rebase import head_axes, rebase
from explorer.prune.removal import Removal, undo

CUT = [1, 4, 6, 9]  # dims cut from every 16-wide head (spread out: not the trailing ones)


def _bert() -> tuple[nn.Module, Calibration, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    lm = load_model("hf:bert")  # 64 wide, 4 heads x 16, 2 layers
    ids = torch.randint(0, lm.model.config.vocab_size, (24, 16))
    return lm.model.eval(), Calibration([(ids[:12],), (ids[12:],)]), (ids[:2],)


def _dims_removal(pruner: Pruner) -> Removal:
    removal = Removal()
    for g in pruner.groups:
        if g.heads is not None:
            for i, a in enumerate(g.axes):
                if a.role == "head-dim":
                    removal.add(g.id, i, CUT)
    return removal


def _low_rank_heads(model: nn.Module, rank: int) -> None:
    """Every head's q and out projection restricted to a random ``rank``-dim subspace (not
    aligned with the dims), so that q . k and out(v) lose nothing when a re-based head keeps
    ``rank`` dims."""
    heads, width = model.config.num_attention_heads, model.config.hidden_size // 4
    with torch.no_grad():
        for layer in model.encoder.layer:
            q, out = layer.attention.self.query, layer.attention.output.dense
            for h in range(heads):
                rows = slice(h * width, (h + 1) * width)
                basis = torch.linalg.qr(torch.randn(width, rank))[0]
                project = basis @ basis.T
                q.weight[rows] = project @ q.weight[rows]
                q.bias[rows] = project @ q.bias[rows]
                out.weight[:, rows] = out.weight[:, rows] @ project


def _max_change(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).last_hidden_state - b(x).last_hidden_state).abs().max())


def test_rebasing_keeps_the_function_and_finds_both_axes_of_every_head() -> None:
    model, calib, example = _bert()
    pruner = Pruner(model, example)
    axes = head_axes(model, pruner.coupling, _dims_removal(pruner))
    assert len(axes) == 4  # q/k and v/out, in each of the 2 layers
    assert sorted(a.bilinear for a in axes) == [False, False, True, True]
    linears = sorted({s.module for a in axes for s in a.sides})
    stats = input_stats(model, linears, calib, gram=True)
    grams = {m: s.gram / s.count for m, s in stats.items() if s.gram is not None}
    original = copy.deepcopy(model)
    previous = rebase(model, axes, grams).previous
    x = torch.randint(0, model.config.vocab_size, (3, 16))
    assert _max_change(model, original, x) < 1e-4
    assert not torch.equal(model.encoder.layer[0].attention.self.query.weight,
                           original.encoder.layer[0].attention.self.query.weight)
    assert set(previous) >= {"encoder.layer.0.attention.self.query.weight",
                             "encoder.layer.1.attention.output.dense.weight"}


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_heads_of_lower_rank_lose_nothing_to_a_rebased_dims_cut(mode: str) -> None:
    model, calib, example = _bert()
    _low_rank_heads(model, 16 - len(CUT))
    pruner = Pruner(model, example)
    removal = _dims_removal(pruner)
    x = torch.randint(0, model.config.vocab_size, (3, 16))
    plain, rebased = copy.deepcopy(model), copy.deepcopy(model)
    prune_and_compensate(plain, pruner.coupling, removal, calib, None)
    notes: list[str] = []
    prune_and_compensate(rebased, pruner.coupling, removal, calib, mode, notes=notes)
    assert rebased.encoder.layer[0].attention.self.query.weight.shape == (48, 64)
    assert not any("re-basing" in n for n in notes), notes  # (a refit may add nothing)
    assert _max_change(rebased, model, x) < 1e-3  # the cut dims carried nothing
    assert _max_change(plain, model, x) > 1e-2  # the same cut without re-basing loses


def test_undo_puts_back_the_weights_from_before_the_rebasing() -> None:
    model, calib, example = _bert()
    pruner = Pruner(model, example)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    applied = prune_and_compensate(model, pruner.coupling, _dims_removal(pruner), calib,
                                   "lstsq")
    assert model.encoder.layer[1].attention.output.dense.weight.shape == (64, 48)
    undo(model, applied)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_fused_qkv_heads_are_left_as_they_are() -> None:
    lm = load_model("demo:dino_vit_safe")  # one qkv Linear: q, k and v are slices of it
    pruner = Pruner(lm.model, lm.example_inputs)
    removal = Removal()
    for g in pruner.groups:
        for i, a in enumerate(g.axes):
            if a.role == "head-dim":
                removal.add(g.id, i, [0, 3])
    assert removal and head_axes(lm.model, pruner.coupling, removal) == []


def test_whole_heads_and_mlp_cuts_are_not_rebased() -> None:
    model, _calib, example = _bert()
    for heads in ("whole", "keep"):
        pruner = Pruner(model, example, ratio=0.5, heads=heads)
        removal, changes, _ = pruner.propose()
        assert changes and head_axes(model, pruner.coupling, removal) == []


class _Branchy(nn.Module):
    """Attention that only runs on length-8 inputs: calibration batches of length 6 never
    reach it, so re-basing has no moments for its heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 8:
            b, t, _ = x.shape
            q, k, v = (lin(x).view(b, t, 4, -1).transpose(1, 2) for lin in (self.q, self.k,
                                                                               self.v))
            a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
            x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        y: torch.Tensor = self.fc(x)
        return y


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_heads_the_calibration_never_runs_are_cut_without_rebasing(mode: str) -> None:
    torch.manual_seed(0)
    model = _Branchy().eval()
    x = torch.randn(2, 8, 32)
    batches = [torch.randn(2, 6, 32) for _ in range(3)]
    report = Pruner(model, (x,), ratio=0.5, heads="dims", compensate=mode,
                    calibration=lambda: batches).step()
    assert report.forward_ok and report.changes
    assert model.q.out_features == model.k.out_features == model.v.out_features == 16
    assert model(x).shape == (2, 8, 32)
