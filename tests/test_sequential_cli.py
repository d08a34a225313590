"""The large-model path end to end on the CLI: a plan made on a ``meta`` copy with importance
computed layer by layer from the checkpoint (``prune --max-memory``) equals the plan made with
the model in memory, and ``replay --checkpoint`` applies it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OFFLOAD_CAP

import explorer
from explorer import load_model
from explorer.app.cli import main
from explorer.graph.metrics import count_params
from explorer.io.specs import load_offloaded

CAP = OFFLOAD_CAP  # the decoder layers go to disk


@pytest.fixture(scope="module", autouse=True)
def _calibration(ckpt: Path) -> None:
    torch.save(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1)),
               ckpt.parent / "calib.pt")


def _removed(plan: Path) -> list[tuple[str, int, list[int]]]:
    steps = json.loads(plan.read_text())["steps"]
    return sorted((t["tensor"], t["dim"], t["removed"]) for s in steps for t in s["tensors"])


def _prune(ckpt: Path, plan: Path, *extra: str) -> int:
    return main(["prune", "--model", f"hf:{ckpt}", "--ratio", "0.3", "--heads", "whole",
                 "--targets", "all",
                 "--calibration", str(ckpt.parent / "calib.pt"), "--batch-size", "2",
                 "--plan", str(plan), "--json", *extra])


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_meta_plan_with_layerwise_scores_equals_in_memory_plan(
        ckpt: Path, tmp_path: Path, importance: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _prune(ckpt, tmp_path / "memory.json", "--importance", importance) == 0
    assert _prune(ckpt, tmp_path / "meta.json", "--importance", importance, "--device", "meta",
                  "--max-memory", CAP, "--offload-folder", str(tmp_path / "off")) == 0
    capsys.readouterr()
    memory, meta = _removed(tmp_path / "memory.json"), _removed(tmp_path / "meta.json")
    assert memory and meta == memory
    assert not any((tmp_path / "off" / "activations").glob("*"))  # kept states are consumed
    # the cap really sends weights to disk (read back from the checkpoint's own files)
    assert load_offloaded(ckpt, max_memory={"cpu": CAP},
                          offload_folder=tmp_path / "off2").offloaded

    out = tmp_path / "pruned"
    assert main(["replay", "--checkpoint", str(ckpt), "--plan", str(tmp_path / "meta.json"),
                 "--out", str(out), "--json"]) == 0
    streamed = explorer.load_pruned(f"hf:{ckpt}", out)
    reference = load_model(f"hf:{ckpt}").model
    before = count_params(reference)
    explorer.Plan.load(tmp_path / "meta.json").apply(reference)  # the same plan, in memory
    assert count_params(streamed) == count_params(reference) < before
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--importance", "activation", "--max-memory", CAP], "use it with --device meta"),
    (["--importance", "magnitude", "--device", "meta", "--max-memory", CAP],
     "has no layer-by-layer form"),
    (["--importance", "activation", "--device", "meta", "--max-memory", CAP, "--steps", "2"],
     "--steps 1"),
])
def test_max_memory_errors_are_one_line(ckpt: Path, tmp_path: Path, extra: list[str],
                                        message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _prune(ckpt, tmp_path / "plan.json", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not (tmp_path / "plan.json").exists()


def test_max_memory_refuses_a_spec_without_weights(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "hf:llama", "--device", "meta", "--importance",
                 "activation", "--max-memory", CAP, "--plan", str(tmp_path / "p.json")]) == 2
    assert "needs an hf:FOLDER model with safetensors weights" in capsys.readouterr().err
