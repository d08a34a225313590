"""Every bad input of issue 13 on the command line: exit 2, one ``error:`` line, no traceback."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from explorer.app.cli import main

ROOT = Path(__file__).resolve().parents[1]

Setup = Callable[[Path], list[str]]  # makes the files a case needs; returns its argv


def _safetensors(content: bytes) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "w.safetensors").write_bytes(content)
        return ["trace", "--model", "demo:mlp", "--weights", str(tmp / "w.safetensors")]
    return setup


def _truncated(tmp: Path) -> list[str]:
    from safetensors.torch import save_file
    save_file({"fc1.weight": torch.zeros(64, 20)}, str(tmp / "w.safetensors"))
    data = (tmp / "w.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(data[: len(data) // 2])
    return ["trace", "--model", "demo:mlp", "--weights", str(tmp / "w.safetensors")]


def _plan(content: bytes) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "plan.json").write_bytes(content)
        return ["replay", "--model", "demo:mlp", "--plan", str(tmp / "plan.json"),
                "--out", str(tmp / "out")]
    return setup


def _calibration(obj: object, raw_pickle: bool) -> Setup:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "calib.pt"
        if raw_pickle:
            path.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, path)
        return ["prune", "--model", "demo:mlp", "--importance", "taylor", "--calibration",
                str(path)]
    return setup


def _out_is_folder(tmp: Path) -> list[str]:
    (tmp / "dir").mkdir()
    return ["prune", "--model", "demo:mlp", "--out", str(tmp / "dir")]


def _out_unwritable(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return ["prune", "--model", "demo:mlp", "--out", str(tmp / "file" / "model.pt")]


def _out_exists(tmp: Path) -> list[str]:
    (tmp / "model.pt").write_text("my old model")
    return ["prune", "--model", "demo:mlp", "--out", str(tmp / "model.pt")]


def _export_full(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["export", "--model", "demo:mlp", "--out", str(tmp / "out"), "--formats", "pt"]


def _hanging_factory(tmp: Path) -> list[str]:
    (tmp / "pe_hangs.py").write_text("def make():\n    while True:\n        pass\n")
    return ["trace", "--model", f"{tmp / 'pe_hangs.py'}:make", "--timeout", "1"]


def _args(*argv: str) -> Setup:
    return lambda _tmp: list(argv)


CASES: dict[str, tuple[Setup, str]] = {  # name -> (setup, a regex the error line matches)
    "weights-truncated": (_truncated, r"not a readable safetensors file"),
    "weights-empty": (_safetensors(b""), r"not a readable safetensors file"),
    "weights-garbage": (_safetensors(b"\x00garbage" * 50), r"not a readable safetensors"),
    "out-is-folder": (_out_is_folder, r"is a folder; give a file name"),
    "out-unwritable": (_out_unwritable, r"cannot write"),
    "out-exists": (_out_exists, r"exists; choose another name or pass --force"),
    "export-not-empty": (_export_full, r"is not empty; .* --force"),
    "hf-heads-7": (_args("trace", "--model", "hf:llama?num_attention_heads=7"),
                   r"not a multiple of the number of attention heads"),
    "hf-hidden-abc": (_args("trace", "--model", "hf:llama?hidden_size=abc"),
                      r"'hidden_size' must be an integer"),
    "hf-flash": (_args("trace", "--model", "hf:llama?attn_implementation=flash_attention_2"),
                 r"could not build .* attn_implementation=eager or sdpa"),
    "hf-vocab-0": (_args("trace", "--model", "hf:llama?vocab_size=0"),
                   r"'vocab_size' must be at least 1"),
    "hf-layers-negative": (_args("trace", "--model", "hf:llama?num_hidden_layers=-1"),
                           r"'num_hidden_layers' must be at least 1"),
    "timm-assert": (_args("trace", "--model", "timm:vit_tiny_patch16_224?embed_dim=100"),
                    r"rejected options .*AssertionError"),
    "calibration-pickle": (_calibration({"x": 1}, raw_pickle=True),
                           r"cannot read calibration file .* weights_only=True"),
    "calibration-shape": (_calibration(torch.randn(4, 7), raw_pickle=False),
                          r"failed on the calibration data"),
    "input-shape-huge": (_args("trace", "--model", "demo:resnet", "--input-shape",
                               "1,3,100000,100000"), r"more than the .* an example input"),
    "plan-deep": (_plan(b"[" * 100_000 + b"]" * 100_000), r"nests JSON"),
    "plan-not-utf8": (_plan(b'{"schema": 1, "model": "\xff"}'),
                      r"plan file '.*plan\.json' is not UTF-8"),
    "plan-huge-int": (_plan(b'{"schema": ' + b"1" * 5000 + b"}"), r"integer of 5000 digits"),
    "plan-schema-true": (_plan(b'{"schema": true}'), r"schema version True is not supported"),
    "ignore-typo": (_args("prune", "--model", "demo:resnet", "--ignore", "layer1.0.conv"),
                    r"ignored module 'layer1\.0\.conv' is not in the model; did you mean"),
    "trace-ignore-typo": (_args("trace", "--model", "demo:mlp", "--ignore", "fc4"),
                          r"ignored module 'fc4' is not in the model; did you mean"),
    "steps-0": (_args("prune", "--model", "demo:mlp", "--steps", "0"),
                r"--steps: must be a positive integer"),
    "steps-negative": (_args("prune", "--model", "demo:mlp", "--steps", "-2"),
                       r"--steps: must be a positive integer"),
    "round-to-0": (_args("prune", "--model", "demo:mlp", "--round-to", "0"),
                   r"--round-to: must be a positive integer"),
    "ratio-1.5": (_args("prune", "--model", "demo:mlp", "--ratio", "1.5"),
                  r"--ratio: must be a fraction in \[0, 1\)"),
    "bn-scale-without-bn": (_args("prune", "--model", "demo:mlp", "--importance", "bn-scale"),
                            r"no affine BatchNorm layer"),
    "finetune-negative": (_args("learn", "--finetune-epochs", "-1"),
                          r"--finetune-epochs: must be an integer >= 0"),
    "timeout": (_hanging_factory, r"building the model took longer than --timeout 1 s"),
    "timm-reads-file": (_args("trace", "--model", "timm:resnet18?checkpoint_path=/tmp/x.pt"),
                        r"'checkpoint_path' would download or read a file"),
}


def _bomb_folder(side: int) -> Setup:
    """A PNG of ``side`` x ``side`` pixels: PIL raises above 2x ``MAX_IMAGE_PIXELS`` and only
    warns between 1x and 2x; refused either way."""
    def setup(tmp: Path) -> list[str]:
        from PIL import Image
        (tmp / "images").mkdir()
        Image.new("1", (side, side)).save(tmp / "images" / "bomb.png")
        return ["prune", "--model", "demo:resnet", "--importance", "taylor", "--calibration",
                str(tmp / "images")]
    return setup


def _deep_jsonl(folder: Path) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000)
        return ["prune", "--model", f"hf:{folder}", "--device", "meta", "--importance",
                "taylor", "--calibration", str(tmp / "deep.jsonl")]
    return setup


def _nan_weights(tmp: Path) -> Path:
    from safetensors.torch import save_file

    from explorer import load_model
    state = {k: v.clone() for k, v in load_model("demo:mlp").model.state_dict().items()}
    state["fc1.weight"][0, :3] = float("nan")
    state["fc1.weight"][1, 0] = float("inf")
    save_file(state, tmp / "nan.safetensors")
    return tmp / "nan.safetensors"


def _prune_nan(tmp: Path) -> list[str]:
    return ["prune", "--model", "demo:mlp", "--weights", str(_nan_weights(tmp))]


CASES.update({
    "timm-num-classes-negative": (_args("trace", "--model", "timm:resnet18?num_classes=-1"),
                                  r"timm spec option 'num_classes' must be an integer >= 0, "
                                  r"got -1"),
    "timm-depth-float": (_args("trace", "--model", "timm:vit_tiny_patch16_224?depth=2.5"),
                         r"timm spec option 'depth' must be a positive integer, got 2\.5"),
    "timeout-negative": (_args("trace", "--model", "demo:mlp", "--timeout", "-1"),
                         r"--timeout: must be a number of seconds >= 0"),
    "prune-nan-weights": (_prune_nan, r"the model's weights are not finite: 'fc1\.weight' holds "
                                      r"4 NaN/Inf value\(s\); .*nothing is pruned"),
    "image-bomb": (_bomb_folder(14_000), r"image '.*bomb\.png' is refused as a possible "
                                         r"decompression bomb"),
    "image-bomb-warning": (_bomb_folder(10_000), r"image '.*bomb\.png' is refused as a "
                                                 r"possible decompression bomb"),
    "max-memory-1e400": (_args("prune", "--model", "demo:mlp", "--max-memory", "1e400GB"),
                         r"--max-memory: must be a size like 8GB"),
    "max-memory-nan": (_args("prune", "--model", "demo:mlp", "--max-memory", "nanGB"),
                       r"--max-memory: must be a size like 8GB"),
    "max-memory-huge": (_args("prune", "--model", "demo:mlp", "--max-memory", "99999999TB"),
                        r"--max-memory: .*at most 1 PiB"),
    "max-memory-zero": (_args("prune", "--model", "demo:mlp", "--max-memory", "0GB"),
                        r"--max-memory: .*above 0"),
})


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    setup, match = CASES[name]
    code, out, err = _run(setup(tmp_path), capsys)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "tensor(" not in lines[0]
    import re
    assert re.search(match, lines[0]), lines[0]


def test_user_files_survive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(_out_exists(tmp_path), capsys)
    assert (tmp_path / "model.pt").read_text() == "my old model"
    _run(_export_full(tmp_path), capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    code, _out, _err = _run(["prune", "--model", "demo:mlp", "--out", str(tmp_path / "model.pt"),
                             "--force"], capsys)
    assert code == 0 and torch.load(tmp_path / "model.pt", weights_only=False)


def test_meta_bn_scale_is_a_note_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    """Like magnitude on meta: no weights, so the note says the lowest indices were chosen."""
    code, out, err = _run(["prune", "--model", "demo:resnet", "--device", "meta",
                           "--importance", "bn-scale"], capsys)
    assert code == 0 and "'bn-scale' has no values" in out and not err


def test_real_process_exit_code(tmp_path: Path) -> None:
    argv = _safetensors(b"garbage")(tmp_path)
    done = subprocess.run([sys.executable, "-m", "explorer", *argv], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- issue 22: checkpoint files
# Each ended as "error: unexpected X ... (a bug)", exit 1. They share the session's tiny
# sharded llama (`ckpt`), copied per case; `_MARK` is written if any pickled code ever runs.

_MARK = "pe_pickle_ran"


class _RunsCode:
    """Pickles as a call of ``os.system``: a weights-only load must refuse it unrun."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os
        return os.system, (f"touch {self.marker}",)


