"""The statement says the cut that happens, layer by layer (issue 20 items 1 and 4), on a
tiny Qwen2 with GQA (4 layers, 8 query / 2 key/value heads): per-layer head counts read back
from the pruned model's modules, targets an allocation across targets leaves out said as
such, and a group spanning every layer titled by all of them, not by layer 0."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from explorer import Pruner
from explorer.api import trace
from explorer.app.cli import main
from explorer.coupling.groups import layer_span, number_ranges
from explorer.io.specs import LoadedModel, load_model
from explorer.prune.statement import statement

pytest.importorskip("transformers")

QWEN2 = ("hf:qwen2?hidden_size=64&num_hidden_layers=4&num_attention_heads=8"
         "&num_key_value_heads=2&intermediate_size=128&vocab_size=64")


def _qwen2() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(QWEN2)


def _heads(lm: LoadedModel) -> list[tuple[int, int]]:
    """(query heads, key/value heads) of each layer, from its projections' widths."""
    out = []
    for layer in lm.model.model.layers:
        attn = layer.self_attn
        out.append((attn.q_proj.out_features // 8, attn.k_proj.out_features // 8))
    return out


def _grouped(name: str, before: int, after: list[int]) -> str:
    """The words the statement must use for layers whose counts differ."""
    parts = []
    for n, _c in sorted(Counter(after).items(), key=lambda kv: (kv[0] - before, kv[0])):
        where = [str(k) for k, a in enumerate(after) if a == n]
        layers = ("layers " if len(where) > 1 else "layer ") + ", ".join(where)
        parts.append(f"kept in {layers}" if n == before else f"{before} -> {n} in {layers}")
    return f"{name} {before * len(after)} -> {sum(after)} ({'; '.join(parts)})"


def test_global_whole_heads_say_each_layers_real_count() -> None:
    """Was "query heads 32 -> 24 (8 -> 6 in each of 4 layers)": an average said as a
    per-layer count, where two layers lost half their heads and two kept all."""
    lm = _qwen2()
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="whole",
                    allocation="global", targets="heads")
    said = statement(pruner)
    [loss] = [x for x in said.losses if x.target == "heads"]
    pruner.step()
    made = _heads(lm)
    assert len(set(made)) > 1  # the layers' counts differ: the case at hand
    words = loss.details()
    assert _grouped("query heads", 8, [q for q, _kv in made]) in words
    assert _grouped("key/value heads", 2, [kv for _q, kv in made]) in words
    assert [(x.query_after, x.kv_after) for x in loss.head_layers] == made
    cut = [str(k) for k, (_q, kv) in enumerate(made) if kv < 2]
    assert f"key/value groups 2 -> 1 in layers {', '.join(cut)}" in words
    assert "in each of" not in words


@pytest.mark.parametrize("allocation", ["global", "measured"])
def test_heads_an_allocation_leaves_out_are_said_uncut(allocation: str) -> None:
    """Was "heads: 30% ... widths differ per layer" and nothing else, with no head cut: the
    allocation across targets spent the whole cut on MLP channels (their scores rank lower;
    measured: they change the outputs less per parameter). Now it says none is cut, and why."""
    lm = _qwen2()
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, heads="query",
                    allocation=allocation, targets="mlp,heads")
    said = statement(pruner)
    [heads] = [x for x in said.losses if x.target == "heads"]
    [mlp] = [x for x in said.losses if x.target == "mlp"]
    pruner.step()
    assert _heads(lm) == [(8, 2)] * 4  # no head cut
    assert lm.model.model.layers[0].mlp.up_proj.out_features < 128  # the MLPs were
    assert heads.cut == 0 and heads.params_removed == 0 and mlp.cut == 4
    assert heads.note.startswith(f"none cut: the {allocation} allocation gave heads none of "
                                 f"the cut: ")
    why = {"global": r"its lowest unit scores [0-9.]+, above the last unit taken from the "
                     r"other targets \([0-9.]+\)",
           "measured": r"KL per million parameters: [0-9.e+-]+ at its cheapest measured cut, at "
                       r"most [0-9.e+-]+ for the cuts taken"}[allocation]
    assert heads.note in heads.details()
    assert re.search(why, heads.note)


def test_a_group_spanning_layers_is_titled_by_all_of_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Was "8 heads x 8: model.layers.0.self_attn.q_proj" for the head group every layer's
    attention shares (rotary); the CLI's trace and the app read the same title."""
    lm = load_model(QWEN2, device="meta")
    titles = [g.title for g in trace(lm.model, lm.example_inputs).groups()]
    assert "8 heads x 8: model.layers.*.self_attn.q_proj (layers 0-3)" in titles
    assert "128 ch: model.layers.0.mlp.gate_proj" in titles  # one layer: named as it is
    assert main(["trace", "--model", QWEN2, "--device", "meta"]) == 0
    assert "8 heads x 8: model.layers.*.self_attn.q_proj (layers 0-3)" in capsys.readouterr().out


def test_layer_span_and_ranges() -> None:
    assert number_ranges([3, 0, 1, 2]) == "0-3"
    assert number_ranges([0, 2]) == "0, 2"
    assert number_ranges([0, 1, 5, 6, 7]) == "0, 1, 5-7"
    assert layer_span(["blocks.0.attn.qkv", "blocks.0.attn.proj"]) == "blocks.0.attn.qkv"
    assert layer_span(["m.layers.1.q", "m.layers.1.k", "m.layers.3.q", "m.rotary"]) == \
        "m.layers.*.q (layers 1, 3)"
    assert layer_span(["model.embed_tokens"]) == "model.embed_tokens"


def test_heads_ranked_in_then_tied_back_are_not_said_to_score_above() -> None:
    """Was "its lowest unit scores 0.919, above the last unit taken ... (0.947)" with default
    head dims under the global allocation: the ranking did give value head dims a few units,
    which the tie to the rotary pairs (kept whole) took back. The reason now says so, and a
    score is never said to be above one it is below."""
    lm = _qwen2()
    pruner = Pruner(lm.model, lm.example_inputs, ratio=0.3, allocation="global")
    [heads] = [x for x in statement(pruner).losses if x.target == "heads"]
    pruner.step()
    assert _heads(lm) == [(8, 2)] * 4
    assert all(m.self_attn.v_proj.out_features == 16 for m in lm.model.model.layers)
    assert heads.cut == 0
    assert re.fullmatch(r"none cut: the global allocation gave heads none of the cut: the "
                        r"ranking across targets gave it [1-9][0-9]* unit\(s\), all taken back "
                        r"by the whole-unit steps after it \(head dims follow their rotary "
                        r"pairs, heads go whole, widths round\)", heads.note)
    for a, b in re.findall(r"scores ([0-9.]+), above .*\(([0-9.]+)\)", heads.note):
        assert float(a) >= float(b)
