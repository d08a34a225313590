"""Safety, round two (issue 22, items 1-5): paths named by files stay in their folder, no
folder's own code ever runs, and no write touches what a run reads."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import add_code, add_tokenizer, edit_json, hostile_copy, plan_for, tree

from explorer import load_model, load_pruned
from explorer.app import store
from explorer.app.cli import main
from explorer.io.export import ExportError, export
from explorer.io.paths import PathError, check_out_apart, inside, shard_files
from explorer.io.plan import checksum
from explorer.io.specs import SpecError
from explorer.io.specs._hf_folder import load_tokenizer
from explorer.io.stream import StreamError, replay_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


def _copy(ckpt: Path, tmp_path: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / name))


def _point_first_shard(folder: Path, target: str) -> str:
    """Rename the first shard in the index to ``target``; the old name."""
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return first


# -- 1. replay --checkpoint never writes outside --out ----------------------------------------
@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "subfolder", "not-weights",
                                 "number"])
def test_streamed_replay_refuses_shard_names_that_leave_the_folder(
        ckpt: Path, tmp_path: Path, how: str) -> None:
    src = _copy(ckpt, tmp_path / "in")
    outside = tmp_path / "outside.safetensors"
    first = sorted(p.name for p in src.glob("*.safetensors"))[0]
    shutil.copyfile(src / first, outside)
    target: object = {"absolute": str(outside), "dotdot": "../../outside.safetensors",
                      "link": "linked.safetensors", "subfolder": "sub/x.safetensors",
                      "not-weights": "config.json", "number": 7}[how]
    if how == "link":
        (src / "linked.safetensors").symlink_to(outside)
    if how == "subfolder":
        (src / "sub").mkdir()
        shutil.copyfile(src / first, src / "sub" / "x.safetensors")
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (src / INDEX).write_text(json.dumps(index))
    before, outside_hash = tree(tmp_path), tree(tmp_path)["outside.safetensors"]
    out = tmp_path / "out"
    with pytest.raises(StreamError, match=rf"^'{src / INDEX}' names shard .*"
                                          r"(outside its folder|a link to|not the file name|"
                                          r"not a file name)"):
        replay_checkpoint(src, plan_for(ckpt), out)
    assert not out.exists() and tree(tmp_path) == before
    assert tree(tmp_path)["outside.safetensors"] == outside_hash


def test_streamed_replay_refuses_a_link_out_among_copied_files(ckpt: Path,
                                                               tmp_path: Path) -> None:
    src = _copy(ckpt, tmp_path / "in")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(StreamError, match=r"names file 'notes.txt', a link to .*secret.txt"):
        replay_checkpoint(src, plan_for(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_cache_snapshot_links_into_blobs_are_read(ckpt: Path, tmp_path: Path) -> None:
    """A Hugging Face cache folder holds links into its repository's blobs: that is inside."""
    repo = tmp_path / "models--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in ckpt.iterdir():
        blob = repo / "blobs" / path.name
        shutil.copyfile(path, blob)
        (snap / path.name).symlink_to(Path("../../blobs") / path.name)
    assert sorted(shard_files(snap / INDEX)) == sorted(p.name for p in ckpt.glob("*.safetensors"))
    res = replay_checkpoint(snap, plan_for(ckpt), tmp_path / "out")
    assert len(res.written) == len(list(ckpt.glob("*.safetensors")))