def _copy(ckpt: Path, tmp: Path) -> Path:
    import shutil
    return Path(shutil.copytree(ckpt, tmp / "ckpt"))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def _as_pickle(folder: Path, tmp: Path, zipped: bool) -> Path:
    """The folder's weights replaced by a ``pytorch_model.bin`` that names ``os.system``."""
    for f in [*_shards(folder), folder / "model.safetensors.index.json"]:
        f.unlink()
    bin_file = folder / "pytorch_model.bin"
    payload = {"model.embed_tokens.weight": _RunsCode(tmp / _MARK)}
    if zipped:
        torch.save(payload, bin_file)
    else:
        bin_file.write_bytes(pickle.dumps(payload, protocol=4))
    return bin_file


def _hf_pickle(ckpt: Path, tmp: Path) -> list[str]:
    folder = _copy(ckpt, tmp)
    _as_pickle(folder, tmp, zipped=True)
    return ["trace", "--model", f"hf:{folder}", "--no-preflight"]


def _weights_pickle(ckpt: Path, tmp: Path) -> list[str]:
    bin_file = _as_pickle(_copy(ckpt, tmp), tmp, zipped=False)  # raw: torch warned 3 lines
    return ["trace", "--model", "hf:llama?num_hidden_layers=3", "--weights", str(bin_file),
            "--no-preflight"]


