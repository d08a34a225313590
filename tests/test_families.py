"""Decoder families x LLM features (issue 20: "checked from outside on held-out real decoders
of other families and sizes"): the default targets, the MLP refit, whole heads under GQA, the
large-model path on bfloat16 shards and evaluation, each on tiny random checkpoints of every
decoder family transformers builds from a config (2 layers, a word-level tokenizer).

The table in ``docs/real-models.md`` ("Decoder families") is this file's matrix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from explorer import Pruner, load_model
from explorer.app.cli import main
from explorer.coupling.vocab import Target
from explorer.io.data import DataOptions, load_data
from explorer.io.export import export, load_pruned
from explorer.io.plan import Plan
from explorer.io.specs import SpecError
from explorer.prune.calibration import Calibration
from explorer.prune.statement import statement

transformers = pytest.importorskip("transformers")
from test_realdata import CALIBRATION, HELDOUT, _save  # noqa: E402 - needs transformers

_GQA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_MHA = {k: v for k, v in _GQA.items() if k != "num_key_value_heads"}

# name -> (model_type, tiny config): every decoder family of the installed transformers that
# builds from a config alone (MoE and multimodal ones aside)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", _GQA),
    "qwen2": ("qwen2", _GQA),  # biases on q/k/v
    "qwen2_tied": ("qwen2", {**_GQA, "tie_word_embeddings": True}),
    "mistral": ("mistral", _GQA),
    "gemma": ("gemma", {**_GQA, "head_dim": 16}),  # tied, scaled embeddings; 8 x 16 != 64
    "gemma2": ("gemma2", {**_GQA, "head_dim": 16, "query_pre_attn_scalar": 16,
                          "sliding_window": 8}),
    "phi3": ("phi3", _GQA),  # fused qkv_proj and gate_up_proj
    "gpt2": ("gpt2", {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64,
                      "vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1,
                      "eos_token_id": 2}),  # Conv1D, fused c_attn
    "falcon": ("falcon", {**_MHA, "num_kv_heads": 2, "new_decoder_architecture": True}),
    "gpt_neox": ("gpt_neox", _MHA),  # fused query_key_value, parallel attention
    "starcoder2": ("starcoder2", _GQA),
    "olmo": ("olmo", _GQA),
    "olmo2": ("olmo2", _GQA),  # q_norm / k_norm over all heads
    "qwen3": ("qwen3", {**_GQA, "head_dim": 8}),  # q_norm / k_norm per head
    "stablelm": ("stablelm", _GQA),
    "phi": ("phi", _MHA),  # partial rotary, parallel attention
    "granite": ("granite", _GQA),
    "cohere": ("cohere", _GQA),
}
GQA = [n for n, (_, c) in FAMILIES.items() if c.get("num_key_value_heads", c.get("num_kv_heads"))]
# whole-head cuts a transformers config describes (measured): the rest keep a head width the
# config derives from hidden_size / heads (no head_dim field is read), so the export is
# safetensors + plan, which `load_pruned` rebuilds
WHOLE_HF = {"llama", "qwen2", "qwen2_tied", "mistral", "gemma", "gemma2", "phi3", "qwen3",
            "granite", "olmo", "olmo2", "cohere", "starcoder2"}
# bfloat16 shards through the large-model path: tied embeddings with q/k/v biases (a
# Qwen2.5-like checkpoint), fused projections, Conv1D, and a family whose activation scores
# tie closely in bf16
LARGE = ["qwen2_tied", "phi3", "gpt2", "olmo"]
RATIO = 0.3
_SUMMARY = re.compile(r"kept in (\d+)/(\d+) layers .* ([0-9.e-]+) -> ([0-9.e-]+)$")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("families")
    # the held-out split of the refit takes every 5th sample: 12 samples hold 2 out
    (path / "calibration.txt").write_text("\n".join(CALIBRATION * 2) + "\n")
    (path / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    return path


def _folder(root: Path, name: str, bf16: bool = False) -> Path:
    """The family's tiny checkpoint with its tokenizer (built once per module): float32 in
    one file, or bfloat16 in several shards as large checkpoints ship."""
    folder = root / (name + ("-bf16" if bf16 else ""))
    if not folder.is_dir():
        model_type, config = FAMILIES[name]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(model_type, **config)).eval()
        _save(model.to(torch.bfloat16) if bf16 else model, folder, "40KB" if bf16 else None)
    return folder


def _calibration(root: Path, lm: Any) -> Any:
    return load_data(root / "calibration.txt", lm, DataOptions(None, 128, 4))


def _ids() -> torch.Tensor:
    return torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))


def _attention(model: nn.Module) -> set[str]:
    """Parameter names under attention modules (their class names say so)."""
    return {f"{m}.{p}" if m else p for m, mod in model.named_modules()
            if "Attention" in type(mod).__name__ for p, _ in mod.named_parameters()}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _hidden_widths(model: nn.Module) -> set[int]:
    with torch.no_grad():
        out = model(_ids(), output_hidden_states=True)
    return {h.shape[-1] for h in out.hidden_states}


def _reloaded(model: nn.Module, out: Path, plan: Plan, tokenizer: Any) -> tuple[nn.Module, str]:
    """The export of ``model`` read back: from_pretrained where a config describes it, else
    safetensors + plan through `load_pruned`."""
    result = export(model, out, ["hf"], plan=plan, tokenizer=tokenizer)
    if "hf" in result.files:
        return transformers.AutoModelForCausalLM.from_pretrained(result.files["hf"][0]).eval(), \
            "hf"
    assert any("load with explorer.load_pruned" in m for m in result.messages), result.messages
    return load_pruned(None, out).eval(), "plan"


@pytest.mark.parametrize("name", FAMILIES)
def test_mlp_refit_keeps_residual_and_attention_and_reloads(root: Path, name: str) -> None:
    """(a) + (b): the default leaves the residual stream; ``heads="keep"`` with lstsq cuts
    only MLP units, refits without new biases, and the export reloads with equal logits."""
    lm = load_model(f"hf:{_folder(root, name)}")
    model = lm.model
    default = Pruner(model, lm.example_inputs, ratio=RATIO)
    assert default.targets_default and Target.RESIDUAL not in default.targets
    before, hidden = _shapes(model), _hidden_widths(model)
    attention = _attention(model)
    pruner = Pruner(model, lm.example_inputs, importance="activation", ratio=RATIO,
                    heads="keep", calibration=_calibration(root, lm), compensate="lstsq")
    report = pruner.step()
    after = _shapes(model)
    assert set(after) == set(before)  # no bias created on a bias-less layer, nothing lost
    changed = {n for n in after if after[n] != before[n]}
    assert changed and not changed & attention  # MLP units only: no attention tensor
    assert _hidden_widths(model) == hidden  # the residual stream keeps its width
    # the refit says where it was kept, with its numbers: layer by layer on held-out
    # calibration tokens (Linear layers and GPT-2's Conv1D), or one refit judged end to end
    notes = [n for n in report.notes if "reconstruction" in n or "compensation" in n]
    [summary] = notes
    found = _SUMMARY.search(summary)
    if found:  # kept only where the held-out error did not grow
        _kept, layers, plain, refit = found.groups()
        assert int(layers) == 2 and float(refit) <= float(plain)
    else:
        assert re.search(r"compensation 'lstsq' .*kept: .* without it, .* with it", summary)
    _check_reload(pruner, report, root, name, lm)


def _check_reload(pruner: Pruner, report: Any, root: Path, name: str, lm: Any) -> None:
    plan = Plan.from_pruner(pruner, f"hf:{_folder(root, name)}", reports=[report])
    loaded, how = _reloaded(lm.model, root / f"{name}-mlp", plan, lm.tokenizer)
    assert how == "hf"  # a uniform MLP cut is always a from_pretrained folder
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, lm.model(_ids()).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "query"])
@pytest.mark.parametrize("name", FAMILIES)
def test_whole_and_query_heads_cut_in_every_family(root: Path, name: str, mode: str) -> None:
    """Every family cuts heads: fewer query heads, the forward runs, what the statement said
    is what the step did (Phi3, whose forward reads the head count through the config all
    layers share, included: each attention module gets its own config copy)."""
    lm = load_model(f"hf:{_folder(root, name)}")
    pruner = Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.5, heads=mode,
                    targets="heads")
    said = statement(pruner)
    [loss] = [x for x in said.losses if x.target == "heads"]
    report = pruner.step()
    assert report.params_after == said.params_after and report.forward_ok
    assert not said.refused and not report.unsafe
    assert loss.heads is not None and loss.heads["query_after"] < loss.heads["query_before"]


@pytest.mark.parametrize("name", GQA)
def test_whole_heads_go_by_key_value_group(root: Path, name: str) -> None:
    """(c): whole heads under GQA remove whole key/value groups, the statement says the
    fraction removed and why it is not the ratio asked, and the export reloads."""
    lm = load_model(f"hf:{_folder(root, name)}")
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=RATIO,
                    heads="whole", targets="heads", calibration=_calibration(root, lm),
                    compensate="lstsq")
    said = statement(pruner)
    [loss] = [x for x in said.losses if x.target == "heads"]
    assert loss.heads is not None
    assert (loss.heads["kv_before"], loss.heads["kv_after"]) == (4, 2)  # 2 x 2 -> 1
    assert (loss.heads["query_before"], loss.heads["query_after"]) == (16, 8)
    assert loss.removed_fraction == pytest.approx(0.5)
    assert "removes 50.0%, not the 30% asked" in loss.note
    report = pruner.step()
    assert report.params_after < report.params_before and not report.unsafe
    plan = Plan.from_pruner(pruner, f"hf:{_folder(root, name)}", reports=[report])
    loaded, how = _reloaded(lm.model, root / f"{name}-heads", plan, lm.tokenizer)
    assert how == ("hf" if name in WHOLE_HF else "plan")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, lm.model(_ids()).logits,
                                   rtol=1e-4, atol=1e-5)


def test_refit_survives_heldout_batches_of_padding_only(root: Path) -> None:
    """A held-out calibration batch whose samples are all padding (a line the tokenizer
    maps to nothing) has no token to judge on: it is skipped, and when no held-out token is
    left the fit tokens judge (the summary says so) instead of the refit failing."""
    lm = load_model(f"hf:{_folder(root, 'llama')}")
    ids = torch.randint(3, 40, (10, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[4::5] = 0  # every 5th sample is held out: 4 and 9, padding only
    ids[mask == 0] = 0
    calib = Calibration([(ids[i:i + 1], mask[i:i + 1]) for i in range(10)], mask_index=1)
    report = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=RATIO,
                    heads="keep", calibration=calib, compensate="lstsq").step()
    [summary] = [n for n in report.notes if "reconstruction" in n]
    assert "on the calibration tokens (too few samples to hold some out)" in summary


def _removed(plan: Path) -> list[tuple[str, int, list[int]]]:
    steps = json.loads(plan.read_text())["steps"]
    return sorted((t["tensor"], t["dim"], t["removed"]) for s in steps for t in s["tensors"])


def _cli(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.mark.parametrize(("name", "compensate", "heads"),
                         [(n, "none", "keep") for n in LARGE]
                         + [("qwen2_tied", "lstsq", "keep"), ("qwen2_tied", "none", "dims"),
                            ("phi3", "none", "whole")])  # its own config copies, streamed
def test_large_path_on_bf16_shards_matches_in_memory(
        root: Path, name: str, compensate: str, heads: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """(d) + issue item 3: ``--heads keep --device meta --max-memory`` (the 1.5B report's
    command) then ``replay --checkpoint`` on bfloat16 shards (padded text calibration)
    removes what the in-memory prune removes, and the replayed folder computes what the
    in-memory pruned model computes; without a refit bit for bit, so greedy continuations
    agree token for token. Head dims (the default) cut the rotary frequencies too: the
    replayed folder keeps the cut ones (a plan + original config, as no config recomputes
    them), not the ones a config with the new head_dim would recompute."""
    shards = _folder(root, name, bf16=True)
    assert len(list(shards.glob("*.safetensors"))) > 1
    common = ["--model", f"hf:{shards}", "--importance", "activation", "--ratio", str(RATIO),
              "--calibration", str(root / "calibration.txt"), "--batch-size", "4",
              "--heads", heads, "--compensate", compensate, "--json"]
    _cli("prune", *common, "--device", "meta", "--max-memory", "60KB", "--offload-folder",
         str(tmp_path / "off"), "--plan", str(tmp_path / "meta.json"))
    _cli("prune", *common, "--plan", str(tmp_path / "memory.json"))
    assert _removed(tmp_path / "meta.json") == _removed(tmp_path / "memory.json")
    _cli("replay", "--checkpoint", str(shards), "--plan", str(tmp_path / "meta.json"),
         "--out", str(tmp_path / "pruned"), "--json")
    capsys.readouterr()
    lm = load_model(f"hf:{shards}")
    Pruner(lm.model, lm.example_inputs, importance="activation", ratio=RATIO, heads=heads,
           calibration=_calibration(root, lm),
           compensate=None if compensate == "none" else compensate).step()
    streamed = load_model(f"hf:{tmp_path / 'pruned'}").model
    assert next(streamed.parameters()).dtype == torch.bfloat16
    assert _shapes(streamed) == _shapes(lm.model)
    ours = dict(lm.model.named_buffers())
    for buffer, value in streamed.named_buffers():
        assert torch.equal(value, ours[buffer]), buffer  # rotary frequencies included
    with torch.no_grad():
        a, b = streamed(_ids()).logits.float(), lm.model(_ids()).logits.float()
    if compensate == "lstsq":  # the refit rounded to bf16 on both sides
        assert float((a - b).norm() / b.norm()) < 2e-2
        return
    assert torch.equal(a, b)
    prompt = _ids()[:1, :5]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(streamed.generate(prompt, **kwargs),
                           lm.model.generate(prompt, **kwargs))


def test_evaluate_and_generate_on_a_replayed_folder(root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """(e): ``evaluate`` and ``--generate`` read a streamed replay's folder (tied
    embeddings, bf16 shards) against its original."""
    shards = _folder(root, "qwen2_tied", bf16=True)
    _cli("prune", "--model", f"hf:{shards}", "--device", "meta", "--ratio", str(RATIO),
         "--heads", "keep", "--plan", str(tmp_path / "plan.json"), "--json")
    _cli("replay", "--checkpoint", str(shards), "--plan", str(tmp_path / "plan.json"),
         "--out", str(tmp_path / "pruned"), "--json")
    capsys.readouterr()
    _cli("evaluate", "--model", f"hf:{tmp_path / 'pruned'}", "--reference", f"hf:{shards}",
         "--eval", str(root / "heldout.txt"), "--generate", "the cat", "--max-new-tokens", "3",
         "--json")
    out = json.loads(capsys.readouterr().out)
    assert out["quality"]["metric"] == "perplexity"
    assert 0.0 <= out["quality"]["top1"] <= 1.0
    [gen] = out["generations"]
    assert gen["prompt"] == "the cat" and gen["before"] and gen["after"]


def test_gguf_of_an_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(16, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for spec in (f"hf:{path}", f"hf:{tmp_path}?gguf_file=odd.gguf"):
        with pytest.raises(SpecError, match=r"architecture rwkv6 is not supported .*"
                                            r"transformers reads GGUF files of .*llama.*; give "
                                            r"this model as a transformers folder instead") as e:
            load_model(spec)
        assert "\n" not in str(e.value)

