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


def _sample_rows(model: nn.Module, module: nn.Module, cal: Calibration
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, outputs) of ``module`` per calibration sample, real tokens only, from the
    dense model run on the batches as given."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    mask: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, out: seen.extend(
        (args[0][j][mask[0][j]].float(), out[j][mask[0][j]].float())
        for j in range(out.shape[0])))
    try:
        with torch.no_grad():
            for batch in cal.batches:
                now = cal.token_mask(batch)
                assert now is not None
                mask[:] = [now]
                model(*batch)
    finally:
        handle.remove()
    return seen


def test_statistics_summed_batch_by_batch_equal_the_all_samples_fit(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    """The reconstruction sums its moments and held-out errors batch by batch, over the
    fit and held-out samples batched again by length (`reconstruct.split`); the first
    block's refit equals the one from all the samples' inputs at once, taken from the
    batches as given (every fifth sample held out), and moving the pruned stream on from
    what was kept equals running the block again (``keep_bytes=0``) up to float
    rounding."""
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
    rows = _sample_rows(model, module, cal)
    fit_rows = [r for k, r in enumerate(rows) if k % reconstruct.HOLDOUT_EVERY != 4]
    held_rows = [r for k, r in enumerate(rows) if k % reconstruct.HOLDOUT_EVERY == 4]
    gram, cross = reconstruct.moments([x for x, _y in fit_rows],
                                      {"stream": [y for _x, y in fit_rows]},
                                      torch.as_tensor(first.kept), all_rows=False)
    cands = reconstruct.refits(module.weight.detach(), None, first.kept, gram, cross,
                               streams=reconstruct.DEFAULT_STREAMS)
    errors = reconstruct.heldout_errors(cands, [x for x, _y in held_rows],
                                        [y for _x, y in held_rows], first.kept)
    choice = min(errors, key=lambda k: (errors[k], k != "plain"))
    fit = rec.fits[0]
    assert fit.choice == choice != "plain", (fit.choice, errors)
    assert math.isclose(fit.error, errors[choice], rel_tol=1e-5)
    assert math.isclose(fit.error_plain, errors["plain"], rel_tol=1e-5)
    # the batches differ in padding width: the inputs differ in float rounding only
    ref = cands[choice][:, :-1].float()
    moved = float((rec.tensors[first.weight] - ref).norm() / ref.norm())
    assert moved <= 1e-5, moved
    assert [f.choice for f in again.fits] == [f.choice for f in rec.fits]
    assert rec.tensors.keys() == again.tensors.keys()
    for name, t in rec.tensors.items():  # the streams differ in rounding: (out - old) + new
        moved = float((t - again.tensors[name]).norm() / t.norm())
        assert moved <= 1e-4, (name, moved)


def _real(part: Calibration) -> list[tuple[int, ...]]:
    """Every sample's real token ids, in batch order."""
    out = []
    for batch in part.batches:
        mask = part.token_mask(batch)
        assert mask is not None
        out += [tuple(batch[0][j][mask[j]].tolist()) for j in range(batch[0].shape[0])]
    return out


def test_split_holds_out_every_fifth_sample_in_full_batches_of_like_length(
        small: tuple[LoadedModel, Calibration, Calibration], prose: tuple[Path, Path]) -> None:
    """The held-out fifth used to run as one or two samples of every batch (a block call
    each) and every batch kept the padding of its longest sample: now both parts are
    batched again, longest first, each batch as wide as its longest sample."""
    cal = load_data(prose[0], small[0], DataOptions(40, 128, 8))  # paragraphs: lengths vary
    fit, held = reconstruct.split(cal)
    assert held is not None
    samples = _real(cal)
    assert sorted(_real(held)) == sorted(samples[4::5])
    assert sorted(_real(fit)) == sorted(s for k, s in enumerate(samples) if k % 5 != 4)
    size = max(b[0].shape[0] for b in cal.batches)
    for part in (fit, held):
        count = sum(b[0].shape[0] for b in part.batches)
        assert len(part.batches) == -(-count // size), [b[0].shape for b in part.batches]
        lengths = [int(part.token_mask(b).sum(1).max()) for b in part.batches]  # type: ignore
        assert [b[0].shape[1] for b in part.batches] == lengths
        assert lengths == sorted(lengths, reverse=True)

    def padded(part: Calibration) -> int:
        return sum(int((~part.token_mask(b)).sum()) for b in part.batches)  # type: ignore

    assert padded(fit) + padded(held) < 0.5 * padded(cal), (padded(fit), padded(held),
                                                           padded(cal))


def test_split_keeps_batches_it_cannot_line_up() -> None:
    """Per-sample inputs of other shapes in different batches (no padding mask to line them
    up) stay in their batches; the held-out samples are still every fifth."""
    batches = [(torch.arange(30.0).reshape(5, 6),), (torch.arange(40.0).reshape(5, 8),)]
    fit, held = reconstruct.split(Calibration(batches))
    assert held is not None
    assert [tuple(b[0].shape) for b in fit.batches] == [(4, 6), (4, 8)]
    assert [tuple(b[0].shape) for b in held.batches] == [(1, 6), (1, 8)]
    same = [(torch.arange(30.0).reshape(5, 6),), (torch.arange(30.0, 60.0).reshape(5, 6),)]
    fit, held = reconstruct.split(Calibration(same))
    assert held is not None
    assert [tuple(b[0].shape) for b in fit.batches] == [(5, 6), (3, 6)]
    assert torch.equal(held.batches[0][0], torch.stack([same[0][0][4], same[1][0][4]]))
    # token ids padded (pad id 7) with their mask, and a per-sample input of one shape
    # (say an image per sample): samples move together, the token inputs re-padded
    ids = [torch.tensor([[1, 2, 7], [3, 7, 7]]), torch.tensor([[4, 5, 6, 8], [9, 7, 7, 7]])]
    masks = [(i != 7).long() for i in ids]
    images = [torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])]
    mixed = Calibration([(i, m, x) for i, m, x in zip(ids, masks, images, strict=True)],
                        mask_index=1)
    fit, held = reconstruct.split(mixed, every=2)
    assert held is not None
    assert len(fit.batches) == len(held.batches) == 1
    assert fit.batches[0][0].tolist() == [[4, 5, 6, 8], [1, 2, 7, 7]]
    assert fit.batches[0][1].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert fit.batches[0][2].tolist() == [[2.0], [0.0]]
    assert held.batches[0][0].tolist() == [[3], [9]]
    assert held.batches[0][2].tolist() == [[1.0], [3.0]]


