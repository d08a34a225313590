"""Streaming replay of a plan onto a sharded transformers checkpoint (explorer.io.stream)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from explorer import Plan, Pruner, load_model, load_pruned
from explorer.app.cli import main
from explorer.io.stream import OutputKind, StreamError, replay_checkpoint

SHARD = "100KB"  # the tiny llama (about 0.4 MB in fp32) becomes 5 shards


@dataclass
class Ckpt:
    folder: Path
    spec: str  # hf:<folder>/config.json


def _checkpoint(root: Path, **config: object) -> Ckpt:
    query = "&".join(f"{k}={v}" for k, v in config.items())
    lm = load_model("hf:llama" + (f"?{query}" if query else ""))
    folder = root / "ckpt"
    lm.model.save_pretrained(folder, max_shard_size=SHARD)
    return Ckpt(folder, f"hf:{folder}/config.json")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Ckpt:
    torch.manual_seed(0)
    return _checkpoint(tmp_path_factory.mktemp("llama"))


def _plan(ckpt: Ckpt, **kw: object) -> Plan:
    """A plan made on a weightless (meta) copy of the checkpoint's architecture."""
    lm = load_model(ckpt.spec, device="meta")
    pruner = Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.25, **kw,
                    targets="all")
    reports = [pruner.step()]
    return Plan.from_pruner(pruner, ckpt.spec, reports=reports)


def _in_memory(ckpt: Ckpt, plan: Plan) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(ckpt.folder, attn_implementation="eager")
    plan.apply(model)
    return model.eval()


def _shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            out.update({k: f.get_tensor(k).clone() for k in names})  # not a file view
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(16).reshape(1, 16) * 7 % 256
    with torch.no_grad():
        return model(ids).logits


def test_streaming_equals_in_memory_replay(ckpt: Ckpt, tmp_path: Path) -> None:
    plan = _plan(ckpt, heads="whole")
    res = replay_checkpoint(ckpt.folder, plan, tmp_path / "out")
    assert res.kind is OutputKind.HF and len(res.written) == 5 and not res.skipped
    assert res.config_changed == {"hidden_size": [64, 48], "intermediate_size": [128, 96]}
    reference = _in_memory(ckpt, plan)
    expected = reference.state_dict()
    got = _shard_tensors(tmp_path / "out")
    assert set(got) == set(_shard_tensors(ckpt.folder))
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name  # bit-identical values and shapes
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in got.values())
    assert (tmp_path / "out" / "generation_config.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                 attn_implementation="eager").eval()
    assert torch.equal(_logits(again), _logits(reference))


def test_non_uniform_widths_write_plan_and_shards(ckpt: Ckpt, tmp_path: Path) -> None:
    lm = load_model(ckpt.spec, device="meta")
    pruner = Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.0,
                    ratios={"model.layers.0.mlp": 0.5}, targets="all")
    plan = Plan.from_pruner(pruner, ckpt.spec, reports=[pruner.step()])
    out = tmp_path / "out"
    res = replay_checkpoint(ckpt.folder, plan, out)
    assert res.kind is OutputKind.SAFETENSORS
    assert "intermediate_size differs between layers" in res.messages[0]
    assert not (out / "config.json").exists() and (out / "plan.json").is_file()
    again = load_pruned(f"hf:{out}/original_config.json", out)
    assert again.model.layers[0].mlp.up_proj.out_features == 64
    assert torch.equal(_logits(again), _logits(_in_memory(ckpt, plan)))


def test_other_checkpoints_plan_is_refused_before_writing(ckpt: Ckpt, tmp_path: Path) -> None:
    other = _checkpoint(tmp_path, intermediate_size=96)
    plan = _plan(ckpt, heads="whole")
    out = tmp_path / "out"
    with pytest.raises(StreamError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has "
                                          r"shape \(64, 96\) in the checkpoint but \(64, 128\)"):
        replay_checkpoint(other.folder, plan, out)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamError, match=r"has no config.json"):
        replay_checkpoint(tmp_path / "empty", plan, out)
    with pytest.raises(StreamError, match=r"--out '.*ckpt' is '.*ckpt', which this run reads"):
        replay_checkpoint(ckpt.folder, plan, ckpt.folder)
    assert not out.exists()


def test_resume_skips_finished_shards(ckpt: Ckpt, tmp_path: Path) -> None:
    plan = _plan(ckpt, heads="whole")
    out = tmp_path / "out"
    replay_checkpoint(ckpt.folder, plan, out)
    clean = _shard_tensors(out)
    # An interruption after three shards: the fourth half-written (.tmp, no marker), the
    # fifth a truncated file without its marker, no index or config yet.
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    (out / (shards[3] + ".tmp")).write_bytes(b"partial")
    (out / shards[3]).unlink()
    (out / ".stream" / (shards[3] + ".done")).unlink()
    (out / shards[4]).write_bytes((out / shards[4]).read_bytes()[:100])
    (out / ".stream" / (shards[4] + ".done")).unlink()
    for name in ("model.safetensors.index.json", "config.json"):
        (out / name).unlink()
    res = replay_checkpoint(ckpt.folder, plan, out)
    assert res.skipped == shards[:3] and res.written == shards[3:]
    resumed = _shard_tensors(out)
    assert set(resumed) == set(clean)
    assert [k for k in clean if not torch.equal(resumed[k], clean[k])] == []
    assert (out / "config.json").is_file() and not list(out.glob("*.tmp"))
    # Another plan: no marker matches, every shard is cut again.
    res = replay_checkpoint(ckpt.folder, _plan(ckpt, heads="dims"), out)
    assert res.written == shards and not res.skipped


def test_cli_replay_checkpoint(ckpt: Ckpt, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    plan_file = tmp_path / "plan.json"
    _plan(ckpt, heads="whole").save(plan_file)
    out = tmp_path / "out"
    assert main(["replay", "--checkpoint", str(ckpt.folder), "--plan", str(plan_file),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "hf" and len(summary["written"]) == 5
    shutil.copytree(ckpt.folder, tmp_path / "broken")
    (tmp_path / "broken" / "model-00002-of-00005.safetensors").unlink()
    assert main(["replay", "--checkpoint", str(tmp_path / "broken"), "--plan", str(plan_file),
                 "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{tmp_path / 'broken' / 'model.safetensors.index.json'}' "
                          f"names shard 'model-00002-of-00005.safetensors', which is not a file")
    assert main(["replay", "--plan", str(plan_file), "--out", str(out)]) == 2
    assert "replay needs --model SPEC, or --checkpoint DIR" in capsys.readouterr().err


def test_single_file_bf16_checkpoint(ckpt: Ckpt, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt.folder).to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)  # one model.safetensors, no index
    plan = _plan(ckpt, heads="whole")
    res = replay_checkpoint(folder, plan, tmp_path / "out")
    assert res.written == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    plan.apply(model, update_config=False)  # hfconfig compares bf16 rotary buffers to fp32
    got = _shard_tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in got.items())
