"""Safety and all or nothing (issue 13): the safe format runs no code, every failed change
leaves the model exactly as it was, criteria leave modes and buffers alone, nonsense is refused."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tomllib
import torch
from modelstate import assert_same, capture
from torch import nn

from explorer import Plan, Pruner, load_model, load_pruned
from explorer.app.session import Session
from explorer.io.export import ExportError, export
from explorer.io.plan import PlanError, checksum
from explorer.io.specs import SpecError
from explorer.prune.importance import CRITERIA

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
from pathlib import Path
import torch
from torch import nn

Path(__file__).with_suffix(".ran").write_text("imported")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make():
    return Net(), torch.randn(2, 8)
'''


def _factory(tmp_path: Path, stem: str = "pe_safety_net") -> tuple[Path, Path]:
    path = tmp_path / f"{stem}.py"
    path.write_text(FACTORY)
    return path, path.with_suffix(".ran")


def _prune(spec: str, **kw: object) -> tuple[nn.Module, tuple, Plan]:
    lm = load_model(spec)
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, **kw)
    reports = [pruner.step() for _ in range(pruner.steps)]
    return lm.model, lm.example_inputs, Plan.from_pruner(pruner, spec, reports=reports)


def _resealed(data: dict) -> dict:
    data["sha256"] = checksum(data)
    return data


# -- 1. no code named by a file ----------------------------------------------------------
def test_loading_a_folder_never_imports_code_it_names(tmp_path: Path) -> None:
    path, ran = _factory(tmp_path)
    spec = f"{path}:make"
    model, inputs, plan = _prune(spec)
    out = tmp_path / "export"
    export(model, out, "safetensors", plan=plan)
    ran.unlink()
    with pytest.raises(ExportError, match=r"never runs code it names.*pass it yourself"):
        load_pruned(None, out)
    assert not ran.exists()
    again = load_pruned(spec, out)  # the caller names the file: that is their choice
    assert ran.exists()
    with torch.no_grad():
        assert torch.equal(again(*inputs), model(*inputs))


def test_specs_that_run_code_or_read_files_can_be_refused(tmp_path: Path) -> None:
    path, ran = _factory(tmp_path)
    with pytest.raises(SpecError, match=r"names a Python file, and running code .* is off"):
        load_model(f"{path}:make", allow_code=False)
    assert not ran.exists()
    with pytest.raises(SpecError, match=r"'checkpoint_path' would download or read a file"):
        load_model(f"timm:resnet18?checkpoint_path={tmp_path / 'evil.pt'}")


def test_app_serves_localhost_and_factory_specs_are_off(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("PRUNING_EXPLORER_ALLOW_FACTORY", raising=False)
    path, ran = _factory(tmp_path, "pe_safety_app")
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    app.text_input(key="model_spec").set_value(f"{path}:make").run()
    app.button(key="model_load").click().run()
    assert not ran.exists()
    assert any("running code from a spec is off" in e.value for e in app.error)
    assert not app.exception


# -- 2. all or nothing -------------------------------------------------------------------
class FrozenLinear(nn.Linear):
    """A linear layer whose widths are read-only once built (as in quantized layers)."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.frozen = True

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("in_features", "out_features") and getattr(self, "frozen", False):
            raise AttributeError(f"{name} is read-only")
        super().__setattr__(name, value)


def _frozen_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), FrozenLinear(16, 4))
    model[0].eval()  # mixed modes must survive too
    return model


def test_failure_while_patching_rolls_back_step_and_accept() -> None:
    model, x = _frozen_mlp(), torch.randn(4, 8)
    pruner = Pruner(model, (x,), ratio=0.5)
    before = capture(model)
    with pytest.raises(AttributeError, match="read-only"):
        pruner.step()
    assert_same(before, model)
    assert pruner.applied == [] and pruner.current_step == 0
    proposal = next(iter(pruner.proposals()))
    with pytest.raises(AttributeError, match="read-only"):
        proposal.accept()
    assert_same(before, model)
    assert pruner.applied == [] and not proposal.decided
    with torch.no_grad():
        model.eval()
        model(x)


def test_failure_while_replaying_rolls_back() -> None:
    twin = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    pruner = Pruner(twin, (x,), ratio=0.5)
    pruner.step()
    plan = Plan.from_pruner(pruner, "twin")
    model = _frozen_mlp()
    before = capture(model)
    with pytest.raises(AttributeError, match="read-only"):
        plan.apply(model, example_inputs=(x,))
    assert_same(before, model)


