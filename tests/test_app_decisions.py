"""What the Groups page offers around a decision, on the session (no browser): the same cut
in every layer so the export stays a `from_pretrained` folder, the compensation choice, and
the report carrying the quality measured in the app."""
from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
from llamas import GQA_LLAMA

from explorer.app.session import Session
from explorer.coupling.places import natural_key
from explorer.io.report import build_report
from explorer.io.specs import LoadedModel, load_model
from explorer.prune.uniform import (
    SAME_CUT,
    breaks_uniform,
    differing,
    kind_of,
    same_cut_everywhere,
)
from explorer.render.proposal_view import AxisRow, equal_counts


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model(GQA_LLAMA)


def _session(lm: LoadedModel) -> Session:
    return Session(lm.model, lm.example_inputs, spec=GQA_LLAMA)


def test_kinds_of_parameters_by_layer() -> None:
    assert kind_of("model.layers.12.mlp.up_proj.weight") == ("model.layers.*.mlp.up_proj.weight",
                                                             "model.layers.12")
    assert kind_of("lm_head.weight") == ("lm_head.weight", "")
    shapes = {"a.*.w": {"a.0": (2, 3), "a.1": (4, 3), "a.2": (4, 3)},
              "b.*.w": {"b.0": (1,), "b.1": (1,)}}
    assert differing(shapes) == ["a.*.w: 2x3 in a.0, 4x3 in 2 layers"]


def test_one_layer_cut_is_flagged_and_the_same_cut_everywhere_keeps_the_folder(
        llama: LoadedModel, tmp_path: Path) -> None:
    """Seen on SmolLM2: two single-layer MLP accepts made widths differ between layers and the
    Export page refused the transformers folder in a grey caption afterwards. The Groups page
    now says so before Accept and offers the same cut in every layer as one decision."""
    pe = _session(llama)
    pending = pe.proposals()
    mlp = next(p for p in pending if "layers.0.mlp" in p.group.title)
    lines = breaks_uniform(pe.model, pe.graph.coupling, mlp.removal())
    assert lines[0] == ("model.layers.*.mlp.gate_proj.weight: 64x64 in model.layers.0, "
                        "128x64 in 2 layers")
    same = same_cut_everywhere(mlp, pending)
    assert same is not None and same.reason == SAME_CUT
    assert [k[0] for k in same.keys] == [f"model.layers.{i}.mlp.gate_proj.weight"
                                         for i in range(3)]
    assert breaks_uniform(pe.model, pe.graph.coupling, same.removal()) == []
    assert same_cut_everywhere(pending[0], pending) is None  # the heads: one group already
    assert pe.accept(same, {same.axes[0]: 32})
    assert pe.message is not None and pe.message.text.startswith("accepted 3 group(s)")
    assert pe.config_note == ""  # a transformers config describes the result
    files, notes = pe.export_files(("hf",), tmp_path / "dl")
    assert "pruned_hf.zip" in files, notes
    with zipfile.ZipFile(files["pruned_hf.zip"]) as zf:
        assert '"intermediate_size": 96' in zf.read("hf/config.json").decode()
    again = _session(llama)  # a refresh replays the log: the same set, the same model
    assert again.replay(pe.actions) == len(pe.actions)
    assert again.params == pe.params and again.config_note == ""


def test_compensation_is_chosen_recorded_and_replayed(llama: LoadedModel) -> None:
    pe = _session(llama)
    assert pe.compensation == "none"
    assert not pe.set_compensation("ridge")
    assert pe.message is not None and "unknown compensation 'ridge'" in pe.message.text
    assert pe.set_compensation("bias") and pe.compensation == "bias"
    assert pe.report()["compensate"] == "bias"
    assert pe.accept(next(p for p in pe.proposals() if "mlp" in p.group.title))
    again = _session(llama)
    assert again.replay(pe.actions) == 2 and again.compensation == "bias"
    assert again.params == pe.params


def test_the_apps_report_carries_the_quality_it_measured(llama: LoadedModel,
                                                         tmp_path: Path) -> None:
    """The report said "not measured" with CLI advice although the app had measured it."""
    pe = _session(llama)
    assert pe.accept(pe.current())
    files, _ = pe.export_files(("report",), tmp_path / "dl")
    report = files["report.md"].read_text()
    assert "not measured" not in report
    assert f"| perplexity (headline) | {pe.quality().before:.4f}" in report  # type: ignore[union-attr]


def test_report_lists_heads_in_layer_order(llama: LoadedModel) -> None:
    """The report sorted heads 0, 1, 10, 2, ..."""
    base = build_report(llama.model, llama.model, llama.example_inputs, runs=1)
    row = base.heads[0]
    names = [f"model.layers.{i}.self_attn" for i in (10, 2, 1, 0)]
    report = dataclasses.replace(base, heads=[dataclasses.replace(row, module=n) for n in names])
    md = report.to_markdown()
    assert [md.index(f"| model.layers.{i}.self_attn |") for i in (0, 1, 2, 10)] == sorted(
        md.index(f"| model.layers.{i}.self_attn |") for i in (0, 1, 2, 10))
    assert sorted(names, key=natural_key)[-1] == "model.layers.10.self_attn"


