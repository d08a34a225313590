"""Targets: what may be cut (mlp, heads, residual, channels), the default that leaves a
transformer's residual stream alone, ``heads="keep"`` meaning no attention change, GQA head
modes, and the statement of what each target will lose, said before cutting."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from explorer import load_model
from explorer.app.cli import main
from explorer.app.display import group_rows
from explorer.app.session import Session
from explorer.coupling.targets import default_targets, parse_targets, target_of
from explorer.coupling.vocab import Target
from explorer.io.specs import LoadedModel
from explorer.prune.pruner import Pruner
from explorer.prune.statement import statement
from explorer.render.proposal_view import statement_lines


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _members(pruner: Pruner, target: Target) -> set[str]:
    """Every parameter a group of ``target`` touches."""
    return {m.param for g in pruner.groups if target_of(g) is target for m in g.members}


@pytest.fixture(scope="module")
def smol_meta(smollm2: Path) -> LoadedModel:
    """SmolLM2's real config (9 heads, 3 kv heads) with two layers, on meta: structure only."""
    return load_model(f"hf:{smollm2}?num_hidden_layers=2", device="meta")


@pytest.fixture()
def fresh_meta(smol_meta: LoadedModel) -> tuple[nn.Module, tuple[object, ...]]:
    """A copy of `smol_meta`'s model to prune, with its example inputs."""
    return copy.deepcopy(smol_meta.model), smol_meta.example_inputs


@pytest.fixture()
def smol(smollm2: Path) -> Iterator[LoadedModel]:
    """SmolLM2 with real weights, two layers (a fresh copy per test: tests prune it)."""
    yield load_model(f"hf:{smollm2}?num_hidden_layers=2")


def test_groups_are_classified_from_the_coupling(smol_meta: LoadedModel) -> None:
    pruner = Pruner(smol_meta.model, smol_meta.example_inputs, importance="random")
    kinds = {target_of(g) for g in pruner.groups if g.prunable}
    assert kinds == {Target.MLP, Target.HEADS, Target.RESIDUAL}
    residual = _members(pruner, Target.RESIDUAL)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= residual
    assert _members(pruner, Target.MLP) == {f"model.layers.{i}.mlp.{p}_proj.weight"
                                            for i in range(2) for p in ("gate", "up", "down")}
    assert pruner.targets == {Target.MLP, Target.HEADS, Target.CHANNELS}  # no residual
    assert pruner.targets_default


def test_default_on_a_decoder_llm_keeps_the_hidden_size(smol: LoadedModel) -> None:
    """Real SmolLM2 weights at 30 %: MLP and head dims shrink; the config's hidden size and
    every tensor of the residual stream (embeddings, norms, projections' hidden side) stay."""
    model = smol.model
    before = _shapes(model)
    pruner = Pruner(model, smol.example_inputs, ratio=0.3)
    residual = {(m.param, m.dim, m.size) for g in pruner.groups
                if target_of(g) is Target.RESIDUAL for m in g.members}
    report = pruner.step()
    assert report and report.forward_ok
    assert model.config.hidden_size == 576
    after = dict(model.named_parameters())
    for param, dim, size in residual:
        assert after[param].shape[dim] == size, param
    assert model.model.embed_tokens.weight.shape == before["model.embed_tokens.weight"]
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] < 1536  # the MLP was cut
    assert any(not c.removed or c.group not in {g.id for g in pruner.groups
                                                  if target_of(g) is Target.RESIDUAL}
               for c in report.changes)
    assert any("residual is not a target" in s.reason for s in report.skipped)


def test_heads_keep_leaves_every_attention_parameter_untouched(smol: LoadedModel) -> None:
    model = smol.model
    attention = {k: v.clone() for k, v in model.state_dict().items() if "self_attn" in k
                 or "rotary" in k}
    pruner = Pruner(model, smol.example_inputs, ratio=0.2, heads="keep")
    assert pruner.step()
    now = model.state_dict()
    for k, v in attention.items():
        assert torch.equal(now[k], v), k
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert model.config.hidden_size == 576 and model.config.intermediate_size == 1229


