"""Layer-wise backward: sequential taylor / fisher equal the in-memory criteria."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import OFFLOAD_CAP
from transformers import AutoModelForCausalLM

import explorer
from explorer import load_model
from explorer.io.specs import ATTENTION, load_offloaded
from explorer.prune.calibration import Calibration, random_like
from explorer.prune.importance import Criterion, Fisher, Taylor, make
from explorer.prune.sequential import (
    SequentialError,
    decoder_layers,
    sequential_criterion,
)

CAP = {"cpu": OFFLOAD_CAP}  # the decoder layers go to disk


def _padded(num_batches: int = 3, loss: str = "auto") -> Calibration:
    """Token batches with a padding mask (the second sample's tail is padding)."""
    ids = torch.full((1, 16), 255, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return Calibration([(b[0], mask) for b in random_like((ids,), num_batches, 2)],
                       loss=loss, mask_index=1)


def _terms(crit: Criterion) -> dict[tuple[str, int], np.ndarray]:
    assert isinstance(crit, (Taylor, Fisher))
    return crit.per_sample


def _assert_same_terms(ours: Criterion, reference: Criterion) -> None:
    assert _terms(reference) and set(_terms(ours)) == set(_terms(reference))
    for key, ref in _terms(reference).items():
        got = _terms(ours)[key]
        assert got.shape == ref.shape and np.abs(ref).max() > 0, key
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max(),
                                   err_msg=str(key))


@pytest.mark.parametrize("name", ["taylor", "fisher"])
def test_offloaded_gradient_scores_equal_in_memory(ckpt: Path, tmp_path: Path,
                                                   name: str) -> None:
    calib = _padded()
    # the attention kernel the library builds models with (`load_model`, `load_offloaded`)
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_cache=False,
                                                 attn_implementation=ATTENTION).eval()
    lm = load_model(f"hf:{ckpt}/config.json", device="meta")
    mg = explorer.trace(lm.model, lm.example_inputs)
    reference = make(name)
    reference.prepare(model, mg.coupling, calib)

    off = load_offloaded(ckpt, max_memory=CAP, offload_folder=tmp_path / "offload")
    assert any(m.startswith("model.layers") for m in off.offloaded), off.device_map
    off.model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in off.model.named_parameters()}
    crit = sequential_criterion(off.model, calib, name,
                                activations_folder=tmp_path / "activations")
    assert {n: p.requires_grad for n, p in off.model.named_parameters()} == flags
    assert not any(m.training for m in off.model.modules())
    assert all(p.grad is None for p in off.model.parameters())
    _assert_same_terms(crit, reference)
    assert ("lm_head.weight", 1) in _terms(crit)
    assert ("model.layers.2.mlp.down_proj.weight", 1) in _terms(crit)
    prunable = [g for g in mg.groups() if g.prunable]
    assert prunable
    for g in prunable:
        for ours, theirs in zip(crit.scores(off.model, mg.coupling, g),
                                reference.scores(model, mg.coupling, g), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9 * theirs.max())
    _name, layers = decoder_layers(off.model)
    assert all(p.device.type == "meta" for p in layers.parameters())  # offloaded again
    assert not any((tmp_path / "activations").rglob("*"))  # kept activations removed


# weights and buffers, modes, requires_grad flags, gradients, decoder layers
State = tuple[dict[str, torch.Tensor], list[bool], dict[str, bool],
              dict[str, "torch.Tensor | None"], list[torch.nn.Module]]


def _state(model: torch.nn.Module) -> State:
    _p, layers = decoder_layers(model)
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            list(layers))


def _assert_unchanged(model: torch.nn.Module, before: State) -> None:
    state, modes, flags, grads, layers = before
    after = _state(model)
    assert after[0].keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[0][k], v), k
    assert after[1] == modes and after[2] == flags
    for n, g in grads.items():
        now = after[3][n]
        assert (now is None) == (g is None) and (now is None or g is None or torch.equal(now, g))
    assert all(a is b for a, b in zip(after[4], layers, strict=True))


def test_model_unchanged_after_success_and_failure(ckpt: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_cache=False)
    model.train()  # calibration runs in eval mode; the modes come back
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    before = _state(model)
    crit = sequential_criterion(model, _padded(2), "fisher")
    assert _terms(crit)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="the 'ce' loss needs labels"):  # fails at the head
        sequential_criterion(model, _padded(2, loss="ce"), "taylor")
    _assert_unchanged(model, before)


def _opt_with_projections() -> torch.nn.Module:
    """OPT with word_embed_proj_dim != hidden: weighted layers before and after the stack."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=256, hidden_size=32, word_embed_proj_dim=16,
                                 num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=64, use_cache=False)
    return transformers.OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize(("family", "loss"), [("qwen2", "auto"), ("opt", "output-probe")])
def test_other_decoder_families(family: str, loss: str) -> None:
    """Qwen2 (biased q/k/v); OPT with projections around the stack, on the seeded
    output-probe loss (a fresh direction per batch)."""
    if family == "opt":
        model = _opt_with_projections()
    else:
        torch.manual_seed(0)
        model = load_model(f"hf:{family}?num_hidden_layers=2").model.eval()
        model.config.use_cache = False
    calib = _padded(2, loss=loss)
    for name in ("taylor", "fisher"):
        reference = make(name)
        reference.prepare(model, None, calib)  # type: ignore[arg-type]  # unused by the terms
        crit = sequential_criterion(model, calib, name)
        _assert_same_terms(crit, reference)
    if family == "opt":  # the projections before and after the decoder stack are scored
        assert {("model.decoder.project_in.weight", 1), ("model.decoder.project_out.weight", 1)} \
            <= set(_terms(crit))


def test_gradient_errors(ckpt: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_cache=False)
    _p, layers = decoder_layers(model)
    layers[1].mlp = layers[0].mlp  # one module in two layers
    with pytest.raises(SequentialError, match=r"decoder layers 0 and 1 share a module"):
        sequential_criterion(model, _padded(1), "taylor")
