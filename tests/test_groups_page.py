"""What a newcomer reads on the Groups page of a real LLM (issue 21's review of the SmolLM2
screenshots): metric deltas with units, the count inputs in a reader's words, what the
quality was measured on, the cost's compensation, the picker's label after a measurement."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from llamas import LLAMA_7B, small_llama
from streamlit.testing.v1 import AppTest

from explorer.app.cost import Thresholds, cost_sentence
from explorer.app.session import Session
from explorer.app.sources import save_upload, typed_path
from explorer.coupling.vocab import AxisRole
from explorer.io.specs import LoadedModel, load_model
from explorer.prune.calibration import Calibration
from explorer.prune.preflight import Verdict
from explorer.prune.uniform import same_cut_everywhere
from explorer.quality.evaluate import Quality
from explorer.quality.task import Metric, Task
from explorer.render.proposal_view import (
    axis_rows,
    chart_words,
    count_label,
    layer_words,
    metric_cards,
    pending_rows,
    quality_note,
    signed,
)

GQA_LLAMA = small_llama(2, 2)  # two layers: the joint searches stay short


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model(GQA_LLAMA)


def _lm(before: float, after: float) -> Quality:
    return Quality(Task.CAUSAL_LM, Metric.PERPLEXITY, before, after, 0.9, 0.1, 0.8, before,
                   after, 8)


def test_metric_deltas_carry_units_and_none_when_unchanged() -> None:
    """The screenshot showed a bare "0" under parameters and MACs, and "-18.6 M MACs" under
    "params after Accept"."""
    cards = metric_cards((134_515_008, 134_515_008), (1_890_000_000, 1_890_000_000), 31,
                         Verdict(True), None, "2 held-out samples")
    assert [c.delta for c in cards[:2] if c is not None] == [None, None]
    assert cards[3] is None  # a verdict without a graph: nothing to say after Accept
    assert signed(-18_600_000, "params") == "-18.6 M params"  # short: a chip is cut off
    assert signed(2_000, "MACs") == "+2,000 MACs"
    assert signed(0, "params") is None


def test_params_after_accept_is_a_parameter_change(llama: LoadedModel) -> None:
    pe = Session(llama.model, llama.example_inputs, spec=GQA_LLAMA)
    p = next(q for q in pe.proposals() if "mlp" in q.group.title)
    verdict = pe.preflight(p)
    cards = metric_cards((pe.params, pe.params_start), (pe.macs, pe.macs_start), 3, verdict,
                         pe.quality(), pe.quality_source)
    after = cards[3]
    assert after is not None and after.label == "params after Accept"
    assert after.delta == signed(verdict.params - pe.params, "params")
    assert after.delta is not None and after.delta.endswith(" params")
    assert after.help is not None and "%); MACs -" in after.help  # share and MACs: hover text


def test_count_inputs_say_what_a_user_reads(llama: LoadedModel) -> None:
    """ "Remove from channels (1536 wide)" was internal wording."""
    pe = Session(llama.model, llama.example_inputs, spec=GQA_LLAMA)
    coupling = pe.graph.coupling
    pending = pe.proposals()
    mlp = next(p for p in pending if "layers.1.mlp" in p.group.title)
    assert count_label(coupling, mlp, 0) == "Remove MLP hidden units of layer 1 (of 128)"
    assert chart_words(mlp, 0, "magnitude") == ("magnitude importance of the MLP hidden units",
                                                "channel")
    assert pending_rows([mlp])[0]["change"].startswith("MLP hidden units 128→")
    assert pe.configure("magnitude", 0.5, "whole")  # whole key/value groups under GQA
    heads = next(p for p in pe.proposals() if p.group.heads is not None)
    labels = [count_label(coupling, heads, n) for n in range(len(heads.axes))]
    assert "Remove key/value groups of layer 0 (of 2)" in labels
    assert AxisRole.HEAD_REPEAT.words() == "query heads per key/value group"
    assert AxisRole.FIXED.words(3) == "q/k/v"


@pytest.mark.parametrize(("layer", "words"), [
    ("model.layers.3.mlp", "layer 3"), ("blocks.0", "block 0"),
    ("transformer.h.11", "transformer.h.11"),
    ("all layers (shared)", "every layer"), ("encoder", "encoder")])
def test_layers_are_named_as_people_count_them(layer: str, words: str) -> None:
    assert layer_words(layer) == words


def test_the_page_says_what_perplexity_was_measured_on(llama: LoadedModel) -> None:
    """61.8 in the app against 25.5 from the CLI, with the reason only in a tooltip."""
    ids = torch.randint(0, 100, (4, 12))
    pe = Session(llama.model, llama.example_inputs, spec=GQA_LLAMA,
                 heldout=Calibration([(ids,)]))
    assert pe.quality_source == "2 held-out samples × 12 tokens"
    quality = pe.quality()
    assert quality is not None
    line, command = quality_note(quality, pe.quality_source, GQA_LLAMA, "/data/heldout.txt")
    assert line == ("Perplexity on 2 held-out samples × 12 tokens: quick, to compare decisions; "
                    "on the whole held-out file it reads differently. For that figure export "
                    "`hf`, then run `explorer evaluate`.")
    assert command == (f"`python -m explorer evaluate --model hf:EXPORT --reference {GQA_LLAMA} "
                       f"--eval /data/heldout.txt`")
    random = Quality(Task.ENCODER, Metric.COSINE, 1.0, 0.9, 0.9, None, None, None, None, 4)
    assert "give held-out data" in quality_note(random, "random inputs (no held-out data "
                                                        "given)", "demo:mlp")[0]


def test_an_uploaded_file_is_not_named_by_its_server_path(tmp_path: Path) -> None:
    saved = save_upload("held.txt", b"one\ntwo\n", str(tmp_path))
    assert typed_path(str(saved)) == ""
    assert typed_path("/data/held.txt") == "/data/held.txt"


def test_equal_cuts_keep_a_shared_rotary_half_apart() -> None:
    """On the 7B shape the largest count of 'dims per head' (64 of 128 per layer) was asked of
    the shared rotary half too (64 wide): "count for 'head-dim' must be in [0, 63]"."""
    from explorer.render.proposal_view import AxisRow, equal_counts
    rows = [AxisRow(0, "all layers (shared)", "dims per head", 64, 32),
            AxisRow(1, "layers.0", "dims per head", 128, 0),
            AxisRow(2, "layers.1", "dims per head", 128, 64)]
    assert equal_counts(rows) == {0: 32, 1: 64, 2: 64}


def test_the_cost_says_when_accept_refits_what_it_does_not_measure() -> None:
    """The session may refit with lstsq at Accept; the cost shown before is measured
    without it (too slow per proposal), and now says so next to the number."""
    text = cost_sentence(_lm(25, 25), _lm(25, 27), Thresholds(), "2 held-out samples", "lstsq")
    assert text.endswith("Measured without the lstsq refit that Accept applies (too slow to "
                         "run for every proposal): after Accept the cost is usually lower")
    assert "refit" not in cost_sentence(_lm(25, 25), _lm(25, 27), Thresholds(), "2 samples")


def test_the_first_step_is_not_said_twice() -> None:
    """Before any decision "this step alone: 61.76 → 67.52" repeated the figures before it."""
    first = cost_sentence(_lm(25, 25), _lm(25, 27), Thresholds(), "2 samples")
    assert "this step alone" not in first and "perplexity 25.00 → 27.00" in first
    later = cost_sentence(_lm(25, 26), _lm(25, 27), Thresholds(), "2 samples")
    assert later.endswith("this step alone: perplexity 26.00 → 27.00)")


APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("PE_SESSION_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def test_the_picker_label_shows_the_cost_measured_for_it(app: AppTest) -> None:
    """The browser held the pick by its label "... · not measured" and kept showing it
    above the measured cost: the page now sends the measured label with the value."""
    app.switch_page("pages/3_groups.py").run()
    second = app.session_state.pe.proposals()[1]
    app.selectbox(key="groups_pick").set_value(second.key).run()
    assert not app.exception, app.exception
    picker = app.selectbox(key="groups_pick").proto
    label = picker.options[1]
    assert label.startswith(second.group.title) and "not measured" not in label
    assert picker.set_value and picker.raw_value == label  # what the browser shows
    assert any(c.value.startswith("Cosine to original on random inputs") for c in app.caption)
    assert not [m.delta for m in app.metric if m.label in ("parameters", "MACs") and m.delta]
    assert [n.label for n in app.number_input][1] == "Remove dims per head of block 0 (of 16)"


def test_the_7b_shape_offers_equal_cuts_and_refuses_unequal_ones_in_one_line(
        app: AppTest) -> None:
    """Per-layer head-dim edits on the 7B shape broke the pre-flight (one rotary row is read by
    every layer) with nothing saying why; the page says why, disables Accept, offers equal
    cuts (without the joint search, a pre-flight of every other group: an edit took 35.4 s,
    now 1.2 s, medians of 3 fresh sessions at load 9), and an accept of the unequal counts
    is refused in one line."""
    app.text_input(key="model_spec").set_value(LLAMA_7B)
    app.radio(key="model_device").set_value("meta")
    app.button(key="model_load").click().run()
    app.switch_page("pages/3_groups.py").run()
    assert not app.exception and not app.error, (app.exception, app.error)
    pe = app.session_state.pe
    picker = app.selectbox(key="groups_pick").proto.options[0]
    # no cost on meta; the group spans every layer (shared rotary)
    assert picker == "32 heads x 128: model.layers.*.self_attn.q_proj (layers 0-31)"
    assert not [t for t in app.toggle if t.key == "groups_by_cost"]  # nothing to order by
    heads = pe.proposals()[0]
    rows = app.dataframe[0].value  # the layer table: the shared rotary half, then each layer
    assert list(rows["layer"][:3]) == ["all layers (shared)", "model.layers.0.self_attn",
                                       "model.layers.1.self_attn"]
    app.session_state["groups_table"] = {"edited_rows": {1: {"remove": 0}, 2: {"remove": 32}},
                                         "added_rows": [], "deleted_rows": []}
    app.run()
    assert not app.exception, app.exception
    assert any(w.value.startswith("The layers of this group share tensors (on Llama-style "
                                  "models the one rotary cos/sin row every layer reads)")
               for w in app.warning)
    assert app.button(key="groups_accept").proto.disabled
    assert not app.info  # no joint proposal: it is not the answer to unequal counts
    unequal = {r.axis: r.remove for r in axis_rows(pe.graph.coupling, heads)}
    first, second = sorted(unequal, key=lambda a: a)[1:3]
    assert not pe.accept(heads, {**unequal, first: 0, second: 32})
    assert pe.message.kind == "error" and re.fullmatch(
        r"pre-flight failed in model\.layers\.0\.self_attn modeling_llama\.py:\d+: The size "
        r"of tensor a \(32\) must match the size of tensor b \(64\) at non-singleton "
        r"dimension 1", pe.message.text), pe.message.text  # one line, no server path
    app.button(key="groups_accept_equal").click().run()
    assert not app.exception, app.exception
    assert pe.applied and pe.message.text.startswith("accepted 1 group(s)"), pe.message


def test_the_smaller_trips_of_the_first_llm_session(app: AppTest, llama: LoadedModel,
                                                     tmp_path: Path) -> None:
    """Issue 21's smaller trips, each in the app: the local section stays open after a field
    edit; the spec box shows the loaded folder; a joint accept counts every group it cut; the
    joint proposal quotes the model line, never a ``# noqa`` fragment."""
    folder = tmp_path / "tiny-llama"
    llama.model.save_pretrained(folder)
    local = next(e for e in app.expander if e.label.startswith("Local checkpoint and data"))
    assert not local.proto.expanded
    app.text_input(key="model_path").set_value(str(folder)).run()  # an edit reruns the page
    local = next(e for e in app.expander if e.label.startswith("Local checkpoint and data"))
    assert local.proto.expanded
    app.button(key="model_load").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    assert app.text_input(key="model_spec").value == f"hf:{folder}"  # not the default demo
    assert app.session_state.pe.spec == f"hf:{folder}"

    app.text_input(key="model_path").set_value("").run()
    app.text_input(key="model_spec").set_value("demo:dino_vit").run()
    app.button(key="model_load").click().run()
    app.switch_page("pages/3_groups.py").run()  # the residual stream: unsafe alone
    assert not app.exception, app.exception
    joint = app.session_state.pe.joint(app.session_state.pe.proposals()[0])
    assert joint is not None and joint.joint
    offer = app.info[0].value
    assert offer.startswith("Joint proposal: ") and "dino.py:58" in offer
    assert "C // self.num_heads).permute(2, 0, 3, 1, 4)`" in offer and "noqa" not in offer
    app.button(key="groups_accept_joint").click().run()
    assert not app.exception, app.exception
    assert app.success[0].value.startswith(f"accepted {len(joint.keys)} group(s)")
    assert len(joint.keys) > 1


