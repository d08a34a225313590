"""The pruner and its importance criteria on constructed and real models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from explorer import Pruner, load_model
from explorer.prune.calibration import Calibration
from explorer.prune.importance import make
from explorer.prune.sensitivity import scan


class Planted(nn.Module):
    """An MLP whose hidden units 0-3 are made unimportant by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)
        with torch.no_grad():
            self.fc1.weight[:4] *= 1e-3
            self.fc1.bias[:4] = 0
            self.fc2.weight[:, :4] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _hidden_scores(name: str, calib: Calibration | None = None) -> np.ndarray:
    model = Planted()
    x = torch.randn(8, 6)
    p = Pruner(model, (x,), importance=name, calibration=calib)
    cands, _ = p.candidates()
    (c,) = [c for c in cands if c.group.members[0].param == "fc1.weight"]
    return c.scores


@pytest.mark.parametrize("name", ["magnitude", "l1", "taylor", "fisher", "activation"])
def test_criteria_rank_planted_signal_lowest(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    calib = Calibration([(x[:8],), (x[8:],)], loss="ce",
                        labels=[torch.randint(0, 3, (8,)), torch.randint(0, 3, (8,))])
    scores = _hidden_scores(name, calib)
    assert set(np.argsort(scores)[:4].tolist()) == {0, 1, 2, 3}


def test_fisher_accumulates_every_calibration_batch() -> None:
    torch.manual_seed(0)
    model = Planted()
    x1, x2 = torch.randn(4, 6), 5 * torch.randn(4, 6)
    y = torch.zeros(4, dtype=torch.long)
    p = Pruner(model, (x1,))
    (group,) = [g for g in p.groups if g.prunable]
    fisher = []
    for batches in ([(x1,)], [(x2,)], [(x1,), (x2,)]):
        crit = make("fisher")
        crit.prepare(model, p.coupling, Calibration(batches, loss="ce", labels=[y] * len(batches)))
        fisher.append(crit.scores(model, p.coupling, group)[0])
    assert not np.allclose(fisher[0], fisher[1])
    np.testing.assert_allclose(fisher[2], fisher[0] + fisher[1], rtol=1e-6)


def test_global_pruning_respects_per_group_maximum() -> None:
    lm = load_model("demo:resnet")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, global_pruning=True, max_ratio=0.6)
    total = sum(c.original for c in p.candidates()[0])
    report = p.step()
    assert report and report.forward_ok
    for change in report.changes:  # no group loses more than 60 %
        assert change.width_after >= round(change.width_before * 0.4), change
    removed = sum(c.width_before - c.width_after for c in report.changes)
    assert removed == round(total * 0.5)  # the global budget is spent exactly
    ratios = {round(1 - c.width_after / c.width_before, 2) for c in report.changes}
    assert len(ratios) > 1  # global ranking cuts groups unevenly


def test_parameter_budget_is_met_within_one_round_step() -> None:
    lm = load_model("demo:resnet")
    p = Pruner(lm.model, lm.example_inputs, target_params=0.5, round_to=4)
    report = p.step()
    assert report.params_after <= 0.5 * report.params_before
    assert report.params_after >= 0.35 * report.params_before  # not over-pruned
    for c in report.changes:
        assert c.width_after % 4 == 0


def test_iterative_schedule_reaches_ratio_then_reports_nothing() -> None:
    lm = load_model("demo:mlp")
    widths = []
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5, iterative_steps=5)
    for _ in range(5):
        report = p.step()
        assert report, report.skipped
        widths.append(lm.model.fc1.out_features)
    assert widths == sorted(widths, reverse=True) and widths[-1] == 32
    last = p.step()
    assert not last and "schedule" in last.skipped[-1].reason


