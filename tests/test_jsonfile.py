"""JSON files in a user's folder are read as data in one place (`io.jsonfile.read_json`):
a config that is not UTF-8 was a raw "'utf-8' codec can't decode byte 0xff" naming no
file, and a sentence-transformers module list nested too deep was "unexpected
RecursionError (a bug)"; now each is one line naming the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from explorer.app.cli import main
from explorer.io.jsonfile import read_json

NOT_UTF8 = b'\xff\xfe{"model_type": "llama"}'
DEEP = b"[" * 100_000 + b"]" * 100_000


def _llama(folder: Path) -> Path:
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=32).save_pretrained(folder)
    return folder


def _case(tmp_path: Path, case: str) -> tuple[str, Path]:
    """(spec, the file that is wrong) for each way a folder's JSON can be unreadable."""
    if case == "hf config not UTF-8":
        (tmp_path / "config.json").write_bytes(NOT_UTF8)
        return f"hf:{tmp_path}", tmp_path / "config.json"
    if case == "hf config.json not UTF-8":
        (tmp_path / "c.json").write_bytes(NOT_UTF8)
        return f"hf:{tmp_path / 'c.json'}", tmp_path / "c.json"
    if case == "timm config not UTF-8":
        (tmp_path / "config.json").write_bytes(b'\xff{"architecture": "resnet18"}')
        return f"timm:{tmp_path}", tmp_path / "config.json"
    if case == "sentence module list too deep":
        (_llama(tmp_path) / "modules.json").write_bytes(DEEP)
        return f"hf:{tmp_path}", tmp_path / "modules.json"
    (_llama(tmp_path) / "model.safetensors.index.json").write_bytes(NOT_UTF8)
    return f"hf:{tmp_path}", tmp_path / "model.safetensors.index.json"


@pytest.mark.parametrize("case", ["hf config not UTF-8", "hf config.json not UTF-8",
                                  "timm config not UTF-8", "sentence module list too deep",
                                  "checkpoint index not UTF-8"])
def test_an_unreadable_json_file_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    spec, bad = _case(tmp_path, case)
    assert main(["trace", "--model", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read ") and f"'{bad}': " in err, err
    assert err.count("\n") == 1 and "unexpected" not in err


def test_read_json_raises_the_callers_error(tmp_path: Path) -> None:
    class Mine(ValueError):
        pass

    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(Mine, match=r"cannot read the list '.*big\.json': it is 203 bytes, "
                                   r"more than such a file can be \(100\); check it"):
        read_json(big, "the list", Mine, max_bytes=100, hint="; check it")
    with pytest.raises(Mine, match=r"cannot read the list '.*none\.json': No such file"):
        read_json(tmp_path / "none.json", "the list", Mine)
    assert read_json(big, "the list", Mine) == [1] * 101
