"""Compensation after removal: math oracles on constructed layers, all-or-nothing, undo."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from explorer import Pruner
from explorer.app.cli import main
from explorer.prune.calibration import Calibration
from explorer.prune.compensate import Compensation, compensation, prune_and_compensate
from explorer.prune.removal import Removal, undo
from explorer.prune.sensitivity import allocate


class MLP(nn.Module):
    """fc1 -> relu -> fc2; hidden units 0-3 are made constant (or dead) by construction."""

    def __init__(self, value: float, out_bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5, bias=out_bias)
        with torch.no_grad():
            self.fc1.weight[:4] = 0.0
            self.fc1.bias[:4] = value  # relu(value): a constant (value > 0) or dead unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _setup(value: float, out_bias: bool = True) -> tuple[MLP, Pruner, Removal, Calibration]:
    model = MLP(value, out_bias)
    x = torch.randn(64, 6)
    pruner = Pruner(model, (x[:4],))
    (group,) = [g for g in pruner.groups if g.prunable]
    removal = Removal()
    removal.add(group.id, 0, [0, 1, 2, 3])
    return model, pruner, removal, Calibration([(x[:32],), (x[32:],)])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_dead_channels_are_removed_losslessly(mode: str) -> None:
    model, pruner, removal, calib = _setup(-1.0)
    x = torch.randn(16, 6)
    before = model(x)
    prune_and_compensate(model, pruner.coupling, removal, calib, mode)
    assert model.fc2.weight.shape == (5, 8)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_bias_compensation_of_constant_channels_is_exact() -> None:
    model, pruner, removal, calib = _setup(0.7)
    x = torch.randn(16, 6)
    before = model(x)
    plain = copy.deepcopy(model)
    prune_and_compensate(model, pruner.coupling, removal, calib, "bias")
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    # the oracle: the dropped term is W[:, :4] @ relu(0.7), folded into the bias
    expected = plain.fc2.bias + plain.fc2.weight[:, :4] @ torch.full((4,), 0.7)
    torch.testing.assert_close(model.fc2.bias, expected)
    # without compensation the same removal does change the output
    prune_and_compensate(plain, pruner.coupling, removal, calib, None)
    assert (plain(x) - before).abs().max() > 1e-2


def test_bias_is_created_where_the_layer_has_none_and_undo_removes_it() -> None:
    model, pruner, removal, calib = _setup(0.7, out_bias=False)
    x = torch.randn(16, 6)
    before_out, before = model(x), _snapshot(model)
    applied = prune_and_compensate(model, pruner.coupling, removal, calib, "bias")
    assert model.fc2.bias is not None and model.fc2.bias.shape == (5,)
    torch.testing.assert_close(model(x), before_out, atol=1e-6, rtol=1e-6)
    undo(model, applied)
    assert model.fc2.bias is None and "fc2.bias" not in dict(model.named_parameters())
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_pruner_compensates_and_undoes_exactly() -> None:
    model = MLP(0.5)
    x = torch.randn(32, 6)
    before_out, before = model(x), _snapshot(model)
    pruner = Pruner(model, (x[:4],), importance="activation", ratio=0.25,
                    calibration=Calibration([(x,)]), compensate="lstsq")
    report = pruner.step()
    assert report and model.fc2.weight.shape == (5, 9)
    pruner.undo()
    after = _snapshot(model)
    assert all(after[n] is before[n] for n in before)
    torch.testing.assert_close(model(x), before_out, atol=0, rtol=0)


def test_failing_calibration_leaves_the_model_as_it_was() -> None:
    model, pruner, removal, _calib = _setup(0.7)
    before = _snapshot(model)
    bad = Calibration([(torch.randn(4, 7),)])  # wrong width: the forward fails
    with pytest.raises(RuntimeError):
        prune_and_compensate(model, pruner.coupling, removal, bad, "lstsq")
    after = _snapshot(model)
    assert all(after[n] is before[n] for n in before) and model.fc2.weight.shape == (5, 12)


def test_unknown_compensation_is_one_clear_error() -> None:
    assert compensation("bias") is Compensation.BIAS and compensation(None) is None
    with pytest.raises(ValueError, match="unknown compensation 'ols'; choose one of"):
        compensation("ols")
    with pytest.raises(ValueError, match="unknown compensation"):
        Pruner(MLP(0.5), (torch.randn(2, 6),), compensate="ols")


def test_cli_prunes_with_compensation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "demo:mlp", "--importance", "activation",
                 "--compensate", "lstsq", "--ratio", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_after"] < out["params_before"] and out["forward_ok"]
    assert main(["prune", "--model", "demo:mlp", "--device", "meta", "--compensate",
                 "bias"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: compensation 'bias' needs real weights") and "\n" not in err


class TwoBlocks(nn.Module):
    """Two residual MLP blocks; the first one barely moves the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.b1, self.b2 = nn.Linear(8, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.a2.weight *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a2(torch.relu(self.a1(x)))
        return x + self.b2(torch.relu(self.b1(x)))


def test_measured_allocation_cuts_the_insensitive_block_and_restores_the_model() -> None:
    model = TwoBlocks()
    x = torch.randn(64, 8)
    before = _snapshot(model)
    pruner = Pruner(model, (x[:4],), importance="activation", calibration=Calibration([(x,)]))
    alloc = allocate(pruner, 0.7, Calibration([(x,)]), ratios=(0.25, 0.5, 0.75))
    after = _snapshot(model)
    assert all(after[n] is before[n] for n in before)  # every trial undone exactly
    share = {s.title.split(": ")[1].split(" ")[0]: s for s in alloc.shares}
    assert share["a1"].ratio == 0.75 and share["b1"].ratio < 0.75, alloc.shares
    assert alloc.params_predicted <= alloc.params_target
    assert pruner.predict_params(alloc.removal(pruner)) == alloc.params_predicted


def test_calibration_passes_stop_before_the_vocabulary_logits() -> None:
    """A pass only reads layer inputs: the output layer's input is recorded, its output
    (a language model's logits, the largest tensor of the forward) is never computed, and
    the statistics equal a full forward's."""
    from explorer.io.specs import load_model
    from explorer.prune.importance import activation_norms, input_norm_hooks

    lm = load_model("hf:llama")
    model = lm.model
    gen = torch.Generator().manual_seed(0)
    calib = Calibration([(torch.randint(0, 256, (2, 12), generator=gen),) for _ in range(3)])
    head = model.get_output_embeddings()
    ran: list[int] = []
    handle = head.register_forward_hook(lambda _m, _a, _o: ran.append(1))
    try:
        norms = activation_norms(model, calib)
    finally:
        handle.remove()
    assert not ran and "lm_head" in norms
    full: dict[str, torch.Tensor] = {}
    hooks = input_norm_hooks(model, full)
    try:
        with torch.no_grad():
            for (ids,) in calib.batches:
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert full.keys() == norms.keys()
    for name, value in full.items():
        torch.testing.assert_close(norms[name], value, rtol=0, atol=0)
    assert not head._forward_pre_hooks  # the stop is removed with the statistics hooks


def test_the_command_line_returns_freed_memory() -> None:
    """glibc's mmap threshold is fixed (no dynamic rise): a freed block of a few MiB leaves
    the process instead of staying in the heap."""
    import sys

    from explorer.app.allocator import return_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert return_freed_memory() is True
