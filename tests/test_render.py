"""Renderers: DOT determinism and folding, plotly figure contents, head table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import explorer
from explorer.coupling.heads import legal_head_ratios
from explorer.io.specs import load_model
from explorer.render.dot import dot_to_svg, graph_to_dot, has_dot
from explorer.render.figures import (
    attention_rows,
    axes_rows,
    cost_figure,
    importance_figure,
    search_modules,
    sensitivity_figure,
    widths_figure,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("PE_REGEN_GOLDEN") == "1"


@pytest.fixture(scope="module")
def dino() -> explorer.ModelGraph:
    lm = load_model("demo:dino_vit")
    return explorer.trace(lm.model, lm.example_inputs)


@pytest.fixture(scope="module")
def vit_tiny() -> explorer.ModelGraph:
    lm = load_model("timm:vit_tiny_patch16_224?img_size=32", device="meta")
    return explorer.trace(lm.model, lm.example_inputs)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_dot_is_deterministic(dino: explorer.ModelGraph, depth: int) -> None:
    lm = load_model("demo:dino_vit")
    again = explorer.trace(lm.model, lm.example_inputs)
    assert graph_to_dot(dino, depth, highlight_group=2) == \
        graph_to_dot(again, depth, highlight_group=2)


def test_dot_folds_repeated_blocks(dino: explorer.ModelGraph) -> None:
    folded = graph_to_dot(dino, depth=2)
    assert '"m:blocks.0" [label="0-2 x3 (Block)' in folded and '"m:blocks.1"' not in folded
    assert "(each of 3)" in folded
    flat = graph_to_dot(dino, depth=2, fold_repeats=False)
    assert '"m:blocks.0" [label="0 (Block)' in flat and '"m:blocks.2"' in flat
    assert "x3" not in flat
    assert "weight [96, 3, 8, 8]" in folded  # parameter shapes in labels
    assert 'subgraph "cluster_m:blocks" {' in folded  # a module is a box around its children


def test_dot_highlight_splits_the_fold(dino: explorer.ModelGraph) -> None:
    dot = graph_to_dot(dino, depth=2, highlight_group=2)  # the qkv group of blocks.0
    assert 'subgraph "cluster_m:blocks.0" {' in dot and '"m:blocks.1" [label="1-2 x2' in dot
    assert dot.count("shape=octagon") == 3  # the three selects that pin the q/k/v axis
    assert '[label="[1, 17, 3*, 6*, 16*]", color="#D62728"' in dot  # the chain, coupled dims


def test_dot_errors(dino: explorer.ModelGraph) -> None:
    with pytest.raises(ValueError, match="depth must be"):
        graph_to_dot(dino, depth=0)
    with pytest.raises(ValueError, match="group 99 does not exist"):
        graph_to_dot(dino, highlight_group=99)


@pytest.mark.parametrize("depth", [1, 2])
def test_dot_timm_vit_tiny(vit_tiny: explorer.ModelGraph, depth: int) -> None:
    dot = graph_to_dot(vit_tiny, depth)
    assert dot == graph_to_dot(vit_tiny, depth)
    assert dot.startswith("digraph model {") and dot.rstrip().endswith("}")
    if depth == 2:
        assert '"m:blocks.0" [label="0-11 x12 (Block)' in dot
    else:
        assert '"m:blocks" [label="blocks (Sequential)' in dot and "x12" not in dot
    assert len(dot.splitlines()) < 80  # collapsed boxes, not one node per op


@pytest.mark.skipif(not has_dot(), reason="graphviz 'dot' binary not installed")
def test_svg(dino: explorer.ModelGraph) -> None:
    assert b"<svg" in dot_to_svg(graph_to_dot(dino, 2))


def test_importance_figure_marks_the_cut() -> None:
    fig = importance_figure(np.array([3.0, 1.0, 2.0, 0.5]), [1, 3])
    data = json.loads(fig.to_json())
    names = [t["name"] for t in data["data"]]
    assert names == ["kept", "removed"]
    assert data["data"][1]["customdata"] == [3, 1]  # lowest scores first
    assert any("cut: 2 of 4" in a["text"] for a in data["layout"]["annotations"])


def test_widths_and_cost_figures() -> None:
    w = json.loads(widths_figure({"a": 8, "b": 4}, {"a": 4, "b": 4}).to_json())
    assert [t["name"] for t in w["data"]] == ["before", "after"]
    assert w["data"][1]["y"] == [4, 4]
    c = json.loads(cost_figure({"a": 10}, {"a": 100, "b": 5}).to_json())
    assert [t["name"] for t in c["data"]] == ["params", "MACs"]
    assert c["data"][1]["x"] == ["a", "b"]


def test_attention_rows_and_legal_ratios(dino: explorer.ModelGraph) -> None:
    rows = attention_rows(dino.attention())
    assert len(rows) == 3
    assert rows[0]["heads"] == 6 and rows[0]["head_dim"] == 16 and rows[0]["ok"]
    assert rows[0]["whole-head ratios"] == "1/6, 1/3, 1/2, 2/3, 5/6"
    assert legal_head_ratios(4) == ["1/4", "1/2", "3/4"]


@pytest.mark.parametrize("depth", [1, 2])
def test_dot_matches_golden(dino: explorer.ModelGraph, depth: int) -> None:
    """Run with PE_REGEN_GOLDEN=1 to rewrite tests/golden/ after an intended change."""
    path = GOLDEN / f"dino_vit_depth{depth}.dot"
    dot = graph_to_dot(dino, depth)
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(dot)
    assert path.exists(), f"{path} is missing: run with PE_REGEN_GOLDEN=1"
    assert dot == path.read_text(), "DOT changed; if intended, rerun with PE_REGEN_GOLDEN=1"


def test_dot_search_highlight(dino: explorer.ModelGraph) -> None:
    found = search_modules(dino.graph.modules, "blocks.1.mlp")
    assert found[0] == "blocks.1.mlp" and all("blocks.1.mlp" in f for f in found)
    dot = graph_to_dot(dino, depth=2, highlight_modules=found)
    assert dot.count("#D62728") == 1 and '"m:blocks.1" [label="1 (Block)' in dot  # split out
    assert "x3" not in dot and '"m:blocks.2" [label="2 (Block)' in dot
    assert search_modules(dino.graph.modules, "LINEAR")  # class names match too
    assert search_modules(dino.graph.modules, "  ") == []


def test_attention_rows_flag_violations(dino: explorer.ModelGraph) -> None:
    infos = dino.attention()
    rows = attention_rows(infos)
    assert len(rows) == 3 and all(r["ok"] for r in rows)
    assert rows[0]["whole-head ratios"].startswith("1/6, 1/3")
    bad = infos[0].__class__(**{**infos[0].to_dict(), "num_heads": 6, "kv_heads": 4,
                                "divisible": {"blocks.0.attn.qkv": False}})
    row = attention_rows([bad])[0]
    assert not row["ok"]
    assert "not divisible by heads" in row["violations"]
    assert "6 heads not divisible by 4 kv heads" in row["violations"]


def test_axes_rows_and_sensitivity_figure(dino: explorer.ModelGraph) -> None:
    rows = axes_rows(dino.groups()[2])
    assert {r["role"] for r in rows} >= {"heads", "head-dim"}
    fig = json.loads(sensitivity_figure([
        {"title": "a", "ratio": 0.5, "output_change": 0.2, "params_removed": 10},
        {"title": "a", "ratio": 0.25, "output_change": 0.1, "params_removed": 5},
        {"title": "b", "ratio": 0.5, "output_change": float("inf"), "params_removed": 3},
    ]).to_json())
    assert [t["name"] for t in fig["data"]] == ["a", "b"]
    assert fig["data"][0]["x"] == [0.25, 0.5] and fig["data"][1]["y"] == [1e6]


def test_compact_counts_fit_a_metric_column() -> None:
    from explorer.render.figures import compact
    assert compact(179_482) == "179,482" and compact(9_999_999) == "9,999,999"
    assert compact(6_738_415_616) == "6.74 B" and compact(105_780_000_000) == "106 B"
    assert compact(-52_856_619_008) == "-52.9 B" and compact(12_500_000) == "12.5 M"
