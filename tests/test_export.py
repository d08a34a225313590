"""Export formats reload in a fresh process with equal outputs; safetensors needs no pickle."""
from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from explorer import Pruner, load_model
from explorer.io.export import ExportError, ExportResult, export, load_pruned, parse_formats
from explorer.io.plan import Plan
from explorer.prune.fixups.hfconfig import update_config

ROOT = Path(__file__).resolve().parents[1]


def _pruned(spec: str, **kw: object) -> tuple[nn.Module, tuple, Plan]:
    lm = load_model(spec)
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, **kw, targets="all")
    reports = [pruner.step() for _ in range(pruner.steps)]
    return lm.model, lm.example_inputs, Plan.from_pruner(pruner, spec, reports=reports)


def _output(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return getattr(out, "logits", out)


@dataclass
class Exported:
    folder: Path
    inputs: tuple
    expected: torch.Tensor
    loaders: list[str]  # expressions building the model from ``folder`` in a fresh process
    model: nn.Module
    result: ExportResult


_HF = "AutoModelForCausalLM.from_pretrained(folder + '/hf', attn_implementation='eager').eval()"
_PT = "torch.load(folder + '/model.pt', weights_only=False).eval()"
_ST = "load_pruned(None, folder)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """demo:resnet (pt, safetensors, report), demo:llama and hf:qwen2 (pt, safetensors, hf)."""
    out = {}
    for spec, formats, loaders, kw in (
            ("demo:resnet", "pt,safetensors,hf,report", [_PT, _ST], {}),
            ("demo:llama", "pt,safetensors,hf", [_HF, _PT, _ST], {"heads": "whole"}),
            ("hf:qwen2", "hf", [_HF], {"heads": "whole"})):
        folder = tmp_path_factory.mktemp(spec.replace(":", "_"))
        model, inputs, plan = _pruned(spec, **kw)
        res = export(model, folder, formats, plan=plan)
        out[spec] = Exported(folder, inputs, _output(model, inputs), loaders, model, res)
    return out


def test_formats_reload_in_fresh_process(exported: dict[str, Exported]) -> None:
    """One interpreter, started fresh, loads every folder; outputs equal to 1e-6."""
    lines = ["import torch", "from safetensors.torch import load_file",
             "from transformers import AutoModelForCausalLM",
             "from explorer import load_pruned"]
    for e in exported.values():
        save_file({"x": e.inputs[0].contiguous(), "y": e.expected.contiguous()},
                  str(e.folder / "check.safetensors"))
        lines += [f"folder = {str(e.folder)!r}",
                  "t = load_file(folder + '/check.safetensors')"]
        for expr in e.loaders:
            lines += [f"m = {expr}", "with torch.no_grad():", "    out = m(t['x'])",
                      "out = getattr(out, 'logits', out)",
                      "diff = (out - t['y']).abs().max().item()",
                      f"assert out.shape == t['y'].shape and diff <= 1e-6, ({expr!r}, diff)",
                      f"print('ok', folder, {expr!r})"]
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == sum(len(e.loaders) for e in exported.values())


def test_resnet_export_files(exported: dict[str, Exported]) -> None:
    e = exported["demo:resnet"]
    assert set(e.result.files) == {"pt", "safetensors", "report"}
    assert any("not a transformers model" in m for m in e.result.messages)
    readme = (e.folder / "README.md").read_text()
    assert "pickle" in readme and "load only files you trust" in readme
    md = (e.folder / "report.md").read_text()
    for section in ("parameters", "CPU latency (median)", "## Plan", "## Layers",
                    "| conv1 | 16x3x3x3 | 8x3x3x3 |"):
        assert section in md
    page = (e.folder / "report.html").read_text()
    assert "<table>" in page and "Plotly.newPlot" in page
    assert "<script src=\"http" not in page and "<script src='http" not in page


@pytest.mark.parametrize("spec", ["demo:llama", "hf:qwen2"])
def test_transformers_config_patched(exported: dict[str, Exported], spec: str) -> None:
    e = exported[spec]
    assert e.result.config is not None and e.result.config.ok, e.result.messages
    assert "hf" in e.result.files
    cfg = e.model.config  # GQA 8 heads / 2 kv heads, whole kv groups pruned at 0.5
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size,
            cfg.intermediate_size) == (4, 1, 32, 64)


def test_safetensors_reload_reads_no_pickle(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs, plan = _pruned("demo:mlp")
    export(model, tmp_path, "safetensors", plan=plan)

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("pickle was used")

    class NoUnpickler:
        def __init__(self, *_a: object, **_k: object) -> None:
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = load_pruned("demo:mlp", tmp_path)
    assert torch.equal(_output(again, inputs), _output(model, inputs))


def test_head_dim_pruning_falls_back_to_safetensors(tmp_path: Path) -> None:
    model, _inputs, plan = _pruned("demo:llama", heads="dims")
    res = export(model, tmp_path, "hf", plan=plan)
    assert "hf" not in res.files and "safetensors" in res.files
    assert any("scaling" in m and "prune whole heads" in m for m in res.messages), res.messages
    assert any("load_pruned" in m for m in res.messages)
    again = load_pruned(None, tmp_path)
    assert torch.equal(_output(again, _inputs), _output(model, _inputs))


def test_residual_cut_exports_a_transformers_folder(tmp_path: Path) -> None:
    """A Llama residual cut to 44 (round_to 4, 4 heads left): the config follows, so do the
    decoder layers' descriptive ``hidden_size`` attributes (no forward reads them), and
    ``from_pretrained`` rebuilds the model with equal logits."""
    from transformers import AutoModelForCausalLM

    model, inputs, plan = _pruned("hf:llama?num_hidden_layers=2", heads="whole", round_to=4)
    assert model.config.hidden_size == 32 and model.model.layers[0].hidden_size == 32
    res = export(model, tmp_path, "hf", plan=plan)
    assert res.config is not None and res.config.ok, res.messages
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_output(again, inputs), _output(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["lstsq", "bias"])
def test_refit_weights_of_a_bias_less_llama_reload_exactly(tmp_path: Path, mode: str) -> None:
    """Llama's down projections have no bias. ``lstsq`` refits them without one (a config
    still describes the model: the transformers folder reloads); ``bias`` creates one, which
    the plan's fingerprint leaves out (the original had none) and `load_pruned` restores."""
    from transformers import AutoModelForCausalLM

    from explorer.prune.calibration import Calibration

    spec = "hf:llama?num_hidden_layers=2"
    lm = load_model(spec)
    gen = torch.Generator().manual_seed(0)
    calib = Calibration([(torch.randint(0, 100, (4, 16), generator=gen),) for _ in range(3)])
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.2,
                    targets="mlp", calibration=calib, compensate=mode)
    plan = Plan.from_pruner(pruner, spec, reports=[pruner.step()])
    down = lm.model.model.layers[0].mlp.down_proj
    assert (down.bias is None) == (mode == "lstsq")
    changed = [n for n, p in lm.model.named_parameters()
               if n.endswith("down_proj.weight") and not torch.equal(
                   p, before[n][:, :p.shape[1]])]
    assert changed, "nothing was refit"
    assert not any(name.endswith(".bias") for name, _shape in plan.fingerprint.tensors)
    res = export(lm.model, tmp_path, "safetensors,hf", plan=plan)
    expected = _output(lm.model, lm.example_inputs)
    again = load_pruned(spec, tmp_path)
    assert torch.equal(_output(again, lm.example_inputs), expected)
    if mode == "lstsq":
        assert "hf" in res.files, res.messages
        folder = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(_output(folder, lm.example_inputs), expected,
                                   rtol=0, atol=1e-6)
    else:
        assert "hf" not in res.files and any("bias" in m for m in res.messages), res.messages


