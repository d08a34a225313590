"""The measured allocation (`explorer.prune.measured`, ``--allocation measured``).

The choice of counts on made-up curves; then real SmolLM2 weights cut to their first layers,
with real prose (calibration and held-out text disjoint). A truncated model's loss says
nothing of quality, so quality is the KL divergence of the next-token distribution from the
dense model's on held-out text (as in `tests/test_reconstruct.py`). The full 30-layer
comparison is `benchmarks/llm_quality.py` (``ours-measured``; table in docs/real-models.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from smollm2 import logprobs, mean_kl, truncated
from torch import nn

from explorer import Plan, Pruner, load_pruned
from explorer.app.cli import main
from explorer.io.data import DataOptions, load_data
from explorer.io.export import export
from explorer.io.specs import LoadedModel
from explorer.prune.calibration import Calibration
from explorer.prune.measured import Curve, choose
from explorer.prune.settings import Settings
from explorer.prune.statement import statement

LAYERS = 4
CHANNEL = 3 * 576  # parameters of one SmolLM2 MLP channel (gate, up and down)


@pytest.fixture(scope="module")
def small(smollm2: Path, prose: tuple[Path, Path]) -> tuple[LoadedModel, Calibration,
                                                             Calibration, list[torch.Tensor]]:
    lm = truncated(smollm2, LAYERS)
    cal = load_data(prose[0], lm, DataOptions(40, 48, 8))
    held = load_data(prose[1], lm, DataOptions(16, 48, 8))
    return lm, cal, held, logprobs(lm.model, held)


def _widths(model: nn.Module) -> list[int]:
    return [layer.mlp.up_proj.out_features for layer in model.model.layers]  # type: ignore


# -- the choice of counts ------------------------------------------------------------------
def test_choice_meets_the_budget_where_the_change_per_parameter_is_least() -> None:
    cheap = Curve("a", (0, 5, 10, 15), (0, 50, 100, 150), (0.0, 1.0, 2.0, 3.0))
    dear = Curve("b", (0, 5, 10, 15), (0, 50, 100, 150), (0.0, 2.0, 4.0, 6.0))
    assert choose([cheap, dear], 200) == [15, 5]  # the cheap one to its deepest depth first
    assert choose([cheap, dear], 95) == [10, 0]  # stops at the first count over the budget
    assert choose([cheap, dear], 10_000) == [15, 15]  # never past the depths measured
    assert choose([cheap, dear], 0) == [0, 0]


def test_a_cheap_deep_segment_behind_a_dear_one_is_not_taken_first() -> None:
    """Slopes are made non-decreasing: the deeper cut of ``kinked`` is reached only through
    its dear first segment, so the whole curve costs at least that much per parameter."""
    kinked = Curve("k", (0, 5, 10), (0, 50, 100), (0.0, 3.0, 3.5))
    steady = Curve("s", (0, 5, 10), (0, 50, 100), (0.0, 2.5, 5.0))
    assert choose([kinked, steady], 50) == [0, 5]
    assert choose([kinked, steady], 150) == [5, 10]


def test_a_coarse_index_waits_while_fine_ones_fill_the_budget() -> None:
    """A whole kv group (one index of 500 parameters) is cheaper per parameter than the MLP
    channels (100 each), but taking it would pass the budget by 300: the channels fill it."""
    group = Curve("kv", (0, 1), (0, 500), (0.0, 0.5))
    channels = Curve("mlp", (0, 10), (0, 1000), (0.0, 2.0))
    assert choose([group, channels], 200) == [0, 2]
    assert choose([group, channels], 650) == [1, 2]  # it fits now: first, then two channels
    assert choose([Curve("kv", (0, 1), (0, 500), (0.0, 0.5))], 200) == [1]  # only it meets it
    dear = Curve("kv", (0, 1), (0, 500), (0.0, 1.0))
    short = Curve("mlp", (0, 3), (0, 300), (0.0, 0.3))  # too few channels to meet 450 alone
    assert choose([dear, short], 450) == [1, 0]  # the group meets it: the channels go back


# -- the setting ----------------------------------------------------------------------------
def test_allocation_setting_and_global_pruning_stay_one_choice() -> None:
    assert Settings().allocation == "uniform" and not Settings().global_pruning
    assert Settings(global_pruning=True).allocation == "global"
    assert Settings(allocation="global").global_pruning
    assert Settings(global_pruning=True).but(global_pruning=False).allocation == "uniform"
    assert Settings(allocation="measured").but(global_pruning=False).allocation == "measured"
    assert Settings(allocation="global").but(allocation="measured").global_pruning is False
    with pytest.raises(ValueError, match=r"allocation must be one of \('uniform', 'global', "
                                         r"'measured'\), got 'best'"):
        Settings(allocation="best")
    with pytest.raises(ValueError, match="two allocations; choose one"):
        Settings(global_pruning=True, allocation="measured")


# -- on real weights --------------------------------------------------------------------------
def test_measured_widths_keep_the_parameter_budget_lose_less_and_export(
        smollm2: Path, small: tuple[LoadedModel, Calibration, Calibration, list[torch.Tensor]],
        tmp_path: Path) -> None:
    """The same parameter count as the uniform cut (within one channel), widths that differ,
    a lower held-out KL, and trials that leave the model exactly as it was. Such widths are
    no ``from_pretrained`` folder: the export says so and writes safetensors + plan, which
    `load_pruned` rebuilds with the same outputs."""
    lm, cal, held, dense = small
    full = _widths(lm.model)[0]
    uniform = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.4,
                     heads="keep", targets="mlp", calibration=cal)
    report = uniform.step()
    kl_uniform, params_uniform = mean_kl(lm.model, held, dense), report.params_after
    assert set(_widths(lm.model)) == {full - round(0.4 * full)}
    uniform.undo()
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    pruner = uniform  # the same scores, now shared out by measurement
    pruner.allocation, pruner.current_step = "measured", 0
    said = statement(pruner)
    assert said.allocation == "measured" and "measured widths" in said.text()
    assert "shared out by the change each layer's cut causes alone" in said.text()
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
    report = pruner.step()
    try:
        widths = _widths(lm.model)
        kl_measured = mean_kl(lm.model, held, dense)
        after = logprobs(lm.model, held)
        result = export(lm.model, tmp_path, "hf", plan=Plan.from_pruner(pruner, lm.spec))
    finally:
        pruner.undo()
    assert len(set(widths)) > 1, widths
    assert 0 <= params_uniform - report.params_after < CHANNEL, (params_uniform, report)
    assert kl_measured < kl_uniform, (kl_measured, kl_uniform)
    note = next(n for n in report.notes if n.startswith("measured allocation:"))
    assert "at uniform widths ->" in note and "KL of the outputs on 8 calibration" in note
    assert "layers of one kind now differ in width" in note
    assert "cannot describe" not in note  # the step's config note says it, once
    assert sum("cannot describe" in n for n in report.notes) == 1, report.notes
    assert "hf" not in result.files and "safetensors" in result.files
    assert any(m.startswith("hf: no transformers folder: ") and "intermediate_size" in m
               for m in result.messages), result.messages
    again = load_pruned(truncated(smollm2, LAYERS).model, tmp_path)
    for a, b in zip(logprobs(again, held), after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- the command line ----------------------------------------------------------------------
def test_cli_states_the_measured_allocation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "hf:llama", "--importance", "activation", "--ratio",
                 "0.4", "--heads", "keep", "--targets", "mlp", "--allocation", "measured",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["targets"]["allocation"] == "measured"
    assert any(n.startswith("measured allocation: each layer cut alone at") for n in
               out["notes"]), out["notes"]
    assert out["params_after"] < out["params_before"]


def test_measured_allocation_needs_real_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "hf:llama", "--device", "meta", "--importance",
                 "random", "--heads", "keep", "--allocation", "measured"]) == 2
    err = capsys.readouterr().err
    assert "allocation 'measured' cuts each layer and measures the outputs" in err
    assert "load the model on cpu" in err
