"""Plans: replay identity (oracle 4), meta-made plans on real weights, every malformed plan."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from explorer import Pruner, load_model
from explorer.io.plan import SCHEMA, Plan, PlanError, checksum

VIT = "timm:vit_tiny_patch16_224?img_size=64&depth=2"


@dataclass
class Pruned:
    spec: str
    model: nn.Module
    inputs: tuple
    plan: Plan


def _prune(spec: str, device: str = "cpu", **kw: object) -> Pruned:
    lm = load_model(spec, device=device)
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, **kw, targets="all")
    reports = [pruner.step() for _ in range(pruner.steps)]
    return Pruned(spec, lm.model, lm.example_inputs,
                  Plan.from_pruner(pruner, spec, reports=reports))


@pytest.fixture(scope="module")
def resnet() -> Pruned:
    return _prune("demo:resnet")


@pytest.fixture(scope="module")
def vit() -> Pruned:
    return _prune(VIT)


@pytest.fixture(scope="module")
def llama() -> Pruned:
    return _prune("demo:llama", heads="whole")


@pytest.fixture(scope="module")
def mlp2() -> Pruned:
    """Two steps, so a bad second step must leave the first one unapplied too."""
    return _prune("demo:mlp", iterative_steps=2)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _replayed(p: Pruned, tmp_path: Path) -> nn.Module:
    path = tmp_path / "plan.json"
    p.plan.save(path)
    fresh = load_model(p.spec).model
    Plan.load(path).apply(fresh)
    return fresh


@pytest.mark.parametrize("name", ["resnet", "vit", "llama", "mlp2"])
def test_replay_identity(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    p: Pruned = request.getfixturevalue(name)
    fresh = _replayed(p, tmp_path)
    _assert_same_state(p.model.state_dict(), fresh.state_dict())
    ours = dict(fresh.named_parameters())
    for n, t in p.model.named_parameters():
        assert isinstance(ours[n], nn.Parameter) and ours[n].requires_grad == t.requires_grad
    for (n, m), (_, m2) in zip(p.model.named_modules(), fresh.named_modules(), strict=False):
        for attr in ("in_features", "out_features", "num_features", "normalized_shape",
                     "num_heads", "head_dim", "num_key_value_groups"):
            assert getattr(m, attr, None) == getattr(m2, attr, None), f"{n}.{attr}"
    with torch.no_grad():
        a, b = p.model(*p.inputs), fresh(*p.inputs)
    a, b = (getattr(x, "logits", x) for x in (a, b))
    assert torch.equal(a, b)


def test_plan_json_is_readable(resnet: Pruned, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    resnet.plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["model"] == "demo:resnet"
    assert data["input_shapes"] == [list(resnet.inputs[0].shape)]
    assert len(data["fingerprint"]["sha256"]) == 64
    assert ["conv1.weight", [16, 3, 3, 3]] in data["fingerprint"]["tensors"]
    cut = data["steps"][0]["tensors"][0]
    assert set(cut) == {"tensor", "dim", "size_before", "removed"}
    assert len(cut["removed"]) == cut["size_before"] // 2
    assert data["steps"][0]["attributes"]["conv1"]["out_channels"] == [16, 8]
    assert data["steps"][0]["head_mode"] == "dims" and data["steps"][0]["title"]
    assert Plan.load(path) == Plan.from_dict(data)
    assert '"removed": [' in path.read_text()  # index lists on one line


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    p = _prune("hf:gpt2", heads="whole")
    fresh = _replayed(p, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    _assert_same_state(p.model.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("name,spec", [("vit", VIT), ("llama", "demo:llama")])
def test_meta_plan_on_cpu_weights(name: str, spec: str, request: pytest.FixtureRequest) -> None:
    cpu: Pruned = request.getfixturevalue(name)
    meta = _prune(spec, device="meta", heads="whole" if name == "llama" else "dims")
    assert next(meta.model.parameters()).device.type == "meta"
    fresh = load_model(spec)
    meta.plan.apply(fresh.model)
    shapes = {k: v.shape for k, v in fresh.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in cpu.model.state_dict().items()}
    with torch.no_grad():
        out = fresh.model(*fresh.example_inputs)
    assert torch.isfinite(getattr(out, "logits", out)).all()


def test_llama_config_follows_replay(llama: Pruned, tmp_path: Path) -> None:
    fresh = load_model("demo:llama").model
    replay = llama.plan.apply(fresh)
    assert replay.config.ok, replay.config.reason
    cfg = fresh.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (32, 4, 1, 64)


# -- malformed plans: a clear PlanError and the model untouched --------------------------
def _edited(plan: Plan, tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = plan.to_dict()
    edit(data)
    data["sha256"] = checksum(data)  # as a user who edits on purpose would
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _bad_second_step(data: dict) -> None:
    cut = data["steps"][1]["tensors"][0]
    cut["removed"] = cut["removed"] + [cut["size_before"] + 5]


def _missing_tensor(data: dict) -> None:
    data["steps"][-1]["tensors"][0]["tensor"] = "no.such.weight"


def _wrong_schema(data: dict) -> None:
    data["schema"] = 5


def _fold_in_schema_2(data: dict) -> None:
    data["steps"][0]["constants"] = {"net.0": {"scaling": [0.25, 0.5]}}


def _fold_unknown(data: dict) -> None:
    data["schema"] = 3
    data["steps"][0]["constants"] = {"net.0": {"scaling": [0.25, 0.5]}}


def _bad_constants(data: dict) -> None:
    data["schema"] = 3
    data["steps"][0]["constants"] = {"net.0": {"_parameters": [0.25, -1.0]}}


def _edited_fingerprint(data: dict) -> None:
    data["fingerprint"]["tensors"][0][1] = [1]


def _wrong_size(data: dict) -> None:
    data["steps"][0]["tensors"][0]["size_before"] += 1


def _all_removed(data: dict) -> None:
    cut = data["steps"][0]["tensors"][0]
    cut["removed"] = list(range(cut["size_before"]))


def _bad_type(data: dict) -> None:
    data["steps"][0]["tensors"][0]["removed"] = "1,2"


def _bad_attribute(data: dict) -> None:
    data["steps"][0]["attributes"]["no_such_module"] = {"in_features": [1, 2]}


@pytest.mark.parametrize("edit,match", [
    (_bad_second_step, r"step 1: index \d+ is out of range for tensor '.*' dim \d of size"),
    (_missing_tensor, r"the model has no parameter or buffer 'no.such.weight'"),
    (_wrong_schema, r"schema version 5 is not supported; this Pruning Explorer reads schema 2 "
                    r"\(and 3, with folded constants, 4, with refit tensors\)"),
    (_fold_in_schema_2, r"steps fold constants, which needs schema 3"),
    (_fold_unknown, r"the plan folds constants into weights, but the model has no constant "
                    r"net\.0\.scaling to fold; re-create the plan"),
    (_bad_constants, r"'constants' must map module -> attribute -> \[old, new\] positive reals"),
    (_edited_fingerprint, r"sha256 does not match its tensor list"),
    (_wrong_size, r"step 0: tensor '.*' dim \d has size \d+ at this step, the plan expects"),
    (_all_removed, r"removes all \d+ indices"),
    (_bad_type, r"steps\[0\]\.tensors\[0\]: 'removed' must be a list of integers"),
    (_bad_attribute, r"step 0: the model has no module 'no_such_module'"),
])
def test_malformed_plan(mlp2: Pruned, tmp_path: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    fresh = load_model("demo:mlp").model
    before = _state(fresh)
    with pytest.raises(PlanError, match=match):
        Plan.load(_edited(mlp2.plan, tmp_path, edit)).apply(fresh)
    _assert_same_state(before, fresh.state_dict())


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"schema": 1, "model": ')
    with pytest.raises(PlanError, match=r"is not valid JSON: .* line 1 column"):
        Plan.load(path)
    with pytest.raises(PlanError, match=r"cannot read plan file"):
        Plan.load(tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(PlanError, match=r"top level must be a JSON object"):
        Plan.load(path)


def test_other_models_plan(resnet: Pruned) -> None:
    other = load_model("demo:cnn_concat").model
    before = _state(other)
    with pytest.raises(PlanError, match=r"for another model .* 'demo:resnet'"):
        resnet.plan.apply(other)
    _assert_same_state(before, other.state_dict())


def test_applying_twice_is_refused(mlp2: Pruned) -> None:
    fresh = load_model("demo:mlp").model
    mlp2.plan.apply(fresh)
    before = _state(fresh)
    with pytest.raises(PlanError, match=r"has shape .* in the model but .* already pruned"):
        mlp2.plan.apply(fresh)
    _assert_same_state(before, fresh.state_dict())


def test_from_applied_matches_from_pruner(mlp2: Pruned) -> None:
    lm = load_model("demo:mlp")
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.5, iterative_steps=2, targets="all")
    pruner.step()
    pruner.step()
    plan = Plan.from_applied(pruner.applied, lm.model, "demo:mlp",
                             [list(lm.example_inputs[0].shape)])
    assert plan.fingerprint == mlp2.plan.fingerprint
    assert [s.tensors for s in plan.steps] == [s.tensors for s in mlp2.plan.steps]
    copy.deepcopy(plan)  # plain data
