"""What a prune reads when the user did not say (`explorer.io.defaults`): a language model
with a tokenizer is scored by ``activation`` on calibration text (built-in prose when no file
is given, kept apart from the evaluation text); everything the user names is kept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from explorer import load_model
from explorer.app.cli import main
from explorer.app.sources import LoadRequest, load_request
from explorer.io import defaults
from explorer.io.data import (
    BUILTIN_SAMPLES,
    BUILTIN_TEXT,
    DataError,
    DataOptions,
    builtin_texts,
    check_apart,
    load_data,
)
from explorer.io.specs import LoadedModel


@pytest.fixture(scope="module")
def smol2(smollm2: Path) -> LoadedModel:
    """SmolLM2's real weights and tokenizer, two layers."""
    return load_model(f"hf:{smollm2}?num_hidden_layers=2")


def test_builtin_text_is_real_prose_in_a_fixed_order_apart_from_held_out_text(
        prose: tuple[Path, Path]) -> None:
    every = builtin_texts()
    assert len(every) > 400 and every == builtin_texts()  # the same order every time
    assert all(len(t) >= 200 and "\n" not in t for t in every)
    assert len(set(every)) == len(every)
    held = prose[1].read_text().splitlines()  # held-out topics of the same manual
    apart = builtin_texts(held)
    assert 0 < len(apart) < len(every)
    assert not set(apart) & set(held)
    # a held-out text re-wrapped (other line breaks, one sentence of a paragraph) still
    # keeps its paragraph out: runs of words are compared, not lines
    words = every[0].split()
    sentence = " ".join(words[3:20])
    assert every[0] not in builtin_texts([sentence])
    assert every[1] in builtin_texts([sentence])
    with pytest.raises(DataError, match="every paragraph of builtin:python-manual is in the "
                                        "evaluation data"):
        builtin_texts(every)
    check_apart(BUILTIN_TEXT, prose[1])  # the built-in text keeps itself apart


def test_defaults_choose_activation_and_builtin_text_for_a_language_model(
        smol2: LoadedModel) -> None:
    d = defaults.choose(smol2, None, None)
    assert (d.importance, d.calibration) == ("activation", BUILTIN_TEXT)
    assert d.note is not None and "importance 'activation'" in d.note \
        and f"{BUILTIN_SAMPLES} paragraphs" in d.note
    # what the user names is kept
    assert defaults.choose(smol2, "magnitude", None, heads="dims") == \
        defaults.Defaults("magnitude", None)
    named = defaults.choose(smol2, "taylor", "mine.txt", heads="whole")
    assert (named.importance, named.calibration, named.note, named.heads) == \
        ("taylor", "mine.txt", None, "whole")
    given = defaults.choose(smol2, None, "mine.txt", 8)
    assert (given.importance, given.calibration) == ("activation", "mine.txt")
    assert given.note is not None and "paragraphs" not in given.note
    # no weights to run: nothing data-aware is chosen
    assert defaults.choose(smol2, None, None, weights=False).importance == "magnitude"
    # the built-in text, tokenized by the model's tokenizer, kept apart from held-out text
    calib = load_data(BUILTIN_TEXT, smol2, DataOptions(num_samples=3, seq_len=16))
    assert sum(b[0].shape[0] for b in calib.batches) == 3


def test_defaults_leave_models_without_text_to_magnitude() -> None:
    vision = load_model("demo:dino_vit_safe")
    assert defaults.choose(vision, None, None) == defaults.Defaults("magnitude", None)
    tiny_lm = load_model("hf:llama")  # a causal LM without a tokenizer: no text to read
    assert defaults.choose(tiny_lm, None, None) == defaults.Defaults("magnitude", None)
    with pytest.raises(DataError, match="builtin:python-manual is text, but 'hf:llama' has "
                                        "no tokenizer"):
        load_data(BUILTIN_TEXT, tiny_lm)


