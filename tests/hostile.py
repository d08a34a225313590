"""Hostile checkpoint folders for the safety tests (issue 22): folders that ask to run their
own code, with a marker file that appears if any of it runs, and tree snapshots to prove that
nothing was written where it should not be."""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

from explorer import Plan, Pruner, load_model

# The folder's own code: importing it (or building the class) writes the marker file.
EVIL = '''from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM


class EvilTokenizer(PreTrainedTokenizerFast):
    pass


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''
CODE_FILES = ("evil.py", "modeling_evil.py", "configuration_evil.py", "tokenization_evil.py")


def add_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer (fast, 250 words) saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)} | {"[UNK]": 250}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def add_code(folder: Path, marker: Path) -> None:
    """The folder's own Python files, each writing ``marker`` when imported."""
    for name in CODE_FILES:
        (folder / name).write_text(EVIL.format(marker=str(marker)))


def hostile_copy(ckpt: Path, dst: Path, marker: Path, hook: str = "tokenizer") -> Path:
    """``ckpt`` copied to ``dst`` with a tokenizer, code files and an ``auto_map`` in
    ``tokenizer_config.json`` (``hook="tokenizer"``) or ``config.json`` (``"config"``)."""
    shutil.copytree(ckpt, dst)
    add_tokenizer(dst)
    add_code(dst, marker)
    if hook == "tokenizer":
        edit_json(dst / "tokenizer_config.json", lambda d: d.update(
            auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}))
        edit_json(dst / "tokenizer_config.json", lambda d: d.pop("tokenizer_class", None))
    else:
        edit_json(dst / "config.json", lambda d: d.update(auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilModel"}))
    return dst


def edit_json(path: Path, edit: object) -> None:
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of the content (or the target of a link) for everything
    under ``root``."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@functools.cache
def plan_for(folder: Path) -> Plan:
    """A plan made on a weightless copy of the checkpoint's architecture (whole heads)."""
    spec = f"hf:{folder}/config.json"
    lm = load_model(spec, device="meta")
    pruner = Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.25,
                    heads="whole")
    return Plan.from_pruner(pruner, spec, reports=[pruner.step()])