def test_the_apps_report_carries_its_quality_continuations_and_layers_in_order(
        tmp_path: Path) -> None:
    """The report of the app (item 8): the quality and the continuations measured in the app,
    per-layer rows and heads in layer order (2 before 10)."""
    import transformers
    from test_realdata import HELDOUT, _tokenizer

    from explorer.io.data import DataOptions, load_data

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=11, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / "llama11"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    (tmp_path / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    lm = load_model(f"hf:{folder}")
    heldout = load_data(str(tmp_path / "heldout.txt"), lm, DataOptions(None, 16, 4))
    pe = Session(lm.model, lm.example_inputs, spec=f"hf:{folder}", heldout=heldout,
                 tokenizer=lm.tokenizer)
    assert pe.accept(next(p for p in pe.proposals() if p.group.heads is not None))
    files, _ = pe.export_files(("report",), tmp_path / "dl", prompts=["the cat"])
    report = files["report.md"].read_text()
    quality = pe.quality()
    assert quality is not None and quality.perplexity_after is not None
    assert f"| perplexity | {quality.perplexity_before:.3f} | " \
           f"{quality.perplexity_after:.3f} |" in report
    [c] = pe.continuations(["the cat"])
    assert f"| the cat | {c.before.strip()}" in report
    for name in ("self_attn.q_proj", "self_attn"):  # the layer table, then the head table
        at = [report.index(f"| model.layers.{i}.{name} |") for i in (0, 1, 2, 10)]
        assert at == sorted(at), name


def test_the_same_cut_in_every_layer_shows_its_cost_before_its_accept(app: AppTest) -> None:
    """The one-layer cost (x1.04 on SmolLM2) stood above "Accept the same cut in all 30
    layers", which then cost x98,000 unseen: that cut's cost is one click away, and shown."""
    app.text_input(key="model_spec").set_value(GQA_LLAMA).run()
    app.button(key="model_load").click().run()
    app.switch_page("pages/3_groups.py").run()
    pe = app.session_state.pe
    mlp = next(p for p in pe.proposals() if "layers.0.mlp" in p.group.title)
    app.selectbox(key="groups_pick").set_value(mlp.key).run()
    assert not app.exception, app.exception
    assert app.button(key="groups_same_cut").label == "Accept the same cut in all 2 layers"
    assert not any(m.value.startswith("The same cut in all") for m in app.markdown)
    app.button(key="groups_same_cost").click().run()
    assert not app.exception, app.exception
    said = [m.value for m in app.markdown]
    box = said[said.index("The same cut in all 2 layers:") + 1]
    assert "**Accepting it" in box and "perplexity" in box
    assert pe.cost_if_measured(same_cut_everywhere(mlp, pe.proposals()), None) is not None


def test_an_accept_runs_one_preflight_and_the_statement_only_when_its_box_is_open(
        app: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Accept ran the statement of what the settings cut (`Pruner.checked`: the
    pre-flight of the whole prune; on SmolLM2 0.4 s of a 3.06 s CPU Accept) for a box that
    was closed: an Accept now pre-flights only the next proposal, and the statement is made
    when its box is opened."""
    from explorer.prune.preflight import Preflight
    from explorer.prune.pruner import Pruner
    calls = {"checked": 0, "preflight": 0}
    checked, check = Pruner.checked, Preflight.check

    def counted_checked(self: Pruner, *args: object, **kwargs: object) -> object:
        calls["checked"] += 1
        return checked(self, *args, **kwargs)  # type: ignore[arg-type]

    def counted_check(self: Preflight, *args: object, **kwargs: object) -> object:
        calls["preflight"] += 1
        return check(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Pruner, "checked", counted_checked)
    monkeypatch.setattr(Preflight, "check", counted_check)
    app.text_input(key="model_spec").set_value(GQA_LLAMA).run()
    app.button(key="model_load").click().run()
    app.switch_page("pages/3_groups.py").run()
    box = next(e for e in app.expander if e.label == "What these settings cut")
    assert not box.children  # closed: nothing made for it
    for _ in range(2):
        calls.update(checked=0, preflight=0)
        app.button(key="groups_accept").click().run()
        assert not app.exception, app.exception
        assert calls == {"checked": 0, "preflight": 1}  # the next proposal's, nothing more
    app.session_state["groups_statement"] = True  # the user opens the box
    app.run()
    assert not app.exception, app.exception
    pe = app.session_state.pe
    said = pe.statement()
    assert calls["checked"] == 1
    box = next(e for e in app.expander if e.label == "What these settings cut")
    text = box.markdown[0].value
    assert text.startswith(f"params {said.params_before:,} -> {said.params_after:,}\n\n- **mlp**")


def test_the_pages_folder_holds_only_pages() -> None:
    """The first run of a fresh server lists pages/*.py in the sidebar (Streamlit's multipage
    v1) until app.py's navigation replaces it: the shared helper is a package, never listed
    (it showed as a `session` page)."""
    root = Path(APP).parent / "pages"
    assert all(p.name[0].isdigit() for p in root.glob("*.py")), sorted(root.glob("*.py"))
    assert (root / "_session" / "__init__.py").is_file()