def _hf_truncated_single(ckpt: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file
    folder = _copy(ckpt, tmp)
    merged: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        merged.update(load_file(shard))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(merged, folder / "model.safetensors", metadata={"format": "pt"})
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["trace", "--model", f"hf:{folder}", "--no-preflight"]


def _truncate_shard(folder: Path) -> None:
    shard = _shards(folder)[1]
    shard.write_bytes(shard.read_bytes()[:-1000])


def _hf_truncated_shard(ckpt: Path, tmp: Path) -> list[str]:
    folder = _copy(ckpt, tmp)
    _truncate_shard(folder)
    return ["trace", "--model", f"hf:{folder}", "--no-preflight"]


def _max_memory_truncated(ckpt: Path, tmp: Path) -> list[str]:
    folder = _copy(ckpt, tmp)
    _truncate_shard(folder)
    return ["prune", "--model", f"hf:{folder}", "--device", "meta", "--importance", "wanda",
            "--max-memory", "300KB", "--offload-folder", str(tmp / "off")]


def _wrong_shape(ckpt: Path, tmp: Path, argv: list[str]) -> list[str]:
    from safetensors.torch import load_file, save_file
    folder = _copy(ckpt, tmp)
    for shard in _shards(folder):
        state = load_file(shard)
        if "model.layers.0.mlp.up_proj.weight" in state:
            state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
            save_file(state, shard, metadata={"format": "pt"})
    return [a.replace("DIR", str(folder)) for a in argv]


def _max_memory_nan(ckpt: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file
    folder = _copy(ckpt, tmp)
    for shard in _shards(folder):
        state = load_file(shard)
        if "model.layers.1.mlp.down_proj.weight" in state:
            state["model.layers.1.mlp.down_proj.weight"][0, :2] = float("nan")
            save_file(state, shard, metadata={"format": "pt"})
    return ["prune", "--model", f"hf:{folder}", "--device", "meta", "--importance", "wanda",
            "--max-memory", "300KB", "--offload-folder", str(tmp / "off")]


def _max_memory_wrong_shape(ckpt: Path, tmp: Path) -> list[str]:
    return _wrong_shape(ckpt, tmp, ["prune", "--model", "hf:DIR", "--device", "meta",
                                    "--importance", "wanda", "--max-memory", "300KB",
                                    "--offload-folder", str(tmp / "off")])


def _hf_wrong_shape(ckpt: Path, tmp: Path) -> list[str]:
    return _wrong_shape(ckpt, tmp, ["trace", "--model", "hf:DIR", "--no-preflight"])


def _replay_shard(ckpt: Path, tmp: Path, shard: str | None) -> list[str]:
    """``replay --checkpoint`` of a copy whose index names ``shard`` for one tensor (None: a
    shard in the folder replaced by text)."""
    folder = _copy(ckpt, tmp)
    assert main(["prune", "--model", f"hf:{folder}", "--device", "meta", "--ratio", "0.25",
                 "--plan", str(tmp / "plan.json")]) == 0
    if shard is None:
        _shards(folder)[0].write_text("not safetensors\n" * 20)
    else:
        index = folder / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"][next(iter(data["weight_map"]))] = shard
        index.write_text(json.dumps(data))
    return ["replay", "--checkpoint", str(folder), "--plan", str(tmp / "plan.json"),
            "--out", str(tmp / "out")]


CKPT_CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "hf-pickle": (_hf_pickle, r"pytorch_model\.bin' is a pickle that a tensors-only load "
                              r"refuses \(it names posix\.system.*nothing in it was run"),
    "weights-pickle": (_weights_pickle, r"pytorch_model\.bin' is a pickle that a tensors-only "
                                        r"load refuses .*nothing in it was run"),
    "hf-truncated-single": (_hf_truncated_single, r"ckpt/model\.safetensors' is not a readable "
                                                  r"safetensors file .*is it complete"),
    "hf-truncated-shard": (_hf_truncated_shard, r"model-00002-of-\d+\.safetensors' is not a "
                                                r"readable safetensors file .*is it complete"),
    "max-memory-truncated-shard": (_max_memory_truncated, r"model-00002-of-\d+\.safetensors' "
                                                          r"is not a readable safetensors"),
    "hf-wrong-shape": (_hf_wrong_shape, r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                        r"\(100, 64\), the model's is \(128, 64\)"),
    "max-memory-wrong-shape": (_max_memory_wrong_shape,
                               r"--max-memory: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                               r"of '.*safetensors' has shape \(100, 64\), the model's config "
                               r"gives \(128, 64\)"),
    "max-memory-nan": (_max_memory_nan, r"--max-memory: the checkpoint's weights are not "
                                        r"finite: '.*down_proj\.weight' holds 2 NaN/Inf"),
    "replay-garbage-shard": (lambda c, t: _replay_shard(c, t, None),
                             r"shard '.*model-00001-of-\d+\.safetensors' is not a readable "
                             r"safetensors file"),
    # refused as a path outside the folder once issue 22 item 1 lands; a shard either way
    "replay-system-file": (lambda c, t: _replay_shard(c, t, "/etc/passwd"),
                           r"/etc/passwd"),
}


@pytest.mark.parametrize("name", list(CKPT_CASES))
def test_bad_checkpoint_is_one_error_line(name: str, ckpt: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    setup, match = CKPT_CASES[name]
    argv = setup(ckpt, tmp_path)
    capsys.readouterr()
    code, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    import re
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / _MARK).exists()  # the pickle's code never ran
    assert not (tmp_path / "out").exists()


def test_deep_json_line_is_one_error_line(smollm2: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _run(_deep_jsonl(smollm2)(tmp_path), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "deep.jsonl:2 nests JSON deeper than Python reads" in err


def test_timeout_has_a_default(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A factory that never returns ends without --timeout (issue 22: it hung)."""
    from explorer.app import cli
    monkeypatch.setattr(cli, "DEFAULT_TIMEOUT", 1.0)
    (tmp_path / "pe_hangs_default.py").write_text("def make():\n    while True:\n        pass\n")
    code, _out, err = _run(["trace", "--model", f"{tmp_path / 'pe_hangs_default.py'}:make"],
                           capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "building the model took longer than --timeout 1 s (the default): a factory that " \
           "never returns? If it is only slow, raise it (--timeout 600, or 0 for no limit)" in err


def test_timeout_keeps_an_outer_alarm(capsys: pytest.CaptureFixture[str]) -> None:
    """The default deadline must not cancel an alarm already set (pytest-timeout's)."""
    import signal
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, _frame: fired.append(signum))
    outer = signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert _run(["trace", "--model", "demo:mlp", "--no-preflight"], capsys)[0] == 0
        left, _interval = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left < 100 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
        signal.signal(signal.SIGALRM, previous)


def test_nan_weights_trace_with_a_note(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["trace", "--model", "demo:mlp", "--weights",
                           str(_nan_weights(tmp_path)), "--no-preflight"], capsys)
    assert code == 0 and not err
    assert "note: the weights of " in out and "nan.safetensors are not finite: 'fc1.weight' " \
           "holds 4 NaN/Inf value(s); tracing works, pruning refuses them" in out


def test_raw_pickle_weights_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    """torch's unpickler warned three lines on stderr before the refusal (issue 22)."""
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"fc1.weight": _RunsCode(tmp_path / _MARK)},
                                                  protocol=4))
    done = subprocess.run([sys.executable, "-m", "explorer", "trace", "--model", "demo:mlp",
                           "--weights", str(tmp_path / "w.pkl")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "w.pkl' is a pickle that a tensors-only load refuses" in done.stderr
    assert not (tmp_path / _MARK).exists()
