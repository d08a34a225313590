"""Sequential reconstruction (`--compensate lstsq`) and width allocation on real SmolLM2 weights.

Most tests cut the model to its first layers and keep the data short so the file runs in
about a minute; the prose is real and the held-out text is disjoint from the calibration
text. A truncated model's language-model loss says nothing of quality (its dense loss is
worse than a uniform guess's, and a cut can "improve" it), so those tests measure what a
reconstruction is for: the KL divergence of the pruned model's next-token distribution from
the dense model's on held-out text. One test runs the whole 30-layer model and compares the
held-out loss of the recipes.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from smollm2 import logprobs, mean_kl, truncated
from torch import nn

from explorer import Pruner, load_model
from explorer.io.data import DataOptions, load_data
from explorer.io.specs import LoadedModel
from explorer.prune import compensate, reconstruct
from explorer.prune.calibration import Calibration
from explorer.prune.statement import statement

LAYERS = 4


@pytest.fixture(scope="module")
def small(smollm2: Path, prose: tuple[Path, Path]) -> tuple[LoadedModel, Calibration,
                                                             Calibration]:
    lm = truncated(smollm2, LAYERS)
    cal = load_data(prose[0], lm, DataOptions(40, 48, 8))
    held = load_data(prose[1], lm, DataOptions(16, 48, 8))
    DENSE[id(lm.model)] = logprobs(lm.model, held)
    return lm, cal, held


DENSE: dict[int, list[torch.Tensor]] = {}  # model -> its dense held-out log-probabilities


def _kl(model: nn.Module, held: Calibration) -> float:
    """Mean KL(dense || model) of the next-token distributions on the held-out tokens."""
    return mean_kl(model, held, DENSE[id(model)])


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
def test_reconstruction_brings_the_cut_model_back_to_the_dense_one(
        small: tuple[LoadedModel, Calibration, Calibration], ratio: float) -> None:
    lm, cal, held = small
    pruner = _pruner(lm, cal, ratio)
    pruner.step()
    plain = _kl(lm.model, held)
    pruner.undo()
    pruner.compensate = compensate.compensation("lstsq")
    pruner.current_step = 0
    report = pruner.step()
    rebuilt = _kl(lm.model, held)
    pruner.undo()
    # a real gain: at least a third of the cut's divergence from the dense model goes
    assert 0 < rebuilt < 0.67 * plain, (rebuilt, plain)
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

    real = reconstruct.refits if where == "fit" else compensate._install
    monkeypatch.setattr(reconstruct if where == "fit" else compensate,
                        "refits" if where == "fit" else "_install", boom)
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
    assert statement(pruner).allocation == "uniform"
    pruner.step()
    uniform = widths()
    pruner.undo()
    pruner.configure(global_pruning=True)
    pruner.current_step = 0
    said = statement(pruner)
    assert said.allocation == "global" and "global widths" in said.text()
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


def test_whole_head_cuts_refit_the_output_projection(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    """Whole kv groups: the output projections lose their columns and are refit layer by
    layer, which lowers the held-out loss of the plain cut; they stay bias-less like
    Llama's."""
    lm, cal, held = small
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.25,
                    heads="whole", targets="heads", calibration=cal)
    pruner.step()
    plain = _kl(lm.model, held)
    cut = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "o_proj" in n}
    pruner.undo()
    pruner.compensate = compensate.compensation("lstsq")
    pruner.current_step = 0
    report = pruner.step()
    rebuilt = _kl(lm.model, held)
    refit = [n for n, p in lm.model.named_parameters()
             if "o_proj" in n and not torch.equal(p, cut[n])]
    biases = [layer.self_attn.o_proj.bias for layer in lm.model.model.layers]  # type: ignore
    pruner.undo()
    assert refit and all(b is None for b in biases), refit
    assert rebuilt < plain, (rebuilt, plain)
    assert any("reconstruction (sequential least squares) kept in" in n for n in report.notes)


def test_query_head_cuts_with_refit_come_back_to_the_dense_model(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    """Query heads inside the kv groups (3 -> 2 per group): the refit of the output
    projections must bring the model back towards the dense one. (On this truncated model
    the held-out LM loss reads 17.82 dense, 17.10 cut, 17.79 refit: the refit restores the
    dense model, whose loss here is no quality measure; KL 0.69 -> 0.08.)"""
    lm, cal, held = small
    kl = {}
    for comp in (None, "lstsq"):
        pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.34,
                        heads="query", targets="heads", calibration=cal, compensate=comp)
        report = pruner.step()
        assert {(c.width_before, c.width_after) for c in report.changes} == {(3, 2)}
        kl[comp] = _kl(lm.model, held)
        pruner.undo()
    assert kl["lstsq"] < 0.5 * kl[None], kl


@pytest.fixture(scope="module")
def full(smollm2: Path, prose: tuple[Path, Path]) -> tuple[LoadedModel, Calibration,
                                                            Calibration]:
    lm = load_model(f"hf:{smollm2}")
    return (lm, load_data(prose[0], lm, DataOptions(24, 64, 8)),
            load_data(prose[1], lm, DataOptions(16, 64, 8)))


