"""Behaviour of the engine on real models: structure recovered, pruning exact, oracles hold."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explorer import Pruner, load_model, trace
from explorer.prune.preflight import Preflight
from explorer.prune.removal import Removal, apply_removal, removed_atoms


def _out(y: object) -> torch.Tensor:
    return y.logits if hasattr(y, "logits") else y  # type: ignore[return-value]


def _head_group(mg):  # the first group with head structure
    return next(g for g in mg.groups() if g.heads is not None)


def test_dino_indexing_attention_structure() -> None:
    lm = load_model("demo:dino_vit")
    mg = trace(lm.model, lm.example_inputs)
    heads = [g for g in mg.groups() if g.heads is not None]
    assert len(heads) == 3  # one per block
    g = heads[0]
    assert (g.heads.num_heads, g.heads.head_dim, g.heads.kv_heads) == (6, 16, None)
    params = {(m.param, m.dim) for m in g.members}
    assert params == {("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.qkv.bias", 0),
                      ("blocks.0.attn.proj.weight", 1)}
    roles = [(a.role, a.size, a.prunable) for a in g.axes]
    assert ("fixed", 3, False) in roles  # which of q/k/v: selected by qkv[0], qkv[1], qkv[2]
    assert ("heads", 6, True) in roles and ("head-dim", 16, True) in roles
    fixed = next(a for a in g.axes if a.role == "fixed")
    assert "selected by the constant index" in fixed.reason and "dino.py:" in fixed.reason
    assert any("reshape" in e for e in g.explanation)


def test_dino_head_removal_touches_3x_rows_and_whole_heads_are_unsafe() -> None:
    lm = load_model("demo:dino_vit")
    mg = trace(lm.model, lm.example_inputs)
    g = _head_group(mg)
    heads_axis = next(i for i, a in enumerate(g.axes) if a.role == "heads")
    removal = Removal()
    removal.add(g.id, heads_axis, [1, 4])
    keeps = mg.coupling.keep_indices(removed_atoms(mg.coupling, removal))
    assert len(keeps[("blocks.0.attn.qkv.weight", 0)]) == 288 - 3 * 2 * 16
    assert len(keeps[("blocks.0.attn.proj.weight", 1)]) == 96 - 2 * 16
    verdict = Preflight(lm.model, lm.example_inputs, mg.coupling).check(removal)
    assert not verdict.ok  # DINO computes head_dim as C // num_heads from the input width
    assert "dino.py:" in verdict.location and verdict.module == "blocks.0.attn"


def _mask_copy(model: nn.Module, coupling, removal: Removal) -> nn.Module:
    masked = copy.deepcopy(model)
    keeps = coupling.keep_indices(removed_atoms(coupling, removal))
    tensors = dict(masked.named_parameters(remove_duplicate=False))
    tensors.update(dict(masked.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for (name, dim), keep in keeps.items():
            t = tensors[name]
            if name.endswith("running_var"):
                continue
            drop = sorted(set(range(t.shape[dim])) - set(keep.tolist()))
            t.index_fill_(dim, torch.tensor(drop, dtype=torch.long), 0.0)
    return masked


@pytest.mark.parametrize("spec,roles", [
    ("demo:mlp", ("channels",)),
    ("demo:resnet", ("channels",)),
    ("demo:cnn_concat", ("channels", "groups")),
    ("demo:dino_vit_safe", ("heads",)),
    ("demo:dino_vit_safe", ("head-dim",)),
    ("demo:llama", ("heads",)),
])
def test_mask_equivalence(spec: str, roles: tuple[str, ...]) -> None:
    """Pruned model == original with the same channels zeroed (no norm spans them)."""
    lm = load_model(spec)
    model = lm.model.eval()
    mg = trace(model, lm.example_inputs)
    removal = Removal()
    for g in mg.groups():
        if any(m.param.endswith(("norm.weight", "norm1.weight", "norm2.weight"))
               for m in g.members) or "norm" in " ".join(g.modules[:1]):
            continue  # normalisation over the pruned dim: masking is not equivalent
        for i, a in enumerate(g.axes):
            if a.prunable and a.role in roles:
                removal.add(g.id, i, list(range(0, a.size, 2))[: a.size // 2])
                break
    assert removal, "nothing to prune"
    masked = _mask_copy(model, mg.coupling, removal)
    pruned = copy.deepcopy(model)
    apply_removal(pruned, mg.coupling, removal)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        a = _out(masked(*lm.example_inputs))
        b = _out(pruned(*lm.example_inputs))
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_dead_channel_losslessness_cnn() -> None:
    """Channels whose producing weights are all zero can be removed with no output change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    dead = [1, 5, 6]
    with torch.no_grad():
        model[0].weight[dead] = 0
        model[0].bias[dead] = 0
    x = torch.randn(2, 3, 16, 16)
    mg = trace(model, (x,))
    g = next(g for g in mg.groups() if any(m.param == "0.weight" and m.dim == 0
                                            for m in g.members))
    before = model(x)
    removal = Removal()
    removal.add(g.id, 0, dead)
    apply_removal(model, mg.coupling, removal)
    assert model[0].out_channels == 5 and model[2].in_channels == 5
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_kept_weights_are_bit_identical() -> None:
    lm = load_model("demo:resnet")
    original = copy.deepcopy(lm.model)
    mg = trace(lm.model, lm.example_inputs)
    g = next(g for g in mg.groups() if g.prunable)
    removal = Removal()
    removal.add(g.id, 0, [0, 3])
    keeps = mg.coupling.keep_indices(removed_atoms(mg.coupling, removal))
    apply_removal(lm.model, mg.coupling, removal)
    src = dict(original.named_parameters())
    for name, p in lm.model.named_parameters():
        expected = src[name].detach()
        for (pname, dim), keep in keeps.items():
            if pname == name:
                expected = expected.index_select(dim, torch.as_tensor(keep))
        assert torch.equal(p.detach(), expected), name


