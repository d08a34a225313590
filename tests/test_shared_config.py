"""Heads of an attention whose forward reads a count through the config every layer shares
(issue 20, "heads, honestly"): Phi3's ``query_pos = self.config.num_attention_heads *
self.head_dim``. A cut gives the module its own config copy with the new count; the pruned
model equals the masked original, undo puts the shared object itself back, a failure midway
leaves every config as it was, and exports say what a config can describe."""
from __future__ import annotations

import copy
import inspect
import json
import re
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
from explorer.prune.fixups.reads import config_reads
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


def _tiny(model_type: str) -> nn.Module:
    from test_families import FAMILIES
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **FAMILIES[model_type][1])).eval()


def test_gpt_neox_one_layer_head_cut_says_which_line_no_config_can_size(
        tmp_path: Path) -> None:
    """GPT-NeoX sizes its fused ``query_key_value`` as ``3 * hidden_size`` rows, so no config
    describes a head cut that keeps the residual stream. The reason was a raw shape message
    ("'...query_key_value.weight' is (96, 64) but the config builds (192, 64)"); it now says
    what is refused, the module and the model line that builds it, the field that also sizes
    a kept tensor, and what to do, in the step's note and the export's."""
    model = _tiny("gpt_neox")
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    pruner = Pruner(model, (ids,), heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    note = pruner.config_note
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    assert note.startswith(f"no GPTNeoXConfig sizes {qkv} as cut (96 x 64, was 192 x 64): `")
    assert re.search(r"modeling_gpt_neox\.py:\d+` \(`self\.query_key_value = nn\.Linear\("
                     r"config\.hidden_size, 3 \* config\.hidden_size", note), note
    assert "builds it from hidden_size, and hidden_size also sizes gpt_neox.embed_in.weight " \
        "(dim 1: 64, kept)" in note
    assert note.endswith(f"for a from_pretrained folder leave {qkv} out of the cut")
    assert "but the config builds" not in note
    where = note.split("`")[1]  # the model line is real: it builds query_key_value
    path, line = where.rsplit(":", 1)
    assert "self.query_key_value =" in Path(path).read_text().splitlines()[int(line) - 1]
    result = export(model, tmp_path / "out", ["hf"], plan=Plan.from_pruner(pruner, "gpt_neox"))
    (said,) = result.messages
    assert "hf" not in result.files and note in said


def test_every_line_that_may_build_the_module_is_named() -> None:
    """GPT-2 builds ``c_attn`` in one of two branches (cross-attention or not): both lines."""
    model = _tiny("gpt2")
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    pruner = Pruner(model, (ids,), heads="whole", targets="heads", ratio=0.5,
                    importance="random")
    assert pruner.step()
    note = pruner.config_note
    assert "`self.c_attn = Conv1D(2 * self.embed_dim, self.embed_dim)`) or `" in note, note
    assert "`self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)`) builds it from " \
        "n_embd, and n_embd also sizes transformer.wte.weight (dim 1: 64, kept)" in note


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
    # the Export page says why no config describes it once: before a build in its own line,
    # after an hf build in the export's note only (it was said in both, and twice in those)
    app.switch_page("pages/5_export.py").run()
    [said] = [i.value for i in app.info if "cannot describe" in i.value]
    assert said.startswith("The transformers config cannot describe the pruned model: "
                           "num_attention_heads differs between layers"), said
    app.multiselect(key="export_formats").set_value(["hf"]).run()
    app.button(key="export_build").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    assert not [i.value for i in app.info if "cannot describe" in i.value]
    notes = [c.value for c in app.caption if "num_attention_heads differs" in c.value]
    assert len(notes) == 1 and notes[0].startswith("hf: no transformers folder: "), notes
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


# -- a one-layer head cut says what differs; plans that recorded the decoder layer's width ----
@pytest.mark.parametrize("spec", ["hf:phi3", "hf:llama"])
def test_one_layer_head_cut_names_the_head_counts_that_differ(spec: str) -> None:
    """Layer 0 alone loses a key/value group: why no config describes the model names the
    head counts per layer (Phi3 reads them from its own config copy, Llama from its weights),
    not the decoder layer's ``hidden_size``, which the cut leaves at the residual's 64 (no
    code reads it; it used to be set from the attention's 64 -> 32)."""
    lm = load_model(spec)
    pruner = Pruner(lm.model, lm.example_inputs, heads="whole", targets="heads")
    applied = pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    assert "model.layers.0" not in applied.attributes
    assert lm.model.model.layers[0].hidden_size == 64
    assert pruner.config_note.startswith(
        "num_attention_heads differs between layers (4 in model.layers.0.self_attn; 8 in "
        "model.layers.1.self_attn), and num_key_value_heads (1 in model.layers.0.self_attn; "
        "2 in model.layers.1.self_attn)"), pruner.config_note
    assert "hidden_size" not in pruner.config_note


@pytest.mark.parametrize("family", ["qwen2", "gemma", "falcon", "olmo2"])
def test_the_reason_names_the_key_value_heads_per_layer_in_other_families(family: str) -> None:
    """The same rule on families that name or derive their head fields differently (Qwen2
    derives the head width, Gemma sets 16 != 64 / 8, Falcon calls the field num_kv_heads)."""
    from test_families import FAMILIES

    model_type, config = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **config)).eval()
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    pruner = Pruner(model, (ids,), heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    assert re.search(r"(num_key_value_heads|num_kv_heads)( differs between layers)? \(1 in "
                     r"[\w.]+\.0\.self_att\w*; 2 in [\w.]+\.1\.self_att\w*\)",
                     pruner.config_note), pruner.config_note
    assert "hidden_size" not in pruner.config_note


class _Block(nn.Module):
    """Keeps two widths of its hidden layer: one its forward reads, one it only keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.hidden_dim = self.kept_width = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)).reshape(-1, self.hidden_dim))


def test_the_width_fix_up_sets_only_widths_the_code_reads() -> None:
    """Half the hidden channels go: the width the forward reads follows (16 -> 8) and is
    recorded for plans; the one no code reads is left as it was and not recorded."""
    torch.manual_seed(0)
    block = _Block()
    pruner = Pruner(block, (torch.randn(4, 8),), ratio=0.5)
    pruner.step()
    applied = pruner.applied[-1]
    assert block.fc1.out_features == 8 and block.hidden_dim == 8 and block.kept_width == 16
    assert applied.attributes[""]["hidden_dim"] == [16, 8]
    assert "kept_width" not in applied.attributes[""]


def _recorded_as_before(pruner: Pruner, spec: str) -> dict[str, Any]:
    """The plan as the engine recorded it before the decoder layer's unread ``hidden_size``
    was left alone: the head cut of layer 0 also sets it 64 -> 32."""
    data = Plan.from_pruner(pruner, spec).to_dict()
    data["steps"][0]["attributes"]["model.layers.0"] = {"hidden_size": [64, 32]}
    return _resealed(data)


@pytest.mark.parametrize("spec", ["hf:phi3", "hf:llama"])
def test_a_plan_recorded_before_still_replays(spec: str) -> None:
    """An old plan (and a saved session's step record) naming the decoder layer's
    ``hidden_size`` replays: the attribute's old value is checked, it is not set (no code
    reads it), and the logits are the live cut's; the reason names the head counts."""
    from explorer.io.plan import redo_step

    lm = load_model(spec)
    model, inputs = lm.model, lm.example_inputs
    pruner = Pruner(model, inputs, heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    data = _recorded_as_before(pruner, spec)
    fresh = load_model(spec).model
    replay = Plan.from_dict(data).apply(fresh)
    assert fresh.model.layers[0].hidden_size == 64
    assert replay.config.reason.startswith("num_attention_heads differs between layers")
    torch.testing.assert_close(_logits(fresh, inputs), _logits(model, inputs), atol=0, rtol=0)
    again = load_model(spec).model
    redo_step(again, json.loads(json.dumps(data["steps"][0])))
    assert again.model.layers[0].hidden_size == 64
    torch.testing.assert_close(_logits(again, inputs), _logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("attrs,match", [
    ({"model.layers.0": {"hidden_size": [48, 32]}},
     r"model\.layers\.0\.hidden_size is 64 in the model, the plan expects 48"),
    ({"model.layers.0.self_attn": {"head_dim": [8, 4]}},
     r"this step sets model\.layers\.0\.self_attn\.head_dim to None, the plan to 4; "
     r"re-create the plan"),
], ids=["another old value", "an attribute the code reads"])
def test_old_plans_are_checked_as_strictly_as_before(attrs: dict[str, Any], match: str) -> None:
    """Only a width no code reads is skipped, and only from the value the model has."""
    lm = load_model("hf:llama")
    pruner = Pruner(lm.model, lm.example_inputs, heads="whole", targets="heads")
    pruner.apply(_removal(pruner, AxisRole.HEADS, layers=1))
    data = Plan.from_pruner(pruner, "hf:llama").to_dict()
    data["steps"][0]["attributes"].update(attrs)
    fresh = load_model("hf:llama").model
    before = capture(fresh)
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(_resealed(data)).apply(fresh)
    assert_same(before, fresh)


# -- a count read through the config in a helper method ---------------------------------------
class _Config:
    """A config object every layer shares, as transformers models hold theirs."""

    def __init__(self) -> None:
        self.hidden_size = 32
        self.num_attention_heads = 4


class _Attention(nn.Module):
    """Reads the head count through the shared config in helper methods only."""

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.config.num_attention_heads, self.head_dim).transpose(1, 2)

    def _scale(self) -> float:
        return float(self.head_dim ** -0.5)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self._scale())
        return x + self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class _Derived(_Attention):
    """Also scales by a head width derived from the config: a value no shape check sees."""

    def _scale(self) -> float:
        return float((self.config.hidden_size // self.config.num_attention_heads) ** -0.5)


class _Model(nn.Module):
    def __init__(self, derive: bool = False) -> None:
        super().__init__()
        self.config = _Config()
        kind = _Derived if derive else _Attention
        self.layers = nn.ModuleList(kind(self.config) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _custom(derive: bool) -> tuple[nn.Module, tuple[torch.Tensor], Pruner, Removal]:
    torch.manual_seed(0)
    model = _Model(derive).eval()
    inputs = (torch.randn(2, 5, 32),)
    pruner = Pruner(model, inputs, heads="whole", targets="heads")
    group = next(g for g in pruner.coupling.groups if g.heads is not None)
    [axis] = [i for i, a in enumerate(group.axes) if a.role is AxisRole.HEADS and a.prunable]
    removal = Removal()
    removal.add(group.id, axis, [1, 3])
    return model, inputs, pruner, removal


def test_config_reads_follow_helper_methods() -> None:
    """``forward`` -> ``_heads`` -> ``_split`` reads the head count; ``_Derived._scale``
    derives a head width from the config: both found, each at its own line of this file."""
    from explorer.prune.fixups.reads import derived_widths

    layer = _Model(derive=True).layers[0]
    reads = config_reads(layer)
    split = inspect.getsourcelines(_Attention._split)[1]
    assert reads["num_attention_heads"] == f"{__file__}:{split + 2}"
    [found] = derived_widths(layer)
    assert found.code == "self.config.hidden_size // self.config.num_attention_heads"
    assert found.counts == ("config.num_attention_heads",)
    assert found.where == f"{__file__}:{inspect.getsourcelines(_Derived._scale)[1] + 1}"


def test_a_count_read_in_a_helper_is_set_on_the_layers_own_config() -> None:
    """Layer 0 loses two of its four heads: it reads 2 from its own config copy (its helper
    ``_split`` reads the count), layer 1 and the shared config keep 4, the pruned model
    equals the original with those heads zeroed, and undo puts the shared object back."""
    model, inputs, pruner, removal = _custom(derive=False)
    shared = model.config
    assert Preflight(model, inputs, pruner.coupling).check(removal).ok
    masked = _zeroed(model, pruner.coupling, removal)
    applied = pruner.apply(removal)
    first, second = model.layers
    assert applied.attributes["layers.0"]["config.num_attention_heads"] == [4, 2]
    assert first.config is not shared and first.config.num_attention_heads == 2
    assert second.config is shared and shared.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), masked(*inputs), atol=1e-5, rtol=1e-4)
    pruner.undo()
    assert all(layer.config is shared for layer in model.layers)


def test_a_head_width_derived_from_the_config_refuses_the_cut_before_cutting() -> None:
    """``_scale`` divides ``config.hidden_size`` by the count the cut changes: every shape
    fits, the scale would not. The pre-flight refuses in one line naming that line, and a
    step leaves the model as it was and says what to do."""
    model, inputs, pruner, removal = _custom(derive=True)
    verdict = Preflight(model, inputs, pruner.coupling).check(removal)
    line = inspect.getsourcelines(_Derived._scale)[1] + 1
    assert not verdict.ok and verdict.location == f"{__file__}:{line}"
    assert verdict.error == (
        "_Derived derives a head width from its config, `self.config.hidden_size // "
        "self.config.num_attention_heads`, and the cut changes config.num_attention_heads "
        "4 -> 2: the value would no longer be the head width, though every shape still fits")
    before = capture(model)
    report = Pruner(model, inputs, ratio=0.5, heads="whole", targets="heads").step()
    assert_same(before, model)
    assert report.unsafe and all(u.location == f"{__file__}:{line}" for u in report.unsafe)
    assert "cut dims inside the heads" in report.unsafe[0].advice