def test_cli_default_on_a_real_decoder_is_data_aware_and_keeps_it_usable(
        smollm2: Path, prose: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2 (two of its layers, real weights), 40 % of the MLP: the default (activation on
    the built-in text) against magnitude, on held-out text the built-in text stays apart from,
    measured against the two-layer model (the whole model is the README's table: 20 % MLP,
    magnitude 184,554, activation 34.89, dense 29.12)."""
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    common = ["prune", "--model", spec, "--ratio", "0.4", "--targets", "mlp", "--eval",
              str(prose[1]), "--num-samples", "8", "--seq-len", "64", "--json"]
    ppl, kl = {}, {}
    for name, extra in (("default", []), ("magnitude", ["--importance", "magnitude"])):
        assert main(common + extra) == 0
        out = json.loads(capsys.readouterr().out)
        ppl[name] = out["quality"]["after"] / out["quality"]["before"]
        kl[name] = out["quality"]["kl"]
        if name == "default":
            assert any("importance 'activation' (the default for a language model" in n
                       and "8 paragraphs of Python's reference manual" in n
                       for n in out["notes"])
        else:
            assert not any("importance 'activation' (the default" in n for n in out["notes"])
    # measured: perplexity x1.85 vs x6.4 of the two-layer model's; KL to it likewise
    assert ppl["default"] * 2 < ppl["magnitude"] and kl["default"] * 1.5 < kl["magnitude"]


def test_the_app_starts_a_language_model_on_activation_and_the_builtin_text(
        smollm2: Path, prose: tuple[Path, Path]) -> None:
    """The Model page's loader (`load_request`) picks what the CLI picks, keeps the built-in
    text apart from the held-out file, and leaves a named calibration file and other models
    alone."""
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    said: list[str] = []
    loaded = load_request(LoadRequest(spec, heldout=str(prose[1]), num_samples=4, seq_len=16),
                          progress=said.append)
    assert loaded.importance == "activation" and loaded.calibration is not None
    assert sum(b[0].shape[0] for b in loaded.calibration.batches) == 4
    assert loaded.note is not None and "4 paragraphs of Python's reference manual" in loaded.note
    assert any("built-in calibration text" in line for line in said)
    own = load_request(LoadRequest(spec, calibration=str(prose[0]), num_samples=2, seq_len=16))
    assert own.importance == "activation" and own.note is not None \
        and "reference manual" not in own.note
    assert loaded.heads == own.heads == "keep" and "heads 'keep'" in own.note
    demo = load_request(LoadRequest("demo:dino_vit_safe"))
    assert (demo.importance, demo.calibration, demo.note, demo.heads) == \
        ("magnitude", None, None, "dims")


def test_a_language_model_with_real_weights_keeps_its_attention_by_default(
        smol2: LoadedModel) -> None:
    """Measured on the whole SmolLM2 at ratio 0.2 (docs/real-models.md): the MLP alone
    32.0 held-out perplexity, MLP + 20 % of every head's dims 178.4 (dense 27.0)."""
    d = defaults.choose(smol2, None, None)
    assert d.heads == "keep" and d.note is not None
    assert "heads 'keep' (the default for a language model with real weights" in d.note
    assert "--heads dims, whole or query to cut attention" in d.note
    # attention asked for by the targets, or a head mode named: never replaced
    for targets in ("heads", "mlp,residual"):
        assert defaults.choose(smol2, None, None, targets=targets).heads == "dims"
    assert defaults.choose(smol2, None, None, targets="mlp").heads == "keep"
    named = defaults.choose(smol2, None, None, heads="query")
    assert named.heads == "query" and "heads 'keep'" not in (named.note or "")
    # random weights (structure only) and other models: the same dims in every head
    assert defaults.choose(load_model("hf:llama"), None, None).heads == "dims"
    assert defaults.choose(load_model("demo:dino_vit_safe"), None, None).heads == "dims"


def test_cli_prune_of_a_real_decoder_leaves_attention_unless_asked(
        smollm2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    common = ["prune", "--model", spec, "--ratio", "0.2", "--importance", "random", "--json"]
    assert main(common) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention"] and all(c["before"] == c["after"] for c in out["attention"])
    changed = {c["axis"] for s in out["steps"] for c in s["changes"]}
    assert changed == {"channels"}  # MLP units only
    assert any("heads 'keep' (the default" in n for n in out["notes"])
    heads = next(t for t in out["targets"]["losses"] if t["target"] == "heads")
    assert heads["reading"].startswith("kept: heads 'keep'")
    assert main([*common, "--heads", "dims"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "head-dim" in {c["axis"] for s in out["steps"] for c in s["changes"]}
    assert not any("heads 'keep' (the default" in n for n in out["notes"])
