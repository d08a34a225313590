"""Sequential reconstruction (`--compensate lstsq`) and width allocation on real SmolLM2 weights.

The model is cut to its first layers and the data kept short so the file runs in about a
minute; the prose is real and the held-out text is disjoint from the calibration text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from explorer import Pruner, load_model
from explorer.io.data import DataOptions, load_data
from explorer.io.specs import LoadedModel
from explorer.prune import compensate, reconstruct
from explorer.prune.calibration import Calibration

LAYERS = 4


@pytest.fixture(scope="module")
def small(smollm2: Path, prose: tuple[Path, Path]) -> tuple[LoadedModel, Calibration,
                                                             Calibration]:
    lm = load_model(f"hf:{smollm2}")
    layers = lm.model.model.layers  # type: ignore[union-attr]
    del layers[LAYERS:]
    lm.model.config.num_hidden_layers = LAYERS  # type: ignore[union-attr]
    cal = load_data(prose[0], lm, DataOptions(40, 48, 8))
    held = load_data(prose[1], lm, DataOptions(16, 48, 8))
    return lm, cal, held


def _loss(model: nn.Module, held: Calibration) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in held.batches:
            ids, mask = batch[0], held.token_mask(batch)
            assert mask is not None
            logits = model(*batch).logits[:, :-1]
            real = mask[:, 1:]
            total += float(nn.functional.cross_entropy(logits[real], ids[:, 1:][real],
                                                       reduction="sum"))
            count += int(real.sum())
    return total / count


def _pruner(lm: LoadedModel, cal: Calibration, ratio: float, **kw: Any) -> Pruner:
    return Pruner(lm.model, lm.example_inputs, importance="activation", ratio=ratio,
                  heads="keep", targets="mlp", calibration=cal, **kw)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_reconstruction_lowers_heldout_loss(small: tuple[LoadedModel, Calibration, Calibration],
                                            ratio: float) -> None:
    lm, cal, held = small
    dense = _loss(lm.model, held)
    pruner = _pruner(lm, cal, ratio)
    pruner.step()
    plain = _loss(lm.model, held)
    pruner.undo()
    pruner.compensate = compensate.compensation("lstsq")
    pruner.current_step = 0
    report = pruner.step()
    rebuilt = _loss(lm.model, held)
    pruner.undo()
    assert dense < rebuilt < plain, (dense, rebuilt, plain)
    # a real gain: at least a tenth of what the cut lost comes back
    assert plain - rebuilt > 0.1 * (plain - dense), (dense, rebuilt, plain)
    assert any(n.startswith("reconstruction (sequential least squares) kept in") and
               f"/{LAYERS} layers" in n for n in report.notes), report.notes
    assert math.isfinite(rebuilt)


def test_undo_restores_every_tensor_exactly(small: tuple[LoadedModel, Calibration,
                                                         Calibration]) -> None:
    lm, cal, _held = small
    before = _snapshot(lm.model)
    pruner = _pruner(lm, cal, 0.3, compensate="lstsq")
    report = pruner.step()
    down = lm.model.model.layers[0].mlp.down_proj  # type: ignore[union-attr]
    assert report and down.weight.shape[1] < down.out_features * 3
    # the refit keeps Llama's bias-less down projections bias-less (a config describes it)
    assert all(layer.mlp.down_proj.bias is None for layer in lm.model.model.layers)  # type: ignore
    assert any("kept in" in n for n in report.notes), report.notes
    pruner.undo()
    _same(lm.model, before)


@pytest.mark.parametrize("where", ["fit", "install"])
def test_failure_leaves_the_model_as_it_was(small: tuple[LoadedModel, Calibration, Calibration],
                                            monkeypatch: pytest.MonkeyPatch,
                                            where: str) -> None:
    lm, cal, _held = small
    before = _snapshot(lm.model)
    pruner = _pruner(lm, cal, 0.3, compensate="lstsq")
    calls = [0]

    def boom(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the second layer: the first is done, the model half changed
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    real = reconstruct.heldout_errors if where == "fit" else compensate._install
    monkeypatch.setattr(reconstruct if where == "fit" else compensate,
                        "heldout_errors" if where == "fit" else "_install", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.step()
    _same(lm.model, before)


def test_same_width_in_every_layer_unless_global(small: tuple[LoadedModel, Calibration,
                                                              Calibration]) -> None:
    lm, cal, _held = small

    def widths() -> list[int]:
        return [layer.mlp.up_proj.out_features for layer in lm.model.model.layers]  # type: ignore

    full = widths()[0]
    pruner = _pruner(lm, cal, 0.4)
    pruner.step()
    uniform = widths()
    pruner.undo()
    pruner.configure(global_pruning=True)
    pruner.current_step = 0
    report = pruner.step()
    spread = widths()
    pruner.undo()
    assert len(set(uniform)) == 1 and uniform[0] == full - round(0.4 * full)
    assert len(set(spread)) > 1 and abs(sum(spread) - sum(uniform)) <= LAYERS
    assert any(n.startswith("global allocation: per-layer widths") for n in report.notes), \
        report.notes


def test_unknown_reconstruction_target_is_one_clear_error(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    lm, cal, _held = small
    with pytest.raises(ValueError, match="unknown reconstruction target 'both'"):
        reconstruct.reconstruct(lm.model, [], cal, streams=["both"])

