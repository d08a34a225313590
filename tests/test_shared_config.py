"""Heads of an attention whose forward reads a count through the config every layer shares
(issue 20, "heads, honestly"): Phi3's ``query_pos = self.config.num_attention_heads *
self.head_dim``. A cut gives the module its own config copy with the new count; the pruned
model equals the masked original, undo puts the shared object itself back, a failure midway
leaves every config as it was, and exports say what a config can describe."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from modelstate import assert_same, capture
from test_heads import _zeroed
from torch import nn

from explorer import Plan, Pruner, load_model, load_pruned
from explorer.coupling.vocab import AxisRole
from explorer.io.export import export
from explorer.io.plan import PlanError, checksum
from explorer.prune import removal as removal_module
from explorer.prune.fixups.configs import config_reads
from explorer.prune.preflight import Preflight
from explorer.prune.removal import Removal
from explorer.prune.uniform import breaks_uniform

transformers = pytest.importorskip("transformers")

SPEC = "hf:phi3"  # 2 layers, 8 query heads in 2 key/value groups of head dim 8


def _attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Phi3Attention"]


def _removal(pruner: Pruner, role: AxisRole, layers: int | None = None) -> Removal:
    """Every other index of each ``role`` axis of the head group (the first ``layers``
    such axes only, when given: a cut of some layers)."""
    [group] = [g for g in pruner.coupling.groups if g.heads is not None]
    axes = [i for i, a in enumerate(group.axes) if a.role == role and a.prunable]
    removal = Removal()
    for i in axes[:layers]:
        size = group.axes[i].size
        removal.add(group.id, i, list(range(1, size, 2)))
    return removal


def _logits(model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits  # type: ignore[no-any-return]


def test_phi3_reads_its_head_count_through_the_shared_config() -> None:
    lm = load_model(SPEC)
    attention = _attention(lm.model)
    assert len(attention) == 2 and all(a.config is lm.model.config for a in attention)
    reads = config_reads(attention[0])
    assert "num_attention_heads" in reads and "modeling_phi3.py:" in reads["num_attention_heads"]


@pytest.mark.parametrize("role", [AxisRole.HEADS, AxisRole.HEAD_REPEAT],
                         ids=["whole", "query"])
def test_phi3_head_cut_equals_masked_original_and_exports_hf(tmp_path: Path,
                                                             role: AxisRole) -> None:
    """Every layer cut alike: the pruned model equals the original with the same heads
    zeroed, the model's config says the new counts and the attention modules read it again
    (no copy left), the ``hf`` folder reloads to the same logits, and undo puts back the
    shared config object with its values."""
    lm = load_model(SPEC)
    model, inputs = lm.model, lm.example_inputs
    shared, fields = model.config, dict(vars(model.config))
    pruner = Pruner(model, inputs, heads="whole" if role is AxisRole.HEADS else "query",
                    targets="heads")
    before = _logits(model, inputs)
    removal = _removal(pruner, role)
    assert Preflight(model, inputs, pruner.coupling).check(removal).ok
    masked = _zeroed(model, pruner.coupling, removal)
    applied = pruner.apply(removal)
    want = (4, 1) if role is AxisRole.HEADS else (4, 2)  # kv groups go with their queries
    assert (shared.num_attention_heads, shared.num_key_value_heads) == want
    for name in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        assert applied.attributes[name]["config.num_attention_heads"] == [8, 4]
    assert all(a.config is shared for a in _attention(model))  # rejoined: the config says it
    torch.testing.assert_close(_logits(model, inputs), _logits(masked, inputs),
                               atol=1e-5, rtol=1e-4)
    result = export(model, tmp_path / "out", ["hf"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(result.files["hf"][0]).eval()
    assert reloaded.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs),
                               atol=1e-5, rtol=1e-4)
    fresh = load_model(SPEC).model  # the plan replayed: the same, its config read again
    replay = Plan.from_pruner(pruner, SPEC).apply(fresh)
    assert fresh.config.num_attention_heads == 4 and replay.config.ok
    assert all(a.config is fresh.config for a in _attention(fresh))
    pruner.undo()
    assert model.config is shared and vars(shared) == fields
    assert all(a.config is shared for a in _attention(model))
    torch.testing.assert_close(_logits(model, inputs), before, atol=0, rtol=0)


def test_phi3_one_layer_cut_gets_its_own_config_and_exports_a_plan(tmp_path: Path) -> None:
    """Layer 0 alone loses a key/value group: it reads 4 heads from its own config copy,
    layer 1 and the model's config keep 8; the export says no config describes the model
    and writes safetensors + plan, whose replay gives the same logits; undo puts the shared
    object back in layer 0."""
    lm = load_model(SPEC)
    model, inputs = lm.model, lm.example_inputs
    shared = model.config
    pruner = Pruner(model, inputs, heads="whole", targets="heads")
    removal = _removal(pruner, AxisRole.HEADS, layers=1)
    # what the app's Groups page says before such a cut (`app.decide.widths_differ`)
    assert "model.layers.*.self_attn.qkv_proj.weight: 48x64 in model.layers.0, 96x64 in " \
        "model.layers.1" in breaks_uniform(model, pruner.coupling, removal)
    masked = _zeroed(model, pruner.coupling, removal)
    pruner.apply(removal)
    first, second = _attention(model)
    assert first.config is not shared and first.config.num_attention_heads == 4
    assert second.config is shared and shared.num_attention_heads == 8
    torch.testing.assert_close(_logits(model, inputs), _logits(masked, inputs),
                               atol=1e-5, rtol=1e-4)
    plan = Plan.from_pruner(pruner, SPEC)
    result = export(model, tmp_path / "out", ["hf"], plan=plan)
    assert "hf" not in result.files
    assert any("load with explorer.load_pruned" in m for m in result.messages), result.messages
    steps = json.loads((tmp_path / "out" / "plan.json").read_text())["steps"]
    assert steps[0]["attributes"]["model.layers.0.self_attn"]["config.num_attention_heads"] \
        == [8, 4]
    assert "model.layers.1.self_attn" not in steps[0]["attributes"]
    loaded = load_pruned(None, tmp_path / "out")
    assert _attention(loaded)[0].config.num_attention_heads == 4
    assert _attention(loaded)[1].config is loaded.config
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs),
                               atol=1e-5, rtol=1e-4)
    pruner.undo()
    assert all(a.config is shared for a in _attention(model))


def test_failure_midway_leaves_every_config_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut that fails after the attention modules got their config copies (a later fix-up
    raises), and a plan replay that fails after setting them: model, config objects and
    their fields, tensors and modes exactly as before."""
    lm = load_model(SPEC)
    model, inputs = lm.model, lm.example_inputs
    pruner = Pruner(model, inputs, heads="whole", targets="heads")
    removal = _removal(pruner, AxisRole.HEADS)
    twin = load_model(SPEC).model
    done = Pruner(twin, inputs, heads="whole", targets="heads")
    done.apply(_removal(done, AxisRole.HEADS, layers=1))
    plan = Plan.from_pruner(done, SPEC)
    before = capture(model)
    copied: list[bool] = []

    def boom(*_args: object) -> None:  # after the copies: the layers read their own
        copied.append(all(a.config is not model.config for a in _attention(model)[:1]))
        raise RuntimeError("fix-up failed")

    with monkeypatch.context() as m:
        m.setattr(removal_module, "patch_widths", boom)
        with pytest.raises(RuntimeError, match="fix-up failed"):
            pruner.apply(removal)
    assert_same(before, model)
    assert pruner.applied == []
    with monkeypatch.context() as m:
        m.setattr("explorer.prune.fixups.hfconfig.update_config", boom)
        with pytest.raises(RuntimeError, match="fix-up failed"):
            plan.apply(model)
    assert_same(before, model)
    assert copied == [True, True]


