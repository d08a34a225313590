"""A run's notes say each fact once (`prune.records.said_once`): the CLI's prune and export,
the exported README and the app's Export page. Seen on a per-layer cut exported ``hf``: the
one reason no transformers config describes the model was said four times (the step's config
note, the global allocation's note, the export's "no transformers folder" and its
config.json line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from explorer.app.cli import main
from explorer.prune.records import said_once

# four layers whose MLP widths the global allocation makes differ (intermediate_size)
QWEN2 = ("hf:qwen2?hidden_size=64&num_hidden_layers=4&num_attention_heads=8"
         "&num_key_value_heads=2&intermediate_size=128&vocab_size=64")
REASON = "intermediate_size differs between layers"
GLOBAL = ["--model", QWEN2, "--allocation", "global", "--ratio", "0.3"]


def test_said_once_drops_repeats_and_notes_another_says_whole() -> None:
    assert said_once(["a: b", "", "c", "a: b", "x a: b y", "c"]) == ["c", "x a: b y"]
    assert said_once([]) == []


def test_export_says_why_no_hf_folder_once(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    assert main(["export", *GLOBAL, "--formats", "hf", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    notes = [line for line in text.splitlines() if line.startswith("  note: ")]
    assert sum(REASON in n for n in notes) == 1, notes
    (said,) = [n for n in notes if REASON in n]
    assert said.startswith("  note: hf: no transformers folder: the transformers config "
                           "cannot describe the pruned model: intermediate_size differs")
    assert "Wrote model.safetensors + plan.json instead, with config.json" in said
    assert any(n.startswith("  note: global allocation: ") for n in notes)  # still said
    readme = (tmp_path / "out" / "README.md").read_text()
    assert readme.count(REASON) == 1 and "plan.json holds every cut per layer" in readme
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.safetensors", "plan.json",
                                                              "config.json"}


def test_export_json_keeps_messages_and_notes_apart_without_repeats(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["export", *GLOBAL, "--formats", "hf", "--out", str(tmp_path / "out"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    said = [n for n in [*out["messages"], *out["notes"]] if REASON in n]
    assert len(said) == 1 and said[0].startswith("hf: no transformers folder: "), said
    assert out["config"]["ok"] is False and REASON in out["config"]["reason"]


def test_prune_says_the_config_note_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", *GLOBAL, "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    said = [n for n in notes if "cannot describe" in n]
    assert said == [n for n in notes if n.startswith("the transformers config cannot "
                                                      "describe the pruned model: " + REASON)]
    assert len(said) == 1, notes
