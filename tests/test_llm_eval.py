"""Measuring a real decoder LLM: streamed evaluation, the kept original, greedy continuations
before and after, the ``evaluate`` command and GGUF checkpoints (issue 20, items 5-8).

SmolLM2-135M-Instruct (``smollm2`` fixture) is loaded once per module; the CLI paths that
prune run on the tiny random Llama folder of ``test_realdata``."""
from __future__ import annotations

import importlib
import json
import re
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from explorer import Pruner, evaluate
from explorer.app.cli import main
from explorer.io.data import DataOptions, load_data
from explorer.io.export import export
from explorer.io.specs import LoadedModel, SpecError, load_model
from explorer.io.specs._gguf import gguf_target
from explorer.quality.generate import GenerateError, continuations, greedy
from explorer.quality.original import Original, OriginalChanged

transformers = pytest.importorskip("transformers")
from test_realdata import CALIBRATION, HELDOUT, _llama  # noqa: E402 - needs transformers

PARIS = "The capital of France is"
evaluate_module = importlib.import_module("explorer.quality.evaluate")  # not the function


@pytest.fixture(scope="module")
def smol(smollm2: Path) -> LoadedModel:
    return load_model(f"hf:{smollm2}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Llama folder with its tokenizer, calibration.txt and heldout.txt."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "calibration.txt").write_text("\n".join(CALIBRATION) + "\n")
    (root / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    return _llama(root / "llama"), root / "calibration.txt", root / "heldout.txt"


# ----------------------------------------------------------------------------- evaluation


def _watch(model: torch.nn.Module, outputs: list[weakref.ref[torch.Tensor]]) -> Any:
    """Record a weak reference to each forward's logits; before each forward of the model,
    every logits tensor of an earlier forward must be gone."""
    def before(_m: Any, _args: Any) -> None:
        alive = [r for r in outputs[:-1] if r() is not None]
        assert not alive, f"{len(alive)} earlier output(s) still held"

    def after(_m: Any, _args: Any, out: Any) -> None:
        outputs.append(weakref.ref(out.logits))

    return model.register_forward_pre_hook(before), model.register_forward_hook(after)


def test_evaluation_streams_batches_and_keeps_no_logits(
        smol: LoadedModel, prose: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    held = load_data(prose[1], smol, DataOptions(num_samples=4, seq_len=12, batch_size=2))
    assert len(held.batches) == 2
    outputs: list[weakref.ref[torch.Tensor]] = []
    hooks = _watch(smol.model, outputs)
    try:
        whole = evaluate(smol.model, smol.model, held)
        # both models (the same one here): a first row alone (it sizes the rest), its batch's
        # second row, then the whole second batch
        assert len(outputs) == 2 * 3
        monkeypatch.setattr(evaluate_module, "OUTPUT_BUDGET", 1)  # a row per forward
        outputs.clear()
        rows = evaluate(smol.model, smol.model, held)
        assert len(outputs) == 2 * 4
    finally:
        for h in hooks:
            h.remove()
    assert whole.top1 == rows.top1 == 1.0 and whole.kl == pytest.approx(0.0, abs=1e-12)
    assert rows.perplexity_after == pytest.approx(whole.perplexity_after, rel=1e-9)
    # the perplexity is the model's own next-token loss on the real tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in held.batches:
            logits = smol.model(ids, attention_mask=mask).logits
            pairs = (mask[:, :-1] * mask[:, 1:]).bool()
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).double(), ids[:, 1:],
                                   reduction="none")
            nll, count = nll + float(loss[pairs].sum()), count + int(pairs.sum())
    assert whole.perplexity_before == pytest.approx(float(torch.tensor(nll / count).exp()),
                                                    rel=1e-6)
    assert 5 < whole.perplexity_before < 500  # real prose on a real model