def test_plan_setting_a_buffer_is_refused_before_any_change() -> None:
    _m, _i, plan = _prune("demo:resnet")
    data = plan.to_dict()
    data["steps"][0]["attributes"]["bn1"] = {"num_batches_tracked": [0, 1]}
    fresh = load_model("demo:resnet").model
    before = capture(fresh)
    with pytest.raises(PlanError, match=r"bn1\.num_batches_tracked: is not an attribute"):
        Plan.from_dict(_resealed(data)).apply(fresh)
    assert_same(before, fresh)


def test_hf_vit_and_swin_steps_complete() -> None:
    from transformers import SwinConfig, SwinModel, ViTConfig, ViTModel
    x = torch.randn(1, 3, 32, 32)
    for model in (ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, image_size=32, patch_size=8)),
                  SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1],
                                       num_heads=[2], window_size=4))):
        model.eval()
        shape = model(x).last_hidden_state.shape
        pruner = Pruner(model, (x,), ratio=0.5)
        assert pruner.step()
        with torch.no_grad():
            assert model(x).last_hidden_state.shape == shape


@pytest.mark.parametrize("tamper", ["extra", "missing", "shape", "garbage"])
def test_load_pruned_bad_weights_leave_the_model(tmp_path: Path, tamper: str) -> None:
    from safetensors.torch import load_file, save_file
    model, _inputs, plan = _prune("demo:mlp")
    export(model, tmp_path, "safetensors", plan=plan)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    if tamper == "extra":
        state["fc9.weight"] = torch.zeros(2)
    elif tamper == "missing":
        del state["fc2.bias"]
    elif tamper == "shape":
        state["fc2.bias"] = torch.zeros(3)
    if tamper == "garbage":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        save_file(state, str(weights))
    fresh = load_model("demo:mlp").model
    fresh.train()
    before = capture(fresh)
    with pytest.raises(ExportError, match=r"weights .* do not fit|not a readable safetensors"):
        load_pruned(fresh, tmp_path)
    assert_same(before, fresh)


@pytest.mark.parametrize("text", [b"\xff\xfe{", b"[" * 100_000,
                                  b'{"schema": 1' + b"7" * 5000 + b"}", b'{"schema": true}'])
def test_app_plan_upload_is_one_error_and_no_change(text: bytes) -> None:
    lm = load_model("demo:mlp")
    session = Session(lm.model, lm.example_inputs, spec="demo:mlp")
    before = capture(session.model)
    assert not session.apply_plan(text)
    assert session.message is not None and session.message.kind == "error"
    assert "\n" not in session.message.text and "tensor(" not in session.message.text
    assert_same(before, session.model)


def test_app_plan_upload_of_a_corrupting_plan() -> None:
    _m, _i, plan = _prune("demo:mlp")
    data = plan.to_dict()
    module, attrs = next(iter(data["steps"][0]["attributes"].items()))
    attr = next(iter(attrs))
    attrs[attr] = [attrs[attr][0], 0]
    lm = load_model("demo:mlp")
    session = Session(lm.model, lm.example_inputs, spec="demo:mlp")
    before = capture(session.model)
    assert not session.apply_plan(json.dumps(_resealed(data)))
    assert f"{module}.{attr}" in session.message.text
    assert_same(before, session.model)