def test_heads_keep_refuses_the_residual_stream_of_a_transformer(
        smol_meta: LoadedModel) -> None:
    with pytest.raises(ValueError, match="heads 'keep' leaves attention unchanged.*drop "
                                         "'residual'"):
        Pruner(smol_meta.model, smol_meta.example_inputs, heads="keep", targets="all",
               importance="random")
    pruner = Pruner(smol_meta.model, smol_meta.example_inputs, importance="random")
    with pytest.raises(ValueError, match="heads 'keep'"):
        pruner.configure(heads="keep", targets=("mlp", "residual"))
    assert pruner.heads == "dims" and Target.RESIDUAL not in pruner.targets  # unchanged


def test_targets_mlp_cuts_only_mlp_widths(
        fresh_meta: tuple[nn.Module, tuple[object, ...]]) -> None:
    model, inputs = fresh_meta
    before = _shapes(model)
    pruner = Pruner(model, inputs, ratio=0.25, importance="random",
                    targets="mlp")
    mlp = _members(pruner, Target.MLP)
    report = pruner.step()
    changed = {k for k, s in _shapes(model).items() if before[k] != s}
    assert changed == mlp
    assert {c.axis for c in report.changes} == {"channels"}
    assert len(report.changes) == 2  # one per layer


def test_residual_is_cut_only_when_asked(
        fresh_meta: tuple[nn.Module, tuple[object, ...]]) -> None:
    model, inputs = fresh_meta
    pruner = Pruner(model, inputs, ratio=0.2, importance="random", targets="residual,mlp")
    assert pruner.step()
    assert model.model.embed_tokens.weight.shape == (49152, 461)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (576, 461)


@pytest.mark.parametrize(("spec", "kinds"), [
    ("demo:resnet", {Target.CHANNELS, Target.RESIDUAL}),
    ("demo:dino_vit_safe", {Target.RESIDUAL, Target.HEADS, Target.MLP})])
def test_models_without_token_embeddings_keep_every_target(spec: str,
                                                           kinds: set[Target]) -> None:
    """CNNs and vision transformers keep their defaults: the residual stream is a target."""
    lm = load_model(spec)
    pruner = Pruner(lm.model, lm.example_inputs, importance="random")
    assert pruner.targets == frozenset(Target)
    assert default_targets(pruner.graph) == frozenset(Target)
    assert {target_of(g) for g in pruner.groups if g.prunable} == kinds


def test_parse_targets_errors() -> None:
    assert parse_targets("mlp, Heads") == {Target.MLP, Target.HEADS}
    assert parse_targets("all") == frozenset(Target)
    with pytest.raises(ValueError, match="unknown target 'attn'; choose from mlp, heads"):
        parse_targets("mlp,attn")
    with pytest.raises(ValueError, match="name at least one of"):
        parse_targets(" , ")


def test_whole_heads_rounding_is_stated(
        fresh_meta: tuple[nn.Module, tuple[object, ...]]) -> None:
    """9 heads in 3 kv groups: 25 % of the heads goes as one whole kv group (33 %), and the
    statement says so before cutting."""
    pruner = Pruner(*fresh_meta, ratio=0.25, heads="whole",
                    importance="random")
    said = statement(pruner)
    heads = next(t for t in said.losses if t.target == "heads")
    assert heads.heads == {"query_before": 18, "query_after": 12, "kv_before": 6,
                           "kv_after": 4, "layers": 2}
    # said per layer too (on the 7B shape "query heads 1024 -> 1024" read as a count)
    assert "query heads 18 -> 12 (9 -> 6 in each of 2 layers)" in heads.details()
    assert heads.removed_fraction == pytest.approx(1 / 3)
    assert "removes 33.3%, not the 25% asked" in heads.note and "1/3" in heads.note
    mlp = next(t for t in said.losses if t.target == "mlp")
    assert mlp.note == "" and mlp.widths[0].before == 1536 and mlp.widths[0].after == 1152
    assert "25% of each MLP's hidden units, in every layer" in mlp.reading
    residual = next(t for t in said.losses if t.target == "residual")
    assert not residual.selected and residual.params_removed == 0
    assert "leaves the residual stream alone" in residual.reading
    assert said.params_after == pruner.params_original - mlp.params_removed - \
        heads.params_removed
    report = pruner.step()
    assert report.params_after == said.params_after