def test_config_transformers_refuses_falls_back_with_the_reason(tmp_path: Path) -> None:
    lm = load_model("hf:llama?num_hidden_layers=2")
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="whole", targets="all")
    plan = Plan.from_pruner(pruner, lm.spec, reports=[pruner.step()])
    res = export(lm.model, tmp_path, "hf", plan=plan)  # hidden 45 with 4 heads: refused
    assert "hf" not in res.files and "safetensors" in res.files
    assert any("not a multiple of the number of attention heads" in m and "round" in m
               for m in res.messages), res.messages
    assert lm.model.config.hidden_size == 64  # an invalid config is never written
    again = load_pruned(None, tmp_path)
    assert torch.equal(_output(again, lm.example_inputs), _output(lm.model, lm.example_inputs))


def test_non_uniform_widths_leave_config(tmp_path: Path) -> None:
    lm = load_model("demo:llama")
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.0,
                    ratios={"model.layers.0.mlp": 0.5}, targets="all")
    pruner.step()
    update = update_config(lm.model)
    assert not update.ok and not update.changed
    assert "intermediate_size differs between layers (64 in model.layers.0.mlp; 128 in " \
           "model.layers.1.mlp)" in update.reason
    assert lm.model.config.intermediate_size == 128


def test_export_errors(tmp_path: Path) -> None:
    model, _inputs, plan = _pruned("demo:mlp")
    with pytest.raises(ExportError, match=r"unknown export format\(s\) \['onnx'\]"):
        parse_formats("pt,onnx")
    with pytest.raises(ExportError, match=r"safetensors format needs the plan"):
        export(model, tmp_path, "safetensors")
    with pytest.raises(ExportError, match=r"model.safetensors' does not exist"):
        plan.save(tmp_path / "plan.json")
        load_pruned(None, tmp_path)


def test_fold_check_ignores_dropout_and_keeps_train_mode(tmp_path: Path) -> None:
    """Folding a derived constant (OPT's attention scaling after a head-dim cut) is checked
    with eval forwards: a model left in train mode (dropout on) still exports a folder, and
    comes back in train mode."""
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        vocab_size=256, max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.5)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    x = torch.randint(0, 256, (2, 12))
    pruner = Pruner(model, (x,), ratio=0.5, heads="dims", targets="all")
    plan = Plan.from_pruner(pruner, "opt", reports=[pruner.step()])
    model.train()
    res = export(model, tmp_path, "hf", plan=plan, example_inputs=(x,))
    assert "hf" in res.files, res.messages
    assert all(m.training for m in model.modules())
