"""Every bad input of issue 13 on the command line: exit 2, one ``error:`` line, no traceback."""
from __future__ import annotations

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
