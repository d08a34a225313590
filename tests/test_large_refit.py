"""The large-model path at parity with the in-memory one (issue 20 item 6): the same targets
and default, and ``--compensate lstsq`` refit one decoder layer at a time into a file beside
the plan, which ``replay --checkpoint`` writes into the pruned shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OFFLOAD_CAP

import explorer
from explorer import Pruner, load_model
from explorer.app.cli import main
from explorer.io.data import DataOptions, load_data
from explorer.io.export import export
from explorer.io.plan import REFIT_SCHEMA, Plan, PlanError
from explorer.io.refit import check_refit, read_refit, refit_file
from explorer.io.stream import replay_checkpoint

BATCH = 4


@pytest.fixture(scope="module")
def calib(ckpt: Path) -> Path:
    path = ckpt.parent / "refit-calib.pt"
    torch.save(torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(1)), path)
    return path


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a multi-shard bfloat16 checkpoint (as real large checkpoints ship)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bf16") / "ckpt"
    model = load_model("hf:llama?num_hidden_layers=3").model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


def _removed(plan: Path) -> list[tuple[str, int, list[int]]]:
    steps = json.loads(plan.read_text())["steps"]
    return sorted((t["tensor"], t["dim"], t["removed"]) for s in steps for t in s["tensors"])


def _prune(folder: Path, calib: Path, plan: Path, *extra: str) -> int:
    return main(["prune", "--model", f"hf:{folder}", "--importance", "activation", "--ratio",
                 "0.3", "--calibration", str(calib), "--batch-size", str(BATCH), "--plan",
                 str(plan), "--json", *extra])


def _large(folder: Path, calib: Path, plan: Path, work: Path, *extra: str) -> int:
    return _prune(folder, calib, plan, "--device", "meta", "--max-memory", OFFLOAD_CAP,
                  "--offload-folder", str(work), *extra)


@pytest.mark.parametrize("heads", [[], ["--heads", "dims"]], ids=["default", "dims"])
def test_meta_plan_cuts_what_the_in_memory_plan_cuts_by_default(
        ckpt: Path, calib: Path, tmp_path: Path, heads: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _prune(ckpt, calib, tmp_path / "memory.json", *heads) == 0
    assert _large(ckpt, calib, tmp_path / "meta.json", tmp_path / "off", *heads) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    memory, meta = _removed(tmp_path / "memory.json"), _removed(tmp_path / "meta.json")
    assert memory and meta == memory
    cut = {name for name, _dim, _idx in meta}
    assert not any("norm" in n or "embed" in n for n in cut)  # the residual stream stays
    attention = {n for n in cut if ".self_attn." in n}
    # a language model with real weights keeps its attention by default, on both paths
    assert attention if heads else not attention
    assert said["targets"]["default"] and "residual" not in said["targets"]["targets"]


def test_large_path_refit_replays_to_the_in_memory_model(
        ckpt: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert _large(ckpt, calib, plan, tmp_path / "off", "--heads", "whole",
                  "--compensate", "lstsq") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["refit"]["file"] == str(refit_file(plan)) and out["refit"]["created"] == 0
    # bias-less layers stay bias-less (so a config still describes the result)
    assert any("reconstruction (sequential least squares) kept in" in n for n in out["notes"])
    data = json.loads(plan.read_text())
    assert data["schema"] == REFIT_SCHEMA and data["refit"]["file"] == "plan.refit.safetensors"
    assert not list((tmp_path / "off").glob("refit/*"))  # the per-layer parts are gone

    lm = load_model(f"hf:{ckpt}")
    cal = load_data(calib, lm, DataOptions(None, 128, BATCH))
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                    heads="whole", calibration=cal, compensate="lstsq")
    pruner.step()
    assert main(["replay", "--checkpoint", str(ckpt), "--plan", str(plan), "--out",
                 str(tmp_path / "pruned"), "--json"]) == 0
    capsys.readouterr()
    # no bias was created and every layer keeps one width: a config describes the result
    assert (tmp_path / "pruned" / "config.json").is_file()
    streamed = load_model(f"hf:{tmp_path / 'pruned'}").model
    ours, theirs = streamed.state_dict(), lm.model.state_dict()
    assert set(ours) == set(theirs) and "model.layers.0.mlp.down_proj.bias" not in ours
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, lm.model(ids).logits,
                                   rtol=1e-4, atol=1e-5)

    # evaluate reads the pruned folder as hf:FOLDER
    assert main(["evaluate", "--model", f"hf:{tmp_path / 'pruned'}", "--reference",
                 f"hf:{ckpt}", "--eval", str(calib), "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)["quality"]
    assert quality["metric"] == "perplexity" and quality["after"] != quality["before"]

    # the same plan and refit file replayed in memory give the same model
    assert main(["replay", "--model", f"hf:{ckpt}", "--plan", str(plan), "--out",
                 str(tmp_path / "memory"), "--formats", "safetensors", "--json"]) == 0
    capsys.readouterr()
    again = explorer.load_pruned(f"hf:{ckpt}", tmp_path / "memory")
    for name, tensor in ours.items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_bf16_shards_refit_matches_the_in_memory_prune(
        bf16: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert _prune(bf16, calib, plan, "--device", "meta", "--max-memory", "150KB",
                  "--offload-folder", str(tmp_path / "off"), "--compensate", "lstsq") == 0
    capsys.readouterr()
    result = replay_checkpoint(bf16, Plan.load(plan), tmp_path / "pruned",
                               refit=check_refit(Plan.load(plan), plan))
    assert len(result.written) > 1
    streamed = load_model(f"hf:{tmp_path / 'pruned'}").model  # bias-less stays bias-less
    lm = load_model(f"hf:{bf16}")
    cal = load_data(calib, lm, DataOptions(None, 128, BATCH))
    Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3, calibration=cal,
           compensate="lstsq", heads="keep").step()  # the CLI's default on real weights
    assert next(streamed.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = streamed(ids).logits.float(), lm.model(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 2e-2  # bf16 rounding, not a different refit


def test_in_memory_refit_export_loads_back(ckpt: Path, calib: Path, tmp_path: Path) -> None:
    """A refit export loads back exactly with ``load_pruned`` (it refused the plan before);
    the refit adds no bias to bias-less layers, so the fingerprint is the original's."""
    lm = load_model(f"hf:{ckpt}")
    pruner = Pruner(lm.model, lm.example_inputs, importance="activation", ratio=0.3,
                    heads="whole", calibration=str(calib), compensate="lstsq")
    report = pruner.step()
    plan = Plan.from_pruner(pruner, f"hf:{ckpt}", reports=[report])
    # no bias created: the plan's fingerprint is the original model's, and the values
    # travel in the export's weights
    assert plan.refit is None and "model.layers.0.mlp.down_proj.bias" not in \
        lm.model.state_dict()
    export(lm.model, tmp_path / "out", ["safetensors"], plan=plan)
    loaded = explorer.load_pruned(None, tmp_path / "out")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm.model(ids).logits)