def test_query_heads_inside_kv_groups(smol: LoadedModel) -> None:
    model = smol.model
    pruner = Pruner(model, smol.example_inputs, ratio=0.34, heads="query", targets="heads")
    report = pruner.step()
    assert report.forward_ok and report.output_shape_ok
    assert {c.axis for c in report.changes} == {"head-repeat"}
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 3
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (384, 576) and attn.k_proj.weight.shape == (192, 576)


def test_per_layer_changes_name_their_layer(smol_meta: LoadedModel) -> None:
    pruner = Pruner(smol_meta.model, smol_meta.example_inputs, ratio=0.25, heads="whole",
                    importance="random")
    changes = [c for c in pruner.propose()[1] if c.axis == "heads"]
    assert [c.where for c in changes] == ["model.layers.0.self_attn",
                                          "model.layers.1.self_attn"]
    assert len({c.title for c in changes}) == 1  # one group: the title alone cannot tell


def test_cli_states_each_target_before_cutting(smollm2: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    assert main(["prune", "--model", spec, "--device", "meta", "--importance", "random",
                 "--ratio", "0.25", "--heads", "whole", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    said = {t["target"]: t for t in out["targets"]["losses"]}
    assert out["targets"]["targets"] == ["mlp", "heads", "channels"]
    assert out["targets"]["default"] is True and out["targets"]["allocation"] == "uniform"
    assert said["heads"]["heads"]["query_after"] == 12 and "33.3%" in said["heads"]["note"]
    assert said["mlp"]["params_removed"] > 0 and not said["residual"]["selected"]
    wheres = [c["where"] for s in out["steps"] for c in s["changes"] if c["axis"] == "heads"]
    assert wheres == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert main(["prune", "--model", spec, "--device", "meta", "--importance", "random",
                 "--ratio", "0.25", "--heads", "keep", "--targets", "mlp"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("what will be cut (ratio 0.25, targets mlp, uniform widths): ")
    assert "mlp: 25% of each MLP's hidden units, in every layer; channels 1536 -> 1152 (x2)" \
        in text
    assert "heads: kept: heads is not a target" in text
    assert "cut model.layers.0.mlp: channels 1536 -> 1152" in text
    assert "cut model.layers.1.mlp: channels 1536 -> 1152" in text



def test_cli_cut_lines_name_the_heads_as_the_config_will(
        smollm2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each layer's cut line says what went in a person's words, with the query and key/value
    heads before and after (it said ``heads 3 -> 2`` for key/value groups while the saved
    config says 9 -> 6 query heads, and ``head-repeat`` / ``head-dim``)."""
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    expected = {
        "whole": "cut model.layers.1.self_attn: key/value groups 3 -> 2 "
                 "(query heads 9 -> 6, key/value heads 3 -> 2)",
        "query": "cut model.layers.1.self_attn: query heads per key/value group 3 -> 2 "
                 "(query heads 9 -> 6)",
        "dims": "cut model.layers.1.self_attn: dims per head 64 -> 32",
    }
    for mode, line in expected.items():
        assert main(["prune", "--model", spec, "--device", "meta", "--importance", "random",
                     "--ratio", "0.5" if mode == "dims" else "0.25", "--heads", mode,
                     "--targets", "heads"]) == 0
        text = capsys.readouterr().out
        assert f"\n  {line}\n" in text + "\n", text
        assert "head-repeat" not in text and "head-dim " not in text


def test_cli_says_when_a_size_target_is_not_met(smollm2: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two layers of SmolLM2 hold 28 M of their 35 M parameters in the embedding, which a
    language model keeps by default: --target-params 0.5 cannot be met, and the search stops
    at the deepest ratio (0.9 of every MLP). That used to be said as "searched to keep 50% of
    the parameters" and nothing more."""
    spec = f"hf:{smollm2}?num_hidden_layers=2"
    common = ["prune", "--model", spec, "--device", "meta", "--importance", "random",
              "--heads", "keep", "--json"]
    assert main([*common, "--target-params", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = out["params_after"] / out["params_before"]
    assert 0.5 < kept < 0.9
    [note] = [n for n in out["notes"] if n.startswith("--target-params")]
    assert note.startswith(f"--target-params 0.5 not met: {kept:.1%} of the parameters kept at "
                           f"the deepest cut allowed (ratio 0.9 of every axis cut)")
    assert main([*common, "--target-params", "0.95"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_after"] <= 0.95 * out["params_before"]
    assert not [n for n in out["notes"] if "not met" in n]

def test_cli_rejects_unknown_targets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="2"):
        main(["prune", "--model", "hf:llama", "--targets", "mlp,ffn"])
    err = capsys.readouterr().err
    assert "argument --targets: unknown target 'ffn'" in err
    assert main(["prune", "--model", "hf:llama", "--heads", "keep", "--targets",
                 "all"]) == 2
    assert "drop 'residual' from the targets" in capsys.readouterr().err


def test_session_chooses_targets_and_states_them() -> None:
    lm = load_model("hf:llama")
    pe = Session(lm.model, lm.example_inputs, spec="hf:llama")
    assert pe.settings()[5] == ("mlp", "heads", "channels")
    lines = statement_lines(pe.statement())
    assert any(line.startswith("- **mlp**: 50% of each MLP's hidden units") for line in lines)
    assert any(line.startswith("- **residual**: kept: residual is not a target")
               for line in lines)
    assert {r["target"] for r in group_rows(pe.graph.groups(), {})} >= {"mlp", "heads",
                                                                       "residual"}
    assert pe.configure("magnitude", 0.5, "keep", targets=["mlp"])
    assert {target_of(p.group) for p in pe.proposals()} == {Target.MLP}
    assert pe.actions[-1]["settings"][5] == ["mlp"]
    assert not pe.configure("magnitude", 0.5, "keep", targets=["mlp", "residual"])
    assert "drop 'residual'" in pe.message.text and pe.settings()[5] == ("mlp",)
    assert not pe.configure("magnitude", 0.5, "keep", targets=[])
    assert "name at least one" in pe.message.text
    again = Session(lm.model, lm.example_inputs, spec="hf:llama")
    assert again.replay([{"do": "configure", "settings": ["magnitude", 0.3, "whole", False,
                                                          1]}]) == 1  # an older log
    assert again.settings() == ("magnitude", 0.3, "whole", False, 1,
                                ("mlp", "heads", "channels"))
    assert again.replay(pe.actions) == len(pe.actions)
    assert again.settings()[5] == ("mlp",)


def test_heads_keep_on_a_vision_transformer_leaves_attention_alone() -> None:
    """DINO's default cuts its residual stream, but not under heads "keep": every attention
    parameter (the fused qkv and the output projection) stays as it was."""
    lm = load_model("demo:dino_vit_safe")
    attention = {k: v.clone() for k, v in lm.model.state_dict().items() if ".attn." in k}
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="keep")
    assert Target.RESIDUAL not in pruner.targets and pruner.targets_default
    assert "heads 'keep': the residual stream feeds" in pruner.untargeted(Target.RESIDUAL)
    assert pruner.step()
    now = lm.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in attention.items())
    pruner.configure(heads="dims", targets=pruner.settings()[5])  # passed back: still default
    assert Target.RESIDUAL in pruner.targets


def test_ignoring_the_embedding_pins_the_residual_stream(smol_meta: LoadedModel) -> None:
    """An embedding's outputs are its table's columns (dim 1): ignoring it keeps the hidden
    size it writes (before, only ``--ignore model.norm`` did)."""
    pruner = Pruner(smol_meta.model, smol_meta.example_inputs, importance="random",
                    targets="all", ignored=["model.embed_tokens"])
    residual = next(g for g in pruner.groups if target_of(g) is Target.RESIDUAL)
    assert not residual.prunable
    assert residual.reason == "outputs of ignored module 'model.embed_tokens'"


def test_trace_names_each_groups_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--model", "hf:llama", "--no-preflight", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["default_targets"] == ["mlp", "heads", "channels"]
    kinds = {g["target"] for g in out["groups"] if g["prunable"]}
    assert kinds == {"mlp", "heads", "residual"}
    assert main(["trace", "--model", "hf:llama", "--no-preflight"]) == 0
    assert "residual stream (64 ch): model.layers (residual, " in capsys.readouterr().out