def test_recipe_beats_wanda_sp_and_the_layer_target_on_the_whole_model(
        full: tuple[LoadedModel, Calibration, Calibration],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """All 30 layers at 40 % of the MLP channels, held-out loss: the default refit (the
    block's output put back on the dense model's residual stream) < the refit of each
    layer's own output (``original`` only, the previous default) < Wanda-sp (the same
    channels, no refit) < the cut's worst case."""
    lm, cal, held = full
    dense = _loss(lm.model, held)
    losses = {}
    for name, streams in (("wanda-sp", None), ("original", ("original",)),
                          ("default", reconstruct.DEFAULT_STREAMS)):
        if streams is not None:
            monkeypatch.setattr(compensate, "reconstruct", functools.partial(
                reconstruct.reconstruct, streams=streams))
        pruner = _pruner(lm, cal, 0.4, compensate=None if streams is None else "lstsq")
        report = pruner.step()
        losses[name] = _loss(lm.model, held)
        pruner.undo()
        if name == "default":
            assert any("ridge" in n and "stream" in n for n in report.notes), report.notes
    assert dense < losses["default"] < losses["original"] < losses["wanda-sp"], (dense, losses)


def _down_projs(model: nn.Module, layers: int, keep: float) -> list[reconstruct.Consumer]:
    """The MLP down projections of the first ``layers`` layers, each keeping a fixed random
    ``keep`` of its input channels."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(layers):
        name = f"model.layers.{i}.mlp.down_proj"
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear)
        n = module.in_features
        kept = torch.randperm(n, generator=gen)[:round(keep * n)].sort().values.numpy()
        out.append(reconstruct.Consumer(name, f"{name}.weight", kept))
    return out


def test_statistics_summed_batch_by_batch_equal_the_all_samples_fit(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    """The reconstruction sums its moments and held-out errors batch by batch; the first
    block's refit equals the one from all the samples' inputs at once (the old way: every
    input and target kept), and moving the pruned stream on from what was kept equals
    running the block again (``keep_bytes=0``) up to float rounding."""
    lm, cal, _held = small
    model = lm.model
    consumers = _down_projs(model, 2, 0.6)
    rec = reconstruct.reconstruct(model, consumers, cal)
    again = reconstruct.reconstruct(model, consumers, cal, keep_bytes=0)
    # the all-samples reference of block 0 (its pruned stream is the dense one up to its
    # down projection, and the stream target there is the layer's own dense output)
    first = consumers[0]
    module = model.get_submodule(first.module)
    assert isinstance(module, nn.Linear)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    mask: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, args, out: seen.append((args[0][mask[0]].float(), out[mask[0]].float())))
    parts = reconstruct.split(cal)
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for part in parts:
                assert part is not None
                seen.clear()
                for batch in part.batches:
                    now = part.token_mask(batch)
                    assert now is not None
                    mask[:] = [now]
                    model(*batch)
                rows.append(list(seen))
    finally:
        handle.remove()
    xs = [x for x, _y in rows[0]]
    ys = [y for _x, y in rows[0]]
    gram, cross = reconstruct.moments(xs, {"original": ys, "stream": ys},
                                      torch.as_tensor(first.kept), all_rows=False)
    cands = reconstruct.refits(module.weight.detach(), None, first.kept, gram, cross,
                               streams=reconstruct.DEFAULT_STREAMS)
    errors = reconstruct.heldout_errors(cands, [x for x, _y in rows[1]],
                                        [y for _x, y in rows[1]], first.kept)
    choice = min(errors, key=lambda k: (errors[k], k != "plain"))
    fit = rec.fits[0]
    assert fit.choice == choice != "plain", (fit.choice, errors)
    assert math.isclose(fit.error, errors[choice], rel_tol=1e-5)
    assert math.isclose(fit.error_plain, errors["plain"], rel_tol=1e-5)
    assert torch.allclose(rec.tensors[first.weight], cands[choice][:, :-1].float(),
                          rtol=1e-4, atol=1e-6)
    assert [f.choice for f in again.fits] == [f.choice for f in rec.fits]
    assert rec.tensors.keys() == again.tensors.keys()
    for name, t in rec.tensors.items():  # the streams differ in rounding: (out - old) + new
        moved = float((t - again.tensors[name]).norm() / t.norm())
        assert moved <= 1e-4, (name, moved)


_GROWTH = """
import json, sys
import numpy as np, torch
from explorer import load_model
from explorer.app.allocator import return_freed_memory
from explorer.io.data import DataOptions, load_data
from explorer.prune.reconstruct import Consumer, reconstruct
return_freed_memory()  # as the command line does: the peak follows what is held
lm = load_model("hf:" + sys.argv[1])
del lm.model.model.layers[2:]
lm.model.config.num_hidden_layers = 2
cal = load_data(sys.argv[2], lm, DataOptions(int(sys.argv[3]), 128, 8))
cons = [Consumer(f"model.layers.{i}.mlp.down_proj", f"model.layers.{i}.mlp.down_proj.weight",
                 np.arange(1229)) for i in range(2)]
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
rec = reconstruct(lm.model, cons, cal)
tokens = sum(int(cal.token_mask(b).sum()) for b in cal.batches)
print(json.dumps({"grew_mb": (status("VmHWM") - before) // 1024, "fits": len(rec.fits),
                  "tokens": tokens}))
"""


@pytest.mark.timeout(600)
def test_reconstruction_memory_does_not_grow_with_every_sample_kept(
        smollm2: Path, prose: tuple[Path, Path]) -> None:
    """128 calibration samples of 128 tokens through two layers: the reconstruction holds
    the two streams' hidden states and a bounded part of the batches
    (`reconstruct.KEEP_BYTES`), not every sample's consumer inputs and targets (the old
    way: 587 MB here, 305 MB batch by batch; 2026-12-05)."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _GROWTH, str(smollm2), str(prose[0]), "128"],
                         capture_output=True, text=True, env=env, timeout=580)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["fits"] == 2 and result["tokens"] > 9000, result
    assert result["grew_mb"] <= 450, result