def test_the_kept_original_shares_weights_and_refuses_writes_in_place(
        tiny: tuple[Path, Path, Path]) -> None:
    lm = load_model(f"hf:{tiny[0]}")
    ids = lm.example_inputs[0]
    with torch.no_grad():
        expected = lm.model(ids).logits
    keep = Original(lm.model)
    original = keep.get()
    shared = {n: p.data_ptr() for n, p in original.named_parameters()}
    assert shared == {n: p.data_ptr() for n, p in lm.model.named_parameters()}  # no copy
    Pruner(lm.model, lm.example_inputs, ratio=0.5, heads="keep").step()
    assert lm.model.model.layers[0].mlp.up_proj.weight.shape[0] < 64
    with torch.no_grad():
        assert torch.equal(keep.get()(ids).logits, expected)
        lm.model.model.rotary_emb.inv_freq.mul_(2)  # never cut: still shared
    with pytest.raises(OriginalChanged, match="'model.rotary_emb.inv_freq' of the original "
                                              "was written in place"):
        keep.get()
    copied = Original(lm.model, share=False)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.mul_(0.5)
    assert copied.get().model.embed_tokens.weight.data_ptr() != \
        lm.model.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------- generation


def test_dense_smollm2_knows_the_capital_of_france(smol: LoadedModel) -> None:
    state = torch.random.get_rng_state()
    text = greedy(smol.model, smol.tokenizer, PARIS, new_tokens=3)
    assert text.startswith(" Paris")
    assert torch.equal(torch.random.get_rng_state(), state)
    [c] = continuations(smol.model, smol.model, smol.tokenizer, [PARIS], new_tokens=3)
    assert c.before == c.after == text and c.to_dict()["prompt"] == PARIS
    with pytest.raises(GenerateError, match="has none; give a transformers folder"):
        greedy(smol.model, None, PARIS)
    with pytest.raises(GenerateError, match="needs a causal language model.*Linear"):
        continuations(torch.nn.Linear(2, 2), smol.model, smol.tokenizer, [PARIS])


