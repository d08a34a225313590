"""The graph view model: true nesting, exact folds, op-level group chains, the CLI's JSON."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import explorer
from explorer.app.cli import main
from explorer.io.specs import load_model
from explorer.render.view import NodeKind, ViewModel, build_view

LLAMA_SMALL = ("hf:llama?num_hidden_layers=6&hidden_size=64&intermediate_size=128"
               "&num_attention_heads=4&num_key_value_heads=4&vocab_size=128")
LLAMA_7B = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
            "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")


def _trace(spec: str, device: str = "cpu") -> explorer.ModelGraph:
    lm = load_model(spec, device=device)
    return explorer.trace(lm.model, lm.example_inputs)


@pytest.fixture(scope="module")
def dino() -> explorer.ModelGraph:
    return _trace("demo:dino_vit")


@pytest.fixture(scope="module")
def resnet50() -> explorer.ModelGraph:
    return _trace("timm:resnet50")


def _assert_no_edge_to_own_box(view: ViewModel) -> None:
    ancestors = {n.id: set(view.ancestors(n.id)) for n in view.nodes}
    for e in view.edges:
        assert e.source != e.target
        assert e.source not in ancestors[e.target], (e.source, e.target)
        assert e.target not in ancestors[e.source], (e.source, e.target)


def _assert_acyclic(view: ViewModel) -> None:
    succ: dict[str, list[str]] = {n.id: [] for n in view.nodes}
    indegree = dict.fromkeys(succ, 0)
    for e in view.edges:
        succ[e.source].append(e.target)
        indegree[e.target] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for m in succ[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    assert seen == len(succ), "the drawn graph has a cycle"


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("fold", [True, False])
def test_no_edge_joins_a_node_to_its_own_box(dino: explorer.ModelGraph, depth: int,
                                             fold: bool) -> None:
    view = build_view(dino, depth=depth, fold=fold)
    _assert_no_edge_to_own_box(view)  # op level
    shown = view.visible()
    _assert_no_edge_to_own_box(shown)
    _assert_acyclic(shown)
    drawn = {n.id for n in shown.nodes}
    for e in shown.edges:  # edges join drawn ops or closed boxes, never an open box
        for end in (e.source, e.target):
            node = shown.node(end)
            assert end in drawn and not (node.kind is NodeKind.MODULE and node.expanded)


def test_sequential_model_is_acyclic_at_every_depth() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh())),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, 4))
    mg = explorer.trace(model, torch.randn(2, 8))
    for depth in range(1, 6):
        for fold in (True, False):
            view = build_view(mg, depth=depth, fold=fold)
            shown = view.visible()
            _assert_acyclic(shown)
            _assert_no_edge_to_own_box(shown)
            assert shown.nodes[0].kind is NodeKind.INPUT
            assert shown.nodes[-1].kind is NodeKind.OUTPUT
    everything = build_view(mg, depth=9, fold=False).visible()
    # every module with ops is a box, every Linear is one drawn op (its weight's `t` is not)
    assert sum(n.kind is NodeKind.MODULE for n in everything.nodes) == 15
    assert sum(n.label == "linear" for n in everything.nodes) == 6
    folded = build_view(mg, depth=9).visible()  # 3 and 4 are identical: one box x2
    assert folded.node("m:3").copies == 2 and folded.node("m:3").label == "3-4 x2 (Sequential)"
    assert "m:4" not in {n.id for n in folded.nodes}


def test_resnet50_folds_only_identical_blocks(resnet50: explorer.ModelGraph) -> None:
    shown = build_view(resnet50, depth=2).visible()
    ids = {n.id: n for n in shown.nodes}
    assert ids["m:layer1.0"].copies == 1  # it has a downsample
    assert ids["m:layer1.1"].copies == 2 and ids["m:layer1.1"].label == "1-2 x2 (Bottleneck)"
    assert "m:layer1.2" not in ids
    assert [ids[f"m:layer{k}.1"].copies for k in (2, 3, 4)] == [3, 5, 2]
    assert "weight [64, 64, 1, 1]" not in " ".join(ids["m:layer1.1"].detail)
    assert ids["m:layer1.1"].detail[-1] == "9 parameters, 70,400 weights (each of 2)"
    assert ids["m:layer1.0"].detail[-1] == "12 parameters, 75,008 weights"
    _assert_acyclic(shown)
    unfolded = build_view(resnet50, depth=99, fold=False).visible()
    convs = [n for n in unfolded.nodes if n.label == "conv"]
    assert len(convs) == 53 and not any(n.kind is NodeKind.MODULE and not n.expanded
                                        for n in unfolded.nodes)
    _assert_acyclic(unfolded)
    _assert_no_edge_to_own_box(unfolded)


def _qkv_group(mg: explorer.ModelGraph) -> int:
    return next(g.id for g in mg.groups() if g.title == "6 heads x 16: blocks.0.attn.qkv")


def test_dino_qkv_chain_at_op_level(dino: explorer.ModelGraph) -> None:
    gid = _qkv_group(dino)
    view = build_view(dino, depth=2, group=gid)
    chain = [n for n in view.nodes if n.kind is NodeKind.OP and n.chain]
    labels = [n.label for n in chain]
    assert labels.count("select dim 0 [0]") == labels.count("select dim 0 [1]") == 1
    assert "select dim 0 [2]" in labels
    assert all("selected by the constant index" in n.pins for n in chain
               if n.label.startswith("select"))
    assert not any(n.pins for n in chain if not n.label.startswith("select"))
    shapes = {e.shape: e for e in view.edges if gid in e.group_ids}
    assert shapes[(1, 17, 3, 6, 16)].label == "[1, 17, 3*, 6*, 16*]"  # reshape into heads
    assert shapes[(1, 17, 96)].label == "[1, 17, 96*]"  # reshape back, into proj
    reshapes = [n for n in chain if n.label == "reshape" and n.module == "blocks.0.attn"]
    outputs = {dino.graph.values[v].shape for n in reshapes
               for v in dino.graph.ops[int(n.id[3:])].outputs if v is not None}
    assert {(1, 17, 3, 6, 16), (1, 17, 96)} <= outputs  # both reshapes
    ends = {n.module for n in chain if n.label == "linear"}
    assert ends == {"blocks.0.attn.qkv", "blocks.0.attn.proj"}
    assert not any(n.chain for n in view.nodes if n.module.startswith("blocks.0.mlp"))
    shown = view.visible()  # the chain's boxes are open, the other blocks stay folded
    assert shown.node("m:blocks.0.attn").expanded and shown.node("m:blocks.1").copies == 2
    assert gid in shown.node("m:blocks.0.attn.qkv").group_ids
    assert shown.node("m:blocks.0").primary_group == gid  # a click on the block selects it


def test_llama_layers_fold_to_one_block() -> None:
    mg = _trace(LLAMA_SMALL)
    shown = build_view(mg, depth=3).visible()
    layers = [n for n in shown.nodes if n.parent == "m:model.layers"]
    assert [(n.id, n.copies, n.label) for n in layers] == [
        ("m:model.layers.0", 6, "0-5 x6 (LlamaDecoderLayer)")]
    _assert_acyclic(shown)
    _assert_no_edge_to_own_box(build_view(mg, depth=9))


@pytest.mark.slow
def test_llama_7b_shape_folds_to_one_block() -> None:
    mg = _trace(LLAMA_7B, device="meta")
    shown = build_view(mg, depth=3).visible()
    layers = [n for n in shown.nodes if n.parent == "m:model.layers"]
    assert [(n.id, n.copies, n.label) for n in layers] == [
        ("m:model.layers.0", 32, "0-31 x32 (LlamaDecoderLayer)")]
    _assert_acyclic(shown)
    assert "weight [4096, 4096]" not in layers[0].detail[-1]
    assert layers[0].detail[-1].endswith("202,383,360 weights (each of 32)")


def test_json_api_has_exactly_the_fields(dino: explorer.ModelGraph) -> None:
    data = build_view(dino, depth=2, group=_qkv_group(dino)).visible().to_dict()
    assert {k for n in data["nodes"] for k in n} == {"id", "label", "parent", "kind",
                                                      "group_ids"}
    assert {k for e in data["edges"] for k in e} == {"source", "target", "shape", "group_ids"}
    assert data == build_view(_trace("demo:dino_vit"), depth=2,
                              group=_qkv_group(dino)).visible().to_dict()  # deterministic
    ids = {n["id"] for n in data["nodes"]}
    assert all(n["parent"] is None or n["parent"] in ids for n in data["nodes"])
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])


def test_cli_graph_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--model", "demo:dino_vit", "--depth", "3", "--group", "2",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"nodes", "edges"}
    node = {n["id"]: n for n in data["nodes"]}
    assert node["m:blocks.0.attn"]["kind"] == "module" and 2 in node["m:blocks.0.attn"][
        "group_ids"]
    assert any(2 in e["group_ids"] and e["shape"] == [1, 17, 3, 6, 16] for e in data["edges"])
    assert main(["graph", "--model", "demo:mlp", "--device", "meta", "--depth", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edges"]
    assert main(["graph", "--model", "demo:mlp", "--group", "99", "--json"]) == 2
    assert "group 99 does not exist" in capsys.readouterr().err
    assert main(["graph", "--model", "demo:mlp", "--depth", "0"]) == 2
    assert "depth must be >= 1" in capsys.readouterr().err


def test_subgraph_of_a_group(dino: explorer.ModelGraph) -> None:
    gid = _qkv_group(dino)
    sub = build_view(dino, depth=1, group=gid).subgraph()
    ops = {n.id for n in sub.nodes if n.kind is NodeKind.OP}
    chain = {n.id for n in sub.nodes if n.chain and n.kind is NodeKind.OP}
    assert chain and chain < ops  # members, chain and one hop of context
    context = ops - chain
    assert {sub.node(i).label for i in context} <= {"layer_norm", "reshape", "add"}
    assert all(n.expanded for n in sub.nodes if n.kind is NodeKind.MODULE)
    _assert_no_edge_to_own_box(sub)
    assert all(e.source in ops | {n.id for n in sub.nodes} for e in sub.edges)


def test_unsafe_group_is_marked_with_its_location() -> None:
    mg = _trace("demo:dino_vit")
    gid = _qkv_group(mg)
    view = build_view(mg, group=gid, unsafe={gid: "blocks.0.attn dino.py:58"})
    marked = {n.id for n in view.nodes if n.unsafe}
    assert marked == {"m:blocks.0.attn", *(n.id for n in view.nodes if n.label == "linear"
                                            and n.module.startswith("blocks.0.attn."))}
    assert len(marked) == 3 and view.node("m:blocks.0.attn").unsafe.endswith("dino.py:58")
    assert not any(n.unsafe for n in build_view(mg, group=gid).nodes)


def test_visible_moves_edges_to_the_outermost_closed_box(dino: explorer.ModelGraph) -> None:
    view = build_view(dino, depth=1, fold=False)
    inner_open = view.visible(expanded={"m:blocks.0.attn"})  # its parents stay closed
    ids = {n.id for n in inner_open.nodes}
    assert "m:blocks" in ids and "m:blocks.0" not in ids and "m:blocks.0.attn" not in ids
    opened = view.visible(expanded={"m:blocks", "m:blocks.1"})
    ids = {n.id for n in opened.nodes}
    assert {"m:blocks.0", "m:blocks.1.attn", "m:blocks.2"} <= ids and "m:blocks.0.attn" not in ids
    pairs = {(e.source, e.target) for e in opened.edges}
    # block 0 (closed) feeds the first op of block 1 (open): the edge ends at the op
    assert any(a == "m:blocks.0" and opened.node(b).parent == "m:blocks.1" for a, b in pairs)
    assert not any(a == b for a, b in pairs)
    _assert_acyclic(opened)