def test_interactive_accept_reject_resize_and_undo_are_exact() -> None:
    lm = load_model("demo:resnet")
    model = lm.model
    original = copy.deepcopy(model.state_dict())
    p = Pruner(model, lm.example_inputs, ratio=0.5)
    seen = []
    for i, prop in enumerate(p.proposals()):
        seen.append(prop.group.title)
        if i == 0:
            assert prop.accept().ok
        elif i == 1:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            prop.reject()
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        elif i == 2:
            axis = next(iter(prop.picks))
            assert prop.accept(count=2).ok
            assert prop.applied is not None
        else:
            prop.reject()
    assert len(seen) >= 3
    assert model(*lm.example_inputs).shape == (1, 10)
    assert len(p.applied) == 2
    p.undo()
    p.undo()
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(original[k], state[k]) for k in original)
    assert model(*lm.example_inputs).shape == (1, 10)
    assert axis is not None


def test_interactive_unsafe_proposal_changes_nothing() -> None:
    lm = load_model("demo:dino_vit")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    for prop in p.proposals():
        if prop.group.channels == 96:  # the residual stream: DINO reshapes with C // heads
            state = {k: v.clone() for k, v in lm.model.state_dict().items()}
            verdict = prop.accept()
            assert not verdict.ok and "dino.py:" in verdict.location
            assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
            break
    else:
        pytest.fail("no residual-stream proposal")


def test_sensitivity_scan_table() -> None:
    lm = load_model("demo:mlp")
    p = Pruner(lm.model, lm.example_inputs, ratio=0.5)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rows = scan(p, ratios=(0.25, 0.75))
    after = lm.model.state_dict()  # every trial was undone exactly
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert rows and {r.ratio for r in rows} == {0.25, 0.75}
    by_ratio = {r.ratio: r.output_change for r in rows if r.group == rows[0].group}
    assert by_ratio[0.75] > by_ratio[0.25] > 0


def test_meta_model_scores_are_explained_or_refused() -> None:
    lm = load_model("demo:llama", device="meta")
    report = Pruner(lm.model, lm.example_inputs, ratio=0.5).step()
    assert report and any("meta device" in n for n in report.notes)
    with pytest.raises(ValueError, match="needs real weights and data"):
        Pruner(lm.model, lm.example_inputs, importance="fisher").step()


@pytest.mark.parametrize("spec", ["hf:llama?num_hidden_layers=2",
                                  "hf:gemma?num_hidden_layers=2"])
def test_undo_after_a_config_changing_cut_is_exact(spec: str) -> None:
    """Undo puts back the config and every module setting as they were, rather than
    re-deriving a config from the restored shapes (a 64-wide q_proj also reads as 4 heads
    x 16, which once set head_dim to 16 on the attention modules and broke the forward)."""
    lm = load_model(spec)
    model, inputs = lm.model.eval(), lm.example_inputs
    config = copy.deepcopy(model.config.to_dict())
    settings = {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
                if isinstance(v, (int, float, tuple)) and not k.startswith("_")}
    with torch.no_grad():
        before = model(*inputs).logits
    pruner = Pruner(model, inputs, ratio=0.3, heads="whole", round_to=4)
    report = pruner.step()
    assert report.config  # the cut changed the config (heads and hidden size)
    pruner.undo()
    assert model.config.to_dict() == config
    assert {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, (int, float, tuple)) and not k.startswith("_")} == settings
    with torch.no_grad():
        assert torch.equal(model(*inputs).logits, before)


def test_config_update_never_leaves_a_model_that_does_not_run() -> None:
    """Without the recorded settings (an undo after a change outside the pruner), the config
    is re-derived from the shapes; when the module settings it would follow break the
    forward (head_dim 8 -> 16 on Llama attention), they are put back and the config left."""
    lm = load_model("hf:llama?num_hidden_layers=2")
    model, inputs = lm.model.eval(), lm.example_inputs
    with torch.no_grad():
        before = model(*inputs).logits
    pruner = Pruner(model, inputs, ratio=0.3, heads="whole", round_to=4)
    pruner.step()
    pruner.history.edits[-1].state = None  # nothing recorded: undo re-derives the config
    pruner.undo()
    assert model.model.layers[0].self_attn.head_dim == 8
    with torch.no_grad():
        assert torch.equal(model(*inputs).logits, before)
    assert "left as it was" in pruner.config_note