def test_broadcast_does_not_couple() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(4, 6)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.scale + self.b(x).sum(-1, keepdim=True)

    mg = trace(M(), (torch.randn(2, 4),))
    a_group = next(g for g in mg.groups() if any(m.param == "a.weight" and m.dim == 0
                                                  for m in g.members))
    assert not any(m.param == "b.weight" and m.dim == 0 for m in a_group.members)
    assert not any(m.param == "scale" for m in a_group.members)


def test_grouped_and_depthwise_conv_coupling() -> None:
    lm = load_model("demo:cnn_concat")
    mg = trace(lm.model, lm.example_inputs)
    assert any(a.role == "groups" for g in mg.groups() for a in g.axes)
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    report = p.step()
    assert report and report.forward_ok and report.output_shape_ok
    assert lm.model(*lm.example_inputs).shape == (1, 10)


def test_trace_leaves_model_as_found_frozen_train_mode() -> None:
    lm = load_model("demo:resnet")
    model = lm.model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    mg = trace(model, lm.example_inputs)
    assert model.training and all(not p.requires_grad for p in model.parameters())
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert sum(g.prunable for g in mg.groups()) >= 3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_meta_device_llama_traces_with_groups() -> None:
    lm = load_model("hf:llama?num_hidden_layers=4", device="meta")
    mg = trace(lm.model, lm.example_inputs)
    g = _head_group(mg)
    assert (g.heads.num_heads, g.heads.head_dim, g.heads.kv_heads) == (8, 8, 2)
    assert any(m.param.endswith("inv_freq") for m in g.members)  # rotary ties q/k dims
    mlp = [g for g in mg.groups()
           if any("mlp.gate_proj" in m.param and m.dim == 0 for m in g.members)]
    assert len(mlp) == 4 and all(g.channels == 128 and g.prunable for g in mlp)


@pytest.mark.parametrize("heads", ["dims", "whole"])
def test_llama_gqa_heads_pruned_and_config_consistent(heads: str) -> None:
    lm = load_model("demo:llama")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, heads=heads)
    report = p.step()
    assert report and report.forward_ok and report.output_shape_ok and not report.unsafe
    attn = lm.model.model.layers[0].self_attn
    q_rows = attn.q_proj.weight.shape[0]
    k_rows = attn.k_proj.weight.shape[0]
    assert q_rows == attn.head_dim * (k_rows // attn.head_dim) * attn.num_key_value_groups
    assert lm.model(*lm.example_inputs).logits.shape == (1, 16, 256)


def test_step_reports_and_schedule_end() -> None:
    lm = load_model("demo:mlp")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, iterative_steps=2)
    r1, r2, r3 = p.step(), p.step(), p.step()
    assert r1 and r2 and not r3
    assert r1.params_after < r1.params_before and r2.params_after < r2.params_before
    assert "schedule" in r3.skipped[0].reason
    assert any("fixed" in s.reason or "model" in s.reason for s in r1.skipped)


def test_unknown_op_is_reported_not_guessed() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(torch.fft.fft(h).real)

    mg = trace(M(), (torch.randn(2, 4),))
    g = next(g for g in mg.groups() if any(m.param == "a.weight" and m.dim == 0
                                            for m in g.members))
    assert not g.prunable and "unsupported op" in g.reason
    assert mg.coupling.unknown_ops


class _Recurrent(nn.Module):
    def __init__(self, cls: type[nn.RNNBase]) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.rnn = cls(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.inp(x))
        return self.out(h[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_hidden_units_mask_equivalence(cls: type[nn.RNNBase]) -> None:
    """Multi-layer bidirectional LSTM/GRU: hidden units pruned in every gate and layer."""
    model = _Recurrent(cls).eval()
    x = torch.randn(2, 5, 6)
    mg = trace(model, (x,))
    g = next(g for g in mg.groups() if any(m.param == "rnn.weight_hh_l0" for m in g.members))
    if cls is nn.LSTM:
        assert [a.role for a in g.axes if not a.prunable] == ["fixed"] * 4  # gates, 2x2 layers
    axis = next(i for i, a in enumerate(g.axes) if a.prunable)
    removal = Removal()
    removal.add(g.id, axis, [0, 3, 7, 8])
    masked = _mask_copy(model, mg.coupling, removal)
    apply_removal(model, mg.coupling, removal)
    assert model.rnn.hidden_size == 12 and model.rnn.weight_hh_l1.shape[1] == 12
    torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-4)