def test_inside_refuses_every_way_out(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok").write_text("x")
    (tmp_path / "d" / "out").symlink_to(tmp_path)
    src = tmp_path / "d" / "index.json"
    assert inside(tmp_path / "d", "ok", src) == tmp_path / "d" / "ok"
    for name, match in (("/etc/passwd", "outside its folder"), ("../x", "outside its folder"),
                        ("a/../../x", "outside its folder"), ("out/x", "a link to"),
                        ("", "not a file name"), (None, "not a file name"),
                        (["x"], "not a file name"), ("a\x00b", "not a file name"),
                        ("x" * 300, "not a file name")):
        with pytest.raises(PathError, match=rf"^'{src}' names file .*{match}"):
            inside(tmp_path / "d", name, src)


# -- 2. no code from a folder, whatever stdin says ---------------------------------------------
def test_echo_y_never_runs_a_folders_code(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "RAN"
    folder = hostile_copy(ckpt, tmp_path / "evil", marker)
    proc = subprocess.run([sys.executable, "-m", "explorer", "trace", "--model", f"hf:{folder}",
                           "--no-preflight"], input="y\ny\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "asks to run its own code ('auto_map' in " \
        "tokenizer_config.json)" in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("hook", ["tokenizer", "config"])
def test_folders_asking_for_their_code_are_refused_everywhere(
        ckpt: Path, tmp_path: Path, hook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    marker = tmp_path / "RAN"
    folder = hostile_copy(ckpt, tmp_path / "evil", marker, hook)
    file = "tokenizer_config.json" if hook == "tokenizer" else "config.json"
    match = rf"folder '{folder}' asks to run its own code \('auto_map' in {file}\)"
    with pytest.raises(SpecError, match=match):
        load_model(f"hf:{folder}")
    with pytest.raises(SpecError, match=match):
        load_model(f"hf:{folder}", device="meta")
    if hook == "config":  # the config file alone, as hf:path/config.json
        with pytest.raises(SpecError, match=rf"folder '{folder}' asks to run its own code"):
            load_model(f"hf:{folder}/config.json")
    # an export folder whose plan names such a folder
    exported = tmp_path / "export"
    lm = load_model(f"hf:{ckpt}")
    plan = plan_for(ckpt)
    plan.apply(lm.model)
    export(lm.model, exported, "safetensors", plan=plan)
    data = json.loads((exported / "plan.json").read_text())
    data["model"] = f"hf:{folder}"
    data["sha256"] = checksum(data)
    (exported / "plan.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=match):
        load_pruned(None, exported)
    with pytest.raises(StreamError, match=match):
        replay_checkpoint(folder, plan, tmp_path / "out")
    assert main(["replay", "--checkpoint", str(folder), "--plan", str(exported / "plan.json"),
                 "--out", str(tmp_path / "out2")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_transformers_itself_is_told_never_to_run_folder_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind the refusal: a tokenizer folder read directly still runs nothing (the call
    passes trust_remote_code=False, so transformers neither prompts nor reads stdin)."""
    import transformers

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    marker = tmp_path / "RAN"
    folder = tmp_path / "tok"
    folder.mkdir()
    transformers.AutoConfig.for_model("bloom", n_layer=1, hidden_size=32, n_head=4,
                                      vocab_size=256).save_pretrained(folder)
    add_tokenizer(folder)
    add_code(folder, marker)
    edit_json(folder / "tokenizer_config.json", lambda d: d.update(
        auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class=None))
    with pytest.raises(SpecError, match=r"cannot load the tokenizer in .*custom code"):
        load_tokenizer(folder)
    assert not marker.exists()


# -- 3. --weights index reads only shards inside its folder ------------------------------------
@pytest.mark.parametrize("how", ["dotdot", "absolute", "itself"])
def test_weights_index_reads_only_its_folder(ckpt: Path, tmp_path: Path, how: str) -> None:
    src = _copy(ckpt, tmp_path / "in")
    outside = tmp_path / "outside.safetensors"
    first = sorted(p.name for p in src.glob("*.safetensors"))[0]
    shutil.copyfile(src / first, outside)
    _point_first_shard(src, {"dotdot": "../outside.safetensors", "absolute": str(outside),
                             "itself": INDEX}[how])
    with pytest.raises(SpecError, match=rf"'{src / INDEX}' names shard .*(outside its folder|"
                                        r"not the file name of a weights file)") as info:
        load_model(f"hf:{ckpt}/config.json", weights=src / INDEX)
    assert "trust_weights" not in str(info.value)
    with pytest.raises(SpecError, match=rf"'{src / INDEX}' names shard"):
        load_model(f"hf:{src}")  # hf:FOLDER checks its index before transformers reads it
    assert main(["trace", "--model", f"hf:{ckpt}/config.json", "--weights", str(src / INDEX),
                 "--no-preflight"]) == 2


# -- 4. no writer touches what the run reads ---------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_export_never_replaces_its_source(ckpt: Path, tmp_path: Path, where: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(ckpt, tmp_path / "in")
    out = {"same": src, "inside": src / "pruned", "parent": tmp_path}[where]
    before = tree(src)
    assert main(["export", "--model", f"hf:{src}", "--out", str(out), "--force",
                 "--formats", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which this run reads" in err
    assert tree(src) == before
    lm = load_model(f"hf:{src}")  # the library's export finds the source by itself
    with pytest.raises(ExportError, match=r"which this run reads"):
        export(lm.model, out, "pt", force=True)
    assert tree(src) == before


def test_every_writer_keeps_clear_of_its_sources(ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(ckpt, tmp_path / "in")
    plan = tmp_path / "plan.json"
    plan_for(ckpt).save(plan)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    before = tree(tmp_path)
    spec = f"hf:{src}/config.json"
    for argv in (
        ["prune", "--model", spec, "--plan", str(src / "config.json"), "--force"],
        ["prune", "--model", f"hf:{src}", "--plan", str(src / "plan.json")],
        ["prune", "--model", "hf:llama", "--weights", str(weights), "--out", str(weights),
         "--force"],
        ["prune", "--model", f"hf:{src}", "--device", "meta", "--max-memory", "1GB",
         "--offload-folder", str(src / "off"), "--plan", str(tmp_path / "p2.json")],
        ["replay", "--model", spec, "--plan", str(plan), "--out", str(tmp_path), "--force"],
        ["replay", "--checkpoint", str(src), "--plan", str(plan), "--out", str(src / "o")],
        ["replay", "--checkpoint", str(src), "--plan", str(plan), "--out", str(tmp_path),
         "--force"],
        ["export", "--model", "hf:llama", "--calibration", str(plan), "--out", str(tmp_path),
         "--force"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "which this run reads" in err, (argv, err)
        assert tree(tmp_path) == before, argv


def test_check_out_apart(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "file.txt").write_text("x")
    check_out_apart(tmp_path / "other", [tmp_path / "src", tmp_path / "file.txt",
                                         tmp_path / "missing"])
    check_out_apart(tmp_path / "new.pt", [tmp_path / "file.txt"])  # a sibling file is fine
    for out, match in ((tmp_path / "src", r"is '.*src', which"),
                       (tmp_path / "src" / "x", r"is inside '.*src', which"),
                       (tmp_path, r"holds '.*src', which"),
                       (tmp_path / "file.txt", r"is '.*file.txt', which")):
        with pytest.raises(PathError, match=rf"^--out '{out}' {match} this run reads"):
            check_out_apart(out, [tmp_path / "src", tmp_path / "file.txt"])
    (tmp_path / "link").symlink_to(tmp_path / "src")
    with pytest.raises(PathError, match=r"is '.*src', which this run reads"):
        check_out_apart(tmp_path / "link", [tmp_path / "src"])


# -- 5. replay --checkpoint --out: non-empty needs --force; never inside the checkpoint -------
def test_streamed_replay_out_folder_rules(ckpt: Path, tmp_path: Path) -> None:
    plan = plan_for(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StreamError, match=rf"--out '{out}' is not empty .* pass --force"):
        replay_checkpoint(ckpt, plan, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    res = replay_checkpoint(ckpt, plan, out, force=True)
    assert res.written and (out / "keep.txt").read_text() == "mine"
    again = replay_checkpoint(ckpt, plan, out)  # an earlier streamed replay: resumed
    assert again.skipped == res.written and not again.written
    with pytest.raises(StreamError, match=r"is inside '.*', which this run reads"):
        replay_checkpoint(ckpt, plan, ckpt / "pruned")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StreamError, match=r"exists and is not a folder"):
        replay_checkpoint(ckpt, plan, tmp_path / "file")
    assert not (ckpt / "pruned").exists()


# -- session logs ------------------------------------------------------------------------------
def test_session_log_that_links_out_is_not_read(tmp_path: Path) -> None:
    sid = store.new_sid()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"request": {"spec": "demo:mlp"}, "actions": []}))
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / f"{sid}.json").symlink_to(elsewhere)
    assert store.load(sid, logs) is None
    store.save(sid, store.SavedSession({"spec": "demo:mlp"}), tmp_path / "own")
    loaded = store.load(sid, tmp_path / "own")
    assert loaded is not None and loaded.request == {"spec": "demo:mlp"}


# -- hand-edited configs the fuzz test found ---------------------------------------------------
@pytest.mark.parametrize(("key", "value", "match"), [
    ("architectures", 7, r"names architecture 7, which transformers"),
    ("architectures", ["__class__"], r"names architecture '__class__', which transformers"),
    ("use_cache", "yes", r"transformers cannot read .*config.json.*use_cache"),
    ("__class__", "x", r"transformers cannot read .*config.json': TypeError"),
])
def test_streamed_replay_of_a_hand_edited_config_is_one_line(
        ckpt: Path, tmp_path: Path, key: str, value: object, match: str) -> None:
    src = _copy(ckpt, tmp_path)
    edit_json(src / "config.json", lambda d: d.__setitem__(key, value))
    with pytest.raises(StreamError, match=match):
        replay_checkpoint(src, plan_for(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "match"), [
    ("tokenizer_class", 7, r"cannot load the tokenizer in .*: AttributeError"),
    ("model_max_length", "x", r"the tokenizer in .* cannot encode text: TypeError"),
])
def test_hand_edited_tokenizer_config_is_one_line(ckpt: Path, tmp_path: Path, key: str,
                                                  value: object, match: str) -> None:
    src = _copy(ckpt, tmp_path)
    add_tokenizer(src)
    edit_json(src / "tokenizer_config.json", lambda d: d.__setitem__(key, value))
    with pytest.raises(SpecError, match=match):
        load_model(f"hf:{src}")


def test_streamed_replay_of_an_index_with_odd_metadata(ckpt: Path, tmp_path: Path) -> None:
    src = _copy(ckpt, tmp_path)
    edit_json(src / INDEX, lambda d: d.__setitem__("metadata", [1]))
    replay_checkpoint(src, plan_for(ckpt), tmp_path / "out")
    written = json.loads((tmp_path / "out" / INDEX).read_text())
    assert set(written["metadata"]) == {"total_size"}