def test_one_additivity_check_per_block_class_and_default_targets(
        small: tuple[LoadedModel, Calibration, Calibration]) -> None:
    """Whether a consumer's output adds to its block's output is checked by two more runs
    of the first block only (its output cut, and moved; later blocks of the class read
    it); each block then runs once per batch of each stream, the original block once per
    batch also where it has two consumers. The MLP (its output adds to the block's) is fit to the
    ``stream`` target only; the attention output projection, not the block's last
    consumer, to its own output (``original``)."""
    lm, cal, _held = small
    model = lm.model
    layers = model.model.layers  # type: ignore[union-attr]
    fit, held = reconstruct.split(cal)
    assert held is not None
    batches = len(fit.batches) + len(held.batches)
    calls = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(
        lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in
        enumerate(layers)]
    try:
        rec = reconstruct.reconstruct(model, _down_projs(model, 3, 0.6), cal)
    finally:
        for h in handles:
            h.remove()
    # block 0 also gives the first inputs (the model stops there) and runs the checks
    assert calls[:3] == [3 * batches + 2, 2 * batches, 2 * batches], (calls, batches)
    assert all(f.choice.endswith(" stream") for f in rec.fits), [f.choice for f in rec.fits]
    gen = torch.Generator().manual_seed(1)
    o_proj = "model.layers.0.self_attn.o_proj"
    kept = torch.randperm(576, generator=gen)[:448].sort().values.numpy()
    both = [reconstruct.Consumer(o_proj, f"{o_proj}.weight", kept),
            *_down_projs(model, 1, 0.6)]
    calls[0] = 0
    handle = layers[0].register_forward_pre_hook(lambda _m, _a: calls.__setitem__(
        0, calls[0] + 1))
    try:
        rec = reconstruct.reconstruct(model, both, cal)
    finally:
        handle.remove()
    # the first inputs, one run to find the consumers' order, the check (two runs), then
    # the original block once per batch (not once per consumer) and the pruned block once
    # per consumer
    assert calls[0] == batches + 1 + 2 + batches + 2 * batches, (calls[0], batches)
    choices = {f.module: f.choice for f in rec.fits}
    assert choices[o_proj] == "plain" or choices[o_proj].endswith(" original"), choices
    assert choices[both[1].module].endswith(" stream"), choices


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
