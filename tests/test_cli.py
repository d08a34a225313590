"""CLI: JSON keys of trace/prune, plans from prune, replay and export, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from explorer.app.cli import main
from explorer.io.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else {}), err


def test_trace_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "trace", "--model", "demo:mlp", "--json")
    assert code == 0
    assert {"seconds", "num_ops", "num_groups", "groups"} <= set(out)
    assert out["num_groups"] == len(out["groups"]) > 0
    for g in out["groups"]:
        assert {"id", "channels", "members", "heads", "prunable", "reason"} <= set(g)


def test_prune_json_and_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "prune", "--model", "demo:mlp", "--device", "meta",
                        "--ratio", "0.5", "--json", "--plan", str(plan))
    assert code == 0
    assert {"params_before", "params_after", "macs_before", "macs_after", "groups_total",
            "groups_pruned", "forward_ok", "output_shape_ok", "unsafe"} <= set(out)
    assert out["params_after"] < out["params_before"] and out["forward_ok"]
    loaded = Plan.load(plan)
    assert loaded.model == "demo:mlp" and loaded.steps and loaded.steps[0].tensors


def test_replay_meta_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert main(["prune", "--model", "demo:mlp", "--device", "meta", "--plan",
                 str(plan), "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    code, out, _ = _run(capsys, "replay", "--model", "demo:mlp", "--plan", str(plan),
                        "--out", str(tmp_path / "out"), "--json")
    assert code == 0 and out["forward_ok"]
    assert out["params_after"] == pruned["params_after"]
    assert {"pt", "safetensors"} == set(out["files"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "plan.json").is_file()


def test_export(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "export", "--model", "demo:mlp", "--ratio", "0.25",
                        "--out", str(tmp_path), "--formats", "safetensors,report", "--json")
    assert code == 0
    assert {"params_before", "params_after", "files", "messages"} <= set(out)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "plan.json").is_file()
    assert not (tmp_path / "model.pt").exists()


def _factory(tmp_path: Path) -> str:
    path = tmp_path / "broken.py"
    path.write_text("def make():\n    raise RuntimeError('no such layer')\n")
    return f"{path}:make"


@pytest.mark.parametrize("argv,match", [
    (["trace", "--model", "demo:nope"], "unknown demo 'nope'"),
    (["trace", "--model", "timm:resnet18", "--input-shape", "1,three"], "input shape"),
    (["trace", "--model", "FACTORY"], "raised RuntimeError: no such layer"),
    (["replay", "--model", "demo:mlp", "--plan", "MISSING", "--out", "OUT"],
     "cannot read plan file"),
    (["replay", "--model", "demo:resnet", "--plan", "MLP_PLAN", "--out", "OUT"],
     "for another model"),
    (["export", "--model", "demo:mlp", "--out", "OUT", "--formats", "pt,onnx"],
     "unknown export format"),
    (["export", "--model", "demo:mlp", "--device", "meta", "--out", "OUT"], "meta-device"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             argv: list[str], match: str) -> None:
    plan = tmp_path / "mlp.json"
    if "MLP_PLAN" in argv:
        assert main(["prune", "--model", "demo:mlp", "--plan", str(plan), "--json"]) == 0
        capsys.readouterr()
    subs = {"FACTORY": _factory(tmp_path), "MISSING": str(tmp_path / "missing.json"),
            "OUT": str(tmp_path / "out"), "MLP_PLAN": str(plan)}
    code = main([subs.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err and "Traceback" not in err


def test_error_in_a_real_process() -> None:
    done = subprocess.run([sys.executable, "-m", "explorer", "prune", "--model", "hf:nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "unknown transformers family 'nope'" in done.stderr


def test_prune_export_and_evaluate_read_data_alike() -> None:
    """One set of data options (`cli._add_data_args`) with `io.data.DataOptions`' defaults."""
    from explorer.app.cli import build_parser
    from explorer.io.data import DataOptions

    parser = build_parser()
    for argv in (["prune", "--model", "demo:mlp"], ["export", "--model", "demo:mlp", "--out", "o"],
                 ["evaluate", "--model", "hf:a", "--reference", "hf:b"]):
        args = parser.parse_args(argv)
        assert DataOptions(args.num_samples, args.seq_len, args.batch_size) == DataOptions()