def _resealed(data: dict[str, Any]) -> dict[str, Any]:
    data["sha256"] = checksum(data)
    return data


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.update({"config.vocab_size": [256, 128]}),
     r"config\.vocab_size: is not an attribute the pruner writes"),
    (lambda a: a.update({"config.num_attention_heads": [6, 4]}),
     r"config\.num_attention_heads is 8 in the model, the plan expects 6"),
], ids=["not a head field", "another count"])
def test_plan_config_fields_are_checked_before_any_change(edit: Any, match: str) -> None:
    """A plan may set only head fields on a module's config, from the value the model has."""
    lm = load_model(SPEC)
    pruner = Pruner(lm.model, lm.example_inputs, heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    data = Plan.from_pruner(pruner, SPEC).to_dict()
    edit(data["steps"][0]["attributes"]["model.layers.0.self_attn"])
    fresh = load_model(SPEC).model
    before = capture(fresh)
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(_resealed(data)).apply(fresh)
    assert_same(before, fresh)


def test_groups_page_says_a_one_layer_head_cut_leaves_no_from_pretrained_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app on Phi3 with whole heads: the proposal cuts a key/value group in each layer;
    with layer 1's count set to 0 the page says, before Accept, that widths would differ and
    the export falls back to safetensors + plan; the accept gives layer 0 its own config,
    and undo puts the shared one back."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path / "sessions"))
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                            default_timeout=120).run()
    app.text_input(key="model_spec").set_value(SPEC)
    app.radio(key="model_device").set_value("cpu")
    app.button(key="model_load").click().run()
    app.switch_page("pages/3_groups.py").run()
    app.selectbox(key="groups_heads").set_value("whole").run()
    app.multiselect(key="groups_targets").set_value(["heads"]).run()
    assert [n.label for n in app.number_input if n.key.startswith("groups_count_")] == [
        "Remove key/value groups of layer 0 (of 2)", "Remove key/value groups of layer 1 (of 2)"]
    app.number_input(key="groups_count_1").set_value(0).run()
    assert not app.exception, app.exception
    [warning] = [w.value for w in app.warning]
    assert warning.startswith("Accepting this makes widths differ between layers, so no "
                              "transformers config describes the result")
    assert "falls back to safetensors + plan.json" in warning and \
        "qkv_proj.weight: 48x64 in model.layers.0, 96x64 in model.layers.1" in warning
    app.button(key="groups_accept").click().run()
    pe = app.session_state.pe
    assert not app.exception and pe.message.kind == "success", pe.message
    model = pe.model
    first, second = _attention(model)
    assert first.config is not model.config and first.config.num_attention_heads == 4
    assert second.config is model.config and model.config.num_attention_heads == 8
    assert pe.undo() and all(a.config is model.config for a in _attention(model))


def test_a_recorded_cut_redoes_the_config_copy_and_undoes_it() -> None:
    """A saved session's accept is redone from its step record (`io.plan.redo_step`): layer
    0 gets its own config with the recorded count again, the logits are the live cut's, and
    the undo puts the shared object back."""
    from explorer.io.plan import redo_step, step_record
    from explorer.prune.removal import undo

    lm = load_model(SPEC)
    model = copy.deepcopy(lm.model)  # the same weights, its own config object
    pruner = Pruner(lm.model, lm.example_inputs, heads="whole", targets="heads")
    record = step_record(pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1)))
    assert record is not None
    applied = redo_step(model, json.loads(json.dumps(record)))
    first, second = _attention(model)
    assert first.config is not model.config and first.config.num_attention_heads == 4
    assert second.config is model.config and model.config.num_attention_heads == 8
    torch.testing.assert_close(_logits(model, lm.example_inputs),
                               _logits(lm.model, lm.example_inputs), atol=0, rtol=0)
    undo(model, applied)
    assert all(a.config is model.config for a in _attention(model))