def test_equal_counts_cut_every_layer_alike() -> None:
    """The 7B shape: head dims 0 in layer 0 and 32 in layer 1 broke the pre-flight (one
    rotary row is shared); the page offers the same count in every layer."""
    rows = [AxisRow(0, "layers.0", "dims per head", 128, 0),
            AxisRow(1, "layers.1", "dims per head", 128, 32),
            AxisRow(2, "layers.0", "heads", 32, 0), AxisRow(3, "layers.1", "heads", 32, 0)]
    assert equal_counts(rows) == {0: 32, 1: 32, 2: 0, 3: 0}
    assert equal_counts([dataclasses.replace(r, remove=32) if r.part == "dims per head" else r
                         for r in rows]) is None


def test_fallback_export_writes_the_config_it_can_and_says_the_rest(llama: LoadedModel,
                                                                    tmp_path: Path) -> None:
    """The fallback (safetensors + plan) of a per-layer cut had no word on its widths; it
    now carries the config with what one config can say, and a README line for the rest."""
    pe = _session(llama)
    assert pe.accept(next(p for p in pe.proposals() if "layers.1.mlp" in p.group.title), 32)
    assert "intermediate_size differs between layers" in pe.config_note
    files, notes = pe.export_files(("hf",), tmp_path / "dl")
    assert list(files) == ["pruned_safetensors.zip"]
    with zipfile.ZipFile(files["pruned_safetensors.zip"]) as zf:
        names = set(zf.namelist())
        config = json.loads(zf.read("config.json"))
        readme = zf.read("README.md").decode()
    assert {"model.safetensors", "plan.json", "config.json"} <= names
    assert config["intermediate_size"] == 128  # kept: layers 0 and 2 are still 128 wide
    (said,) = notes  # one note: why no folder, and what stands in for it
    assert said.startswith("hf: no transformers folder: the transformers config cannot "
                           "describe the pruned model: intermediate_size differs between")
    assert "with config.json: the transformers config" in said
    assert readme.count("intermediate_size differs between layers") == 1
    assert "plan.json holds" in readme
    # the Export page's line says it until an export's notes do, not beside them
    assert pe.config_line().startswith("The transformers config cannot describe the pruned "
                                       "model: intermediate_size differs between layers")
    assert pe.config_line(notes) == ""


def test_joint_reason_quotes_the_model_line_not_a_comment() -> None:
    """Seen on DINO: the joint proposal quoted ``# noqa: E501`` as the model line (the
    shortening of locations cut the code at its ``//`` and ``:``)."""
    from explorer.render.proposal_view import short_reason

    class Joint:
        reason = "`/a/b/dino.py:58` (`q = x.reshape(B, C // h)[0]`) fails when cut alone"
    assert short_reason(Joint()) == "`dino.py:58` (`q = x.reshape(B, C // h)[0]`) fails " \
                                    "when cut alone"  # type: ignore[arg-type]
    lm = load_model("demo:dino_vit")
    pe = Session(lm.model, lm.example_inputs, spec="demo:dino_vit")
    joint = pe.joint(pe.current())  # type: ignore[arg-type]
    assert joint is not None and "C // self.num_heads).permute(2, 0, 3, 1, 4)`)" in joint.reason
    assert "noqa" not in joint.reason


def test_overlapping_uploads_are_named_as_uploaded() -> None:
    """The overlap error showed the server-side path of the saved upload."""
    from explorer.app.sources import request_from_form
    from explorer.io.data import DataError

    calib = ("calib.txt", b"the first sample\nthe second sample\n")
    held = ("held.txt", b"the first sample\nanother one\n")
    with pytest.raises(DataError, match=r"^1 sample\(s\) of the uploaded 'held.txt' are also "
                                        r"calibration samples in the uploaded 'calib.txt'"):
        request_from_form("demo:mlp", calibration_upload=calib, heldout_upload=held)


def test_the_head_dim_statement_says_what_it_means() -> None:
    """The 7B shape's Groups page read "dims per head 64->32, 128->64" and "query heads
    1024->1024": it now names the rotary halves and says the heads are all kept, per layer."""
    from explorer.prune.pruner import Pruner
    from explorer.prune.statement import statement

    lm = load_model(GQA_LLAMA, device="meta")
    said = statement(Pruner(lm.model, lm.example_inputs, ratio=0.5, heads="dims"))
    words = next(t for t in said.losses if t.target == "heads").details()
    assert "dims per head 16 -> 8 in each of 3 layers (query and key: both rotary halves " \
           "8 -> 4, the same dims in every layer" in words
    assert "query heads all kept (4 in each of 3 layers)" in words
    assert "16 -> 8 (x3)" not in words and "12 -> 12" not in words


def test_widths_at_many_layers_are_a_grid_with_embeddings_apart() -> None:
    """At 30 layers Dimensions & heads drew ~200 bars, embedding and lm_head widths flattening
    the layers; it draws layers x kinds now, in numeric order, the rest apart."""
    from explorer.render.figures import layer_grid, widths_figure

    before = {"model.embed_tokens": 49152, "lm_head": 49152}
    for i in range(30):
        before |= {f"model.layers.{i}.self_attn.q_proj": 576,
                   f"model.layers.{i}.mlp.gate_proj": 1536}
    after = {**before, "model.layers.10.mlp.gate_proj": 768}
    grid = layer_grid(before, after)
    assert grid.layers[9:12] == ["model.layers.9", "model.layers.10", "model.layers.11"]
    assert grid.kinds == ["self_attn.q_proj", "mlp.gate_proj"]
    assert grid.outside == {"model.embed_tokens": (49152, 49152), "lm_head": (49152, 49152)}
    heat = widths_figure(before, after).data[0]
    assert heat.type == "heatmap" and len(heat.y) == 30
    assert list(heat.z[10]) == [1.0, 0.5] and heat.text[10][1] == "1536→768"