@pytest.fixture(scope="module")
def made(ckpt: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan with its refit file, from the large-model path."""
    folder = tmp_path_factory.mktemp("made")
    assert _large(ckpt, calib, folder / "plan.json", folder / "off", "--heads", "whole",
                  "--compensate", "lstsq") == 0
    return folder / "plan.json"


def _copy(made: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in (made, refit_file(made)):
        (dest / path.name).write_bytes(path.read_bytes())
    return dest / made.name


def test_refit_file_is_checked_as_untrusted_data(made: Path, tmp_path: Path) -> None:
    plan_file = _copy(made, tmp_path / "a")
    plan = Plan.load(plan_file)
    assert set(read_refit(plan, plan_file)) == set(plan.refit.shapes())  # type: ignore[union-attr]
    side = refit_file(plan_file)
    raw = bytearray(side.read_bytes())
    raw[-1] ^= 1
    side.write_bytes(bytes(raw))
    with pytest.raises(PlanError, match="its sha256 differs"):
        check_refit(plan, plan_file)
    side.unlink()
    with pytest.raises(PlanError, match="which does not exist"):
        check_refit(plan, plan_file)
    data = plan.to_dict()
    data["refit"]["file"] = "../outside.safetensors"
    data.pop("sha256")
    edited = tmp_path / "edited.json"
    Plan.from_dict({**data, "sha256": explorer.io.plan.checksum(data)}).save(edited)
    with pytest.raises(PlanError, match="outside its folder"):
        check_refit(Plan.load(edited), edited)
    lm = load_model(str(plan.model))
    with pytest.raises(PlanError, match="read them with explorer.io.refit.read_refit"):
        plan.apply(lm.model)
    assert not any(n.endswith("down_proj.bias") for n, _ in lm.model.named_parameters())


def test_plan_refit_field_is_validated(made: Path) -> None:
    data = json.loads(made.read_text())
    for change, message in [
            (lambda r: r.update(created=["model.layers.0.mlp.down_proj.weight"]),
             "'created' must list biases"),
            (lambda r: r.update(sha256="nope"), "'sha256' must be the 64 hex digits"),
            (lambda r: r.update(tensors=[]), "'tensors' must be a non-empty list"),
            (lambda r: r.update(extra=1), "unknown field 'extra'")]:
        bad = json.loads(json.dumps(data))
        change(bad["refit"])
        bad.pop("sha256")
        bad["sha256"] = explorer.io.plan.checksum(bad)
        with pytest.raises(PlanError, match=message):
            Plan.from_dict(bad)
    old = {**data, "schema": 3}
    old.pop("sha256")
    with pytest.raises(PlanError, match="'refit' needs schema 4"):
        Plan.from_dict({**old, "sha256": explorer.io.plan.checksum(old)})


@pytest.mark.parametrize(("extra", "message"), [
    (["--compensate", "bias"], "use lstsq or none"),
    (["--compensate", "lstsq", "--heads", "whole", "--no-plan"], "give --plan FILE"),
])
def test_large_refit_errors_are_one_line(ckpt: Path, calib: Path, tmp_path: Path,
                                         extra: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prune", "--model", f"hf:{ckpt}", "--importance", "activation", "--device", "meta",
            "--max-memory", OFFLOAD_CAP, "--calibration", str(calib)]
    if "--no-plan" in extra:
        extra = [e for e in extra if e != "--no-plan"]
    else:
        args += ["--plan", str(tmp_path / "plan.json")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not list(tmp_path.iterdir())


def test_in_memory_plan_says_it_lacks_the_refit(ckpt: Path, calib: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An in-memory prune with a refit cannot put the refit values in its plan: it says so
    (replaying that plan gives the plain cut) instead of leaving it to be found later."""
    assert _prune(ckpt, calib, tmp_path / "plan.json", "--compensate", "lstsq") == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("replaying it gives the plain cut" in n for n in notes), notes
    assert _prune(ckpt, calib, tmp_path / "plain.json") == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert not any("plain cut" in n for n in notes)