# -- 3. JSON limits ----------------------------------------------------------------------
@pytest.mark.parametrize("raw,match", [
    (b'{"schema": 1, "model": "\xff"}', r"plan file '.*bad\.json' is not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, r"nests JSON"),
    (b'{"schema": 1, "x": ' + b"9" * 5000 + b"}", r"an integer of 5000 digits"),
    (b'{"schema": true}', r"schema version True is not supported"),
    (b'{"schema": 1, "x": NaN}', r"non-JSON number NaN"),
])
def test_plan_json_limits(tmp_path: Path, raw: bytes, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(raw)
    with pytest.raises(PlanError, match=match):
        Plan.load(path)


# -- 4. criteria leave the model as they found it ----------------------------------------
@pytest.mark.parametrize("criterion", sorted({cls: name for name, cls in CRITERIA.items()}
                                              .values()))
def test_criteria_restore_modes_and_buffers(criterion: str) -> None:
    lm = load_model("demo:cnn_concat")
    model = lm.model
    model.train()
    model.stem.eval()  # a submodule the user froze: must stay in eval
    before = capture(model)
    pruner = Pruner(model, lm.example_inputs, importance=criterion, ratio=0.5)
    pruner.candidates()
    assert_same(before, model)


# -- 6. nonsense is refused --------------------------------------------------------------
def test_nonsense_settings_are_refused() -> None:
    lm = load_model("demo:resnet")
    with pytest.raises(ValueError, match=r"ignored module 'layer1\.0\.conv' is not in the model; "
                                         r"did you mean .*layer1\.0\.conv1"):
        Pruner(lm.model, lm.example_inputs, ignored=["layer1.0.conv"])
    for kw in ({"iterative_steps": 0}, {"round_to": 0}, {"round_to": -8}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            Pruner(lm.model, lm.example_inputs, **kw)
    with pytest.raises(SpecError, match=r"'num_hidden_layers' must be at least 1"):
        load_model("hf:llama?num_hidden_layers=-1")
    mlp = load_model("demo:mlp")
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        Pruner(mlp.model, mlp.example_inputs, importance="bn-scale").step()


# -- 7. user files are never lost --------------------------------------------------------
def test_export_refuses_a_full_folder_and_replaces_it_whole(tmp_path: Path) -> None:
    model, _inputs, plan = _prune("demo:mlp")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(ExportError, match="is not empty; .* --force"):
        export(model, out, "safetensors", plan=plan)
    assert (out / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    export(model, out, "safetensors", plan=plan, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors",
                                                     "plan.json"]


def test_concurrent_exports_never_mix(tmp_path: Path) -> None:
    model, _inputs, plan = _prune("demo:mlp")
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def run(formats: str) -> None:
        try:
            export(model, out, formats, plan=plan, force=True)
        except ExportError:  # losing a race is allowed (one clear error); mixing is not
            pass
        except BaseException as e:  # noqa: BLE001 - anything else fails the test below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f,)) for f in ("pt", "safetensors") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = sorted(p.name for p in out.iterdir())
    assert names in (["README.md", "model.pt"], ["README.md", "model.safetensors", "plan.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 9. a factory's model.pt loads elsewhere ---------------------------------------------
def test_factory_model_pt_loads_in_another_process(tmp_path: Path) -> None:
    path, _ran = _factory(tmp_path, "pe_safety_pickled")
    lm = load_model(f"{path}:make")
    torch.save(lm.model, tmp_path / "model.pt")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); "
            "m = torch.load(sys.argv[2], weights_only=False); print(type(m).__module__)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pe_safety_pickled"


def test_nan_weights_are_named_and_never_pruned(tmp_path: Path) -> None:
    """Issue 22: NaN/Inf weights loaded without a word and were pruned on."""
    lm = load_model("hf:llama?num_hidden_layers=1")
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, :5] = float("nan")
    lm.model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(f"hf:{tmp_path / 'ckpt'}")
    assert any("are not finite: 'model.layers.0.mlp.up_proj.weight' holds 5 NaN/Inf value(s)"
               in n for n in loaded.notes), loaded.notes
    pruner = Pruner(loaded.model, loaded.example_inputs, ratio=0.25)
    assert pruner.groups and pruner.proposals()  # inspecting still works
    shapes = {k: v.shape for k, v in loaded.model.state_dict().items()}
    for prune in (pruner.step, lambda: pruner.apply(pruner.propose()[0])):
        with pytest.raises(ValueError, match=r"weights are not finite: 'model\.layers\.0\.mlp"
                                             r"\.up_proj\.weight' holds 5 NaN/Inf .*nothing "
                                             r"is pruned"):
            prune()
    assert {k: v.shape for k, v in loaded.model.state_dict().items()} == shapes
    s = Session(loaded.model, loaded.example_inputs)
    assert not s.accept(s.current()) and s.message is not None
    assert "weights are not finite" in s.message.text
    mlp = load_model("demo:mlp")
    export(mlp.model, tmp_path / "out", ("safetensors",), plan=Plan.from_pruner(
        Pruner(mlp.model, mlp.example_inputs), "demo:mlp"))
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "out" / "model.safetensors")
    state["fc2.bias"][0] = float("inf")
    save_file(state, tmp_path / "out" / "model.safetensors")
    with pytest.warns(RuntimeWarning, match=r"are not finite: 'fc2\.bias' holds 1 NaN/Inf"):
        load_pruned("demo:mlp", tmp_path / "out")
