"""Checkpoint-folder fuzzing (issue 22): seeded mutations of a tiny saved Llama's shard index,
``config.json`` and ``tokenizer_config.json``, run through the real entry points
(``load_model("hf:DIR")``, the streamed ``replay --checkpoint``, library and command line,
``--weights <index.json>``).

Every mutated folder is either refused with one clean line, or gives exactly the result of the
unmutated folder. Whatever happens: no file is written outside ``--out`` (the whole tree is
hashed before and after), the source folder is unchanged, and none of the folder's own code
runs (its ``evil.py`` / ``modeling_evil.py`` would write a marker file, and transformers' module
cache would gain a copy of them).
"""
from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import add_code, add_tokenizer, plan_for, tree
from safetensors import safe_open

from explorer import Plan, load_model
from explorer.app.cli import main
from explorer.io.plan import PlanError
from explorer.io.specs import SpecError
from explorer.io.stream import StreamError, replay_checkpoint

INDEX = "model.safetensors.index.json"
CASES = 48  # mutated folders; each runs one entry point

Mutation = Callable[[Path, random.Random], str]  # edits the folder; returns a label


# -- mutations of the shard index -------------------------------------------------------------
def _edit(path: Path, edit: Callable[[Any], Any]) -> None:
    """Apply ``edit`` to the JSON object in ``path`` (a file an earlier mutation broke is
    left as it is)."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return
    try:
        edit(data)
    except (KeyError, IndexError, TypeError, AttributeError):
        return  # the layout an edit expects is gone
    path.write_text(json.dumps(data))


def _shard(folder: Path, r: random.Random) -> str:
    return r.choice(sorted(p.name for p in folder.glob("*.safetensors")))


def rename_shard(folder: Path, r: random.Random) -> str:
    """One shard's name in the weight map becomes something else."""
    old = _shard(folder, r)
    outside = folder.parent / "outside.safetensors"
    how = r.choice(("absolute", "dotdot", "deep-dotdot", "link-out", "link-secret", "link-in",
                    "huge", "number", "null", "list", "missing", "empty", "dot", "config",
                    "index", "subfolder", "dir", "nul"))
    link = f"link{len(list(folder.glob('link*')))}.safetensors"
    if how == "link-out":
        (folder / link).symlink_to(outside)
    elif how == "link-secret":
        (folder / link).symlink_to(folder.parent / "secret.txt")
    elif how == "link-in":  # a link to the very shard, inside the folder: harmless
        (folder / link).symlink_to(folder / old)
    elif how == "dir":
        (folder / "d.safetensors").mkdir(exist_ok=True)
    new: object = {
        "absolute": str(outside), "dotdot": "../outside.safetensors",
        "deep-dotdot": "a/../../outside.safetensors", "link-out": link, "link-secret": link,
        "link-in": link,
        "huge": "x" * 5000 + ".safetensors", "number": 7, "null": None, "list": [old],
        "missing": "missing.safetensors", "empty": "", "dot": ".", "config": "config.json",
        "index": INDEX, "subfolder": f"sub/{old}", "dir": "d.safetensors", "nul": "a\x00b",
    }[how]
    every = r.random() < 0.5  # all entries of that shard, or just one
    hit = [False]

    def edit(d: Any) -> None:
        for key, value in d["weight_map"].items():
            if value == old and (every or not hit[0]):
                d["weight_map"][key] = new
                hit[0] = True
    _edit(folder / INDEX, edit)
    return f"shard {old} -> {how}{' (all)' if every else ''}"


def break_weight_map(folder: Path, r: random.Random) -> str:
    how = r.choice(("list", "empty", "missing", "string", "not-object", "not-json", "deep",
                    "drop-entry", "metadata"))
    if how == "not-json":
        (folder / INDEX).write_text("{\"weight_map\": ")
    elif how == "deep":
        (folder / INDEX).write_text("[" * 100_000 + "]" * 100_000)
    elif how == "not-object":
        (folder / INDEX).write_text("[1, 2]")
    else:
        def edit(d: Any) -> None:
            if how == "list":
                d["weight_map"] = list(d["weight_map"].values())
            elif how == "empty":
                d["weight_map"] = {}
            elif how == "missing":
                del d["weight_map"]
            elif how == "string":
                d["weight_map"] = "model-00001-of-00005.safetensors"
            elif how == "metadata":
                d["metadata"] = r.choice(([1], "x", None, {"total_size": "x"}))
            else:
                d["weight_map"].pop(r.choice(sorted(d["weight_map"])))
        _edit(folder / INDEX, edit)
    return f"weight_map {how}"