def test_cli_evaluate_smollm2_json(smollm2: Path, prose: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--model", f"hf:{smollm2}", "--reference", f"hf:{smollm2}",
                 "--eval", str(prose[1]), "--num-samples", "2", "--seq-len", "12",
                 "--generate", PARIS, "--max-new-tokens", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["params"] == out["params_reference"] > 100_000_000
    q = out["quality"]
    assert q["metric"] == "perplexity" and q["samples"] == 2 and q["top1"] == 1.0
    assert q["kl"] == pytest.approx(0.0, abs=1e-12) and q["before"] == q["after"]
    [g] = out["generations"]
    assert g["prompt"] == PARIS and g["before"] == g["after"] and g["before"].startswith(" Paris")
    assert g["new_tokens"] == 3


def test_cli_prune_export_and_evaluate_show_the_continuations(
        tiny: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, calib, held = tiny
    common = ["--model", f"hf:{folder}", "--ratio", "0.5", "--heads", "keep", "--importance",
              "activation", "--calibration", str(calib), "--eval", str(held),
              "--generate", "the cat", "--generate", "we read", "--max-new-tokens", "4"]
    assert main(["prune", *common, "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert [g["prompt"] for g in pruned["generations"]] == ["the cat", "we read"]
    assert all(g["new_tokens"] == 4 and isinstance(g["after"], str)
               for g in pruned["generations"])
    assert main(["prune", *common]) == 0
    text = capsys.readouterr().out
    assert "'the cat'\n    before: " in text and "\n    after:  " in text
    out = tmp_path / "export"
    assert main(["export", *common, "--out", str(out), "--formats", "hf,report", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["generations"] == pruned["generations"]
    # export's text lists each layer's cut and the prune's notes as prune's does (it gave
    # neither: the default criterion and the refit's result were only in --json)
    assert main(["export", *common, "--out", str(tmp_path / "text"), "--formats", "hf",
                 "--compensate", "lstsq"]) == 0
    text = capsys.readouterr().out
    assert "\n  cut model.layers.0.mlp: channels " in text
    assert "\n  note: reconstruction (sequential least squares) " in text
    report = (out / "report.md").read_text()
    first = pruned["generations"][0]
    assert "Greedy continuations (no sampling, at most 4 new tokens each)" in report
    cells = [" ".join(t.split()) or "(nothing)" for t in (first["before"], first["after"])]
    assert f"| the cat | {cells[0]} | {cells[1]} |" in report
    assert "original continues" in (out / "report.html").read_text()
    # the hf export is a folder the evaluate command reads back, against the original
    assert main(["evaluate", "--model", f"hf:{out / 'hf'}", "--reference", f"hf:{folder}",
                 "--eval", str(held), "--generate", "the cat", "--max-new-tokens", "4",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["params"] == pruned["params_after"]
    assert again["quality"]["after"] == pytest.approx(pruned["quality"]["after"], rel=1e-6)
    assert again["generations"][0] == first


def test_cli_generate_and_evaluate_errors(tiny: tuple[Path, Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "hf:llama", "--generate", "hi"]) == 2
    assert "has none; give a transformers folder" in capsys.readouterr().err
    assert main(["prune", "--model", f"hf:{tiny[0]}", "--device", "meta", "--generate",
                 "hi"]) == 2
    assert "--generate measures quality, which needs weights" in capsys.readouterr().err
    assert main(["evaluate", "--model", f"hf:{tiny[0]}", "--reference", f"hf:{tiny[0]}"]) == 2
    assert "evaluate needs --eval FILE" in capsys.readouterr().err
    assert main(["evaluate", "--model", f"hf:{tiny[0]}", "--reference", "hf:bert",
                 "--eval", str(tiny[2])]) == 2
    assert "compare a pruned model with its original" in capsys.readouterr().err



def test_an_empty_prompt_or_held_out_text_too_short_to_score_is_one_line(
        tiny: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty --generate prompt (it used to end in 'unexpected RuntimeError: cannot reshape
    tensor of 0 elements', a bug line) and held-out text with no two tokens in a row (its
    quality silently fell back from perplexity to the output cosine) are refused before any
    work, in one line."""
    folder = f"hf:{tiny[0]}"
    for argv in (["prune", "--model", folder, "--ratio", "0.2", "--generate", ""],
                 ["evaluate", "--model", folder, "--reference", folder, "--generate", "hi",
                  "--generate", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the prompt '' gives no token with the model's "
                              "tokenizer, so there is nothing to continue") and \
            err.count("\n") == 1
    lm = load_model(folder)
    with pytest.raises(GenerateError, match="prompt '' gives no token"):
        greedy(lm.model, lm.tokenizer, "")
    short = tmp_path / "short.txt"
    short.write_text("cat\ndog\n")  # one word-level token a line
    for argv in (["prune", "--model", folder, "--ratio", "0.2", "--eval", str(short)],
                 ["evaluate", "--model", folder, "--reference", folder, "--eval", str(short)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(r"error: --eval '.*short.txt': no sample is two tokens or more, so "
                            r"perplexity has no next token to score; give held-out text of a "
                            r"sentence or more a line\n", err), err
    assert evaluate_module.scored_tokens(load_data(short, lm)) == 0
    assert evaluate_module.scored_tokens(load_data(tiny[2], lm)) > 0


# ----------------------------------------------------------------------------- GGUF


def test_gguf_spec_matches_the_converted_folder(smol: LoadedModel, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    from smollm2 import gguf_file

    path = gguf_file()
    assert path is not None
    capfd.readouterr()
    lm = load_model(f"hf:{path}")
    err = capfd.readouterr().err  # transformers' own tqdm bar was drawn here; a quiet load
    assert "de-quantizing" not in err and "%|" not in err, err
    assert lm.pretrained and lm.tokenizer is not None and "GGUF" in lm.notes[0]
    assert not hasattr(lm.hf_config, "quantization_config")
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # still tied
    assert torch.equal(lm.example_inputs[0], smol.example_inputs[0])
    with torch.no_grad():
        assert torch.equal(lm.model(*lm.example_inputs).logits,
                           smol.model(*smol.example_inputs).logits)
    # the folder form names the same file; the model prunes and exports plain safetensors
    assert gguf_target(str(path.parent), {"gguf_file": path.name}) == \
        gguf_target(str(path), {}) == (path.parent, path.name)
    Pruner(lm.model, lm.example_inputs, ratio=0.1, heads="keep", targets="mlp").step()
    out = export(lm.model, tmp_path / "out", ["hf"], tokenizer=lm.tokenizer)
    hf = Path(out.files["hf"][0])
    assert list(hf.glob("*.safetensors")) and not list(hf.glob("*.gguf"))
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded(*lm.example_inputs).logits,
                           lm.model(*lm.example_inputs).logits)


def test_gguf_spec_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="is not a GGUF file .*give a llama.cpp .gguf"):
        load_model(f"hf:{junk}")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(40)))
    with pytest.raises(SpecError, match="cannot read the GGUF file .*broken.gguf"):
        load_model(f"hf:{broken}")
    with pytest.raises(SpecError, match="GGUF file .*missing.gguf' does not exist"):
        load_model(f"hf:{tmp_path}?gguf_file=missing.gguf")
    with pytest.raises(SpecError, match="must name a file inside the folder"):
        load_model(f"hf:{tmp_path}?gguf_file=../junk.gguf")


def test_app_shows_the_continuations_beside_quality(tiny: tuple[Path, Path, Path]) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from explorer.app.session import Session

    lm = load_model(f"hf:{tiny[0]}")
    pe = Session(lm.model, lm.example_inputs, tokenizer=lm.tokenizer)
    [c] = pe.continuations(["the cat"], new_tokens=3)
    assert c.before == c.after and pe.continuations(["the cat"], new_tokens=3)[0] is c
    pe.accept(pe.proposals()[0])
    assert pe.continuations(["the cat"], new_tokens=3)[0].before == c.before  # the original
    with pytest.raises(GenerateError, match="has none"):
        Session(lm.model, lm.example_inputs).continuations(["the cat"])
    app = str(Path(__file__).resolve().parents[1] / "app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    at.text_input(key="model_path").set_value(str(tiny[0]))
    at.text_input(key="model_heldout").set_value(str(tiny[2]))
    at.button(key="model_load").click().run()
    at.text_area(key="model_prompts").set_value("the cat\nwe read").run()
    assert not at.exception and not at.error, (at.exception, at.error)
    [table] = [d.value for d in at.dataframe if "pruned continues" in d.value.columns]
    assert list(table["prompt"]) == ["the cat", "we read"]
    assert list(table.columns) == ["prompt", "original continues", "pruned continues"]


# ----------------------------------------------------------------------------- memory

# Peak RSS of `prune --compensate lstsq --eval` on SmolLM2 (16 calibration and 16 held-out
# samples of 128 tokens) in a process of its own: 2121 MB before the calibration passes
# stopped at the output layer and freed blocks left the process, 1832 MB after (one run
# each, docs/real-models.md "Memory"). Imports and the weights (file-backed) are 1.41 GB.
PEAK_RSS_MB = 1950

_PEAK = """
import json, sys
from explorer.app.cli import main
code = main(sys.argv[1:])
# VmHWM: this process image's own peak (ru_maxrss also counts the parent's RSS at the fork,
# which Linux carries over exec: a test run's parent is GBs)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"code": code, "peak_mb": hwm // 1024}))
"""


@pytest.mark.timeout(900)
def test_smollm2_prune_and_evaluation_peak_memory_is_bounded(
        smollm2: Path, prose: tuple[Path, Path], tmp_path: Path) -> None:
    """Calibration passes stop before the vocabulary logits, and freed blocks leave the
    process (`explorer.app.allocator`): a heap grown to every phase's high-water mark made
    the old peak ~2.1 GB at these settings."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])  # this checkout's explorer, not another
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, "prune", "--model", f"hf:{smollm2}", "--ratio", "0.2",
         "--importance", "activation", "--compensate", "lstsq", "--calibration",
         str(prose[0]), "--eval", str(prose[1]), "--num-samples", "16", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=880)
    assert run.returncode == 0, run.stderr[-2000:]
    *_, last = run.stdout.strip().splitlines()
    result = json.loads(last)
    summary = json.loads(run.stdout.strip().splitlines()[-2])
    assert result["code"] == 0 and summary["quality"]["samples"] == 16
    assert summary["quality"]["perplexity_after"] > summary["quality"]["perplexity_before"]
    assert result["peak_mb"] <= PEAK_RSS_MB, result