# -- mutations of config.json and tokenizer_config.json ---------------------------------------
HOOKS: tuple[Any, ...] = (
    {"AutoConfig": "configuration_evil.EvilConfig",
     "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    {"AutoModelForCausalLM": "modeling_evil.EvilModel"},
    {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
    {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
    ["evil.EvilTokenizer", None],
    "modeling_evil.EvilModel",
)


def code_hook(folder: Path, r: random.Random) -> str:
    """An ``auto_map`` (or ``custom_pipelines``), in one of its shapes, in one of the configs."""
    file = r.choice(("config.json", "tokenizer_config.json"))
    key = r.choice(("auto_map", "auto_map", "custom_pipelines", "nested"))
    hook = r.choice(HOOKS)

    def edit(d: Any) -> None:
        if key == "nested":
            d["text_config"] = {"auto_map": hook}
        elif key == "custom_pipelines":
            d[key] = {"evil": {"impl": "evil.EvilPipeline", "pt": ["AutoModelForCausalLM"]}}
        else:
            d[key] = hook
        if file == "tokenizer_config.json" and r.random() < 0.5:
            d.pop("tokenizer_class", None)
    _edit(folder / file, edit)
    return f"{key} in {file}"


def odd_config(folder: Path, r: random.Random) -> str:
    key, value = r.choice((
        ("architectures", 7), ("architectures", "LlamaForCausalLM"), ("architectures", [None]),
        ("architectures", ["EvilModel"]), ("architectures", []), ("model_type", 7),
        ("model_type", "evil"), ("model_type", None), ("hidden_size", "64"),
        ("num_hidden_layers", 0), ("vocab_size", -1), ("torch_dtype", "evil"),
        ("rope_scaling", "x"), ("unknown_field", {"a": [1]}), ("__class__", "x"),
        ("_name_or_path", "/etc"), ("use_cache", "yes"),
    ))
    _edit(folder / "config.json", lambda d: d.__setitem__(key, value))
    return f"config {key}={value!r}"


def broken_config(folder: Path, r: random.Random) -> str:
    file = r.choice(("config.json", "tokenizer_config.json"))
    how = r.choice(("list", "not-json", "deep", "empty"))
    text = {"list": "[1]", "not-json": "{", "deep": "[" * 100_000 + "]" * 100_000,
            "empty": ""}[how]
    (folder / file).write_text(text)
    return f"{file} {how}"


def odd_tokenizer(folder: Path, r: random.Random) -> str:
    key, value = r.choice((
        ("tokenizer_class", 7), ("tokenizer_class", "EvilTokenizer"), ("tokenizer_class", None),
        ("tokenizer_class", "LlamaTokenizerFast"), ("model_max_length", "x"),
        ("unk_token", {"content": 7}), ("added_tokens_decoder", "x"),
        ("processor_class", "EvilProcessor"),
    ))
    _edit(folder / "tokenizer_config.json", lambda d: d.__setitem__(key, value))
    return f"tokenizer {key}={value!r}"


INDEX_MUTATIONS: tuple[Mutation, ...] = (rename_shard, rename_shard, break_weight_map)
MUTATIONS: tuple[Mutation, ...] = (*INDEX_MUTATIONS, code_hook, code_hook, odd_config,
                                   broken_config, odd_tokenizer)


# -- the entry points -------------------------------------------------------------------------
@dataclass
class Base:
    folder: Path  # the unmutated folder (with tokenizer and code files)
    plan_file: Path
    marker: Path  # written by the folder's code if it ever runs
    state: dict[str, torch.Tensor]  # load_model("hf:DIR")'s state dict
    streamed: dict[str, torch.Tensor]  # replay_checkpoint's output tensors


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            out.update({k: f.get_tensor(k).clone() for k in names})
    return out


@pytest.fixture(scope="module")
def base(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("fuzz-base")
    folder = Path(shutil.copytree(ckpt, root / "ckpt"))
    add_tokenizer(folder)
    marker = root / "RAN"
    add_code(folder, marker)
    plan_file = root / "plan.json"
    plan_for(ckpt).save(plan_file)
    state = {k: v.clone() for k, v in load_model(f"hf:{folder}").model.state_dict().items()}
    replay_checkpoint(folder, plan_for(ckpt), root / "streamed")
    return Base(folder, plan_file, marker, state, _tensors(root / "streamed"))


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _load(base: Base, src: Path, out: Path) -> bool:
    """Every tensor loaded is the checkpoint's, or a note names it (a config naming the
    base architecture loads it without the head; an index that leaves a tensor out leaves
    it newly initialised: transformers' behaviour, said in a note)."""
    lm = load_model(f"hf:{src}")
    got = lm.model.state_dict()
    if got.keys() != base.state.keys() and not lm.notes:
        return False
    want = {k.removeprefix("model."): v for k, v in base.state.items()} | base.state
    other = [k for k, v in got.items() if not (k in want and torch.equal(v, want[k]))]
    return all(any(k in note for note in lm.notes) for k in other)


def _weights(base: Base, src: Path, out: Path) -> bool:
    lm = load_model(f"hf:{base.folder}/config.json", weights=src / INDEX)
    return _same(lm.model.state_dict(), base.state)


def _replay(base: Base, src: Path, out: Path) -> bool:
    replay_checkpoint(src, Plan.load(base.plan_file), out)
    return _same(_tensors(out), base.streamed)


class _CliRefused(Exception):
    """The command line said no (exit 2) in one line."""


def _cli_replay(base: Base, src: Path, out: Path) -> bool:
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["replay", "--checkpoint", str(src), "--plan", str(base.plan_file),
                     "--out", str(out), "--json"])
    text = err.getvalue()
    if code != 0:
        assert code == 2, text  # 1 would be "unexpected ... (a bug)"
        raise _CliRefused(text.removesuffix("\n"))
    return _same(_tensors(out), base.streamed)


ENTRIES: dict[str, Callable[[Base, Path, Path], bool]] = {
    "load": _load, "weights": _weights, "replay": _replay, "cli-replay": _cli_replay}
REFUSALS = (SpecError, StreamError, PlanError, _CliRefused)


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _modules_cache() -> set[str]:
    from transformers.utils import HF_MODULES_CACHE
    return {str(p) for p in Path(HF_MODULES_CACHE).rglob("*")}


def test_mutated_checkpoints_are_refused_or_harmless(base: Base, tmp_path: Path,
                                                     one_thread: None) -> None:
    rng = random.Random("issue-22-checkpoints")
    cache = _modules_cache()
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(CASES):
        work = tmp_path / f"case{i}"
        src = Path(shutil.copytree(base.folder, work / "ckpt", symlinks=True))
        shutil.copyfile(next(iter(sorted(src.glob("*.safetensors")))),
                        work / "outside.safetensors")
        (work / "secret.txt").write_text("secret")
        entry = rng.choice(sorted(ENTRIES))
        kinds = INDEX_MUTATIONS if entry == "weights" else MUTATIONS  # it reads only the index
        labels = [rng.choice(kinds)(src, rng) for _ in range(1 + (rng.random() < 0.25))]
        where = f"case {i}: {entry} after {', '.join(labels)}"
        before = tree(work)
        out = work / "out"
        try:
            assert ENTRIES[entry](base, src, out), f"{where}: accepted with another result"
            outcomes["accepted"] += 1
        except REFUSALS as e:
            text = str(e)
            assert "\n" not in text and len(text) < 800 and "Traceback" not in text, where
            assert "trust_weights" not in text, where  # a path problem is not a trust problem
            outcomes["refused"] += 1
        after = tree(work)
        written = {k for k in after if k == "out" or k.startswith("out/")}
        assert {k: v for k, v in after.items() if k not in written} == before, where
        assert not base.marker.exists(), f"{where}: the folder's code ran"
        shutil.rmtree(work)
    assert _modules_cache() == cache, "transformers copied a folder's code to import it"
    assert outcomes["refused"] > outcomes["accepted"] > 0, outcomes
