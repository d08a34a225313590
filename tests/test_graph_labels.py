"""Edge labels clear of box titles and nodes, in both drawings of the graph: the interactive
component (its committed bundle in Chromium, fed view models as Streamlit would, no server)
and the DOT download (laid out by Graphviz itself)."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llamas import LLAMA_7B, MHA_LLAMA

import explorer
from explorer.io.specs import load_model
from explorer.render.dot import graph_to_dot
from explorer.render.view import build_view

CHROMIUM = "/usr/bin/chromium"
PAGE = Path(__file__).resolve().parents[1] / "components" / "graph_view" / "static" / "index.html"
MODELS = {"7b": (LLAMA_7B, "meta"), "llama": (MHA_LLAMA, "cpu"),
          "dino": ("demo:dino_vit", "cpu"),
          "vit": ("timm:vit_tiny_patch16_224?img_size=32", "meta"),
          "resnet": ("timm:resnet18", "meta")}
# (model, depth, selected group): the Graph page's default, deeper, and a group's open chain
CASES = [("7b", 2, None), ("7b", 3, 2), ("llama", 3, None), ("llama", 2, 2), ("dino", 2, None),
         ("dino", 2, 2), ("dino", 4, None), ("vit", 3, None), ("resnet", 3, None)]

Box = tuple[float, float, float, float]


@pytest.fixture(scope="module")
def graphs() -> dict[str, explorer.ModelGraph]:
    out = {}
    for name, (spec, device) in MODELS.items():
        lm = load_model(spec, device=device)
        out[name] = explorer.trace(lm.model, lm.example_inputs)
    return out


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 800})
        finally:
            browser.close()


def _draw(page: Any, view: dict[str, Any]) -> dict[str, Any]:
    """The component's own account of its drawing of ``view`` (a fresh load each time)."""
    page.goto(PAGE.as_uri())
    page.evaluate("(v) => window.postMessage({type: 'streamlit:render', args: "
                  "{view: v, height: 780, model_key: 'm'}}, '*')", view)
    page.wait_for_selector("#pe-state[data-ready='1']", state="attached", timeout=60_000)
    return dict(page.evaluate("window.peGraph.overlaps()"))


@pytest.mark.browser
@pytest.mark.parametrize(("model", "depth", "group"), CASES)
def test_component_edge_labels_clear_titles_and_nodes(page: Any, graphs: dict[str, Any],
                                                      model: str, depth: int,
                                                      group: int | None) -> None:
    """No edge label meets a box title, a node or another label, edges that cross a box's
    border included (the 7B shape's `[1, 16]` drew over "model (LlamaModel)"), and no box
    title meets a node (ELK leaves each open box room for its title)."""
    drawn = _draw(page, build_view(graphs[model], depth=depth, group=group).to_component())
    assert drawn["labels"] > 0 and drawn["titles"] > 0
    assert drawn["overlaps"] == []


@pytest.mark.browser
@pytest.mark.parametrize(("model", "group"), [("7b", 2), ("dino", 2)])
def test_component_groups_page_subgraph_keeps_labels_clear(page: Any, graphs: dict[str, Any],
                                                           model: str, group: int) -> None:
    """The Groups page's subgraph of a proposal (members, chain, one hop) is drawn clear too."""
    sub = build_view(graphs[model], group=group).subgraph()
    drawn = _draw(page, sub.to_component())
    assert drawn["labels"] > 0 and drawn["titles"] > 0
    assert drawn["overlaps"] == []


@pytest.mark.browser
def test_component_expand_all_keeps_labels_clear(page: Any, graphs: dict[str, Any]) -> None:
    """The same after the user opens every box in the browser (labels re-placed by ELK)."""
    _draw(page, build_view(graphs["7b"], depth=2).to_component())
    page.click("#pe-expand-all")
    page.wait_for_function("window.peGraph.overlaps().titles > 2", timeout=60_000)
    drawn = page.evaluate("window.peGraph.overlaps()")
    assert drawn["overlaps"] == []
    assert all(not i.startswith("label:") for i in page.evaluate("window.peGraph.visible()"))


def _dot_boxes(dot: str) -> tuple[list[tuple[str, Box]], list[tuple[str, Box]]]:
    """(edge labels, cluster titles and nodes) of Graphviz's own layout, with their boxes in
    points (text boxes from the drawn text's width and font size)."""
    js = json.loads(subprocess.run(["dot", "-Tjson"], input=dot.encode(), capture_output=True,
                                   check=True).stdout)

    def texts(ops: list[dict[str, Any]], name: str) -> list[tuple[str, Box]]:
        size, out = 10.0, []
        for op in ops:
            if op["op"] == "F":
                size = float(op["size"])
            elif op["op"] == "T":
                (x, y), w = op["pt"], float(op["width"])
                x0 = x - w / 2 if op["align"] == "c" else (x if op["align"] == "l" else x - w)
                out.append((name, (x0, y - 0.25 * size, x0 + w, y + 0.9 * size)))
        return out

    labels = [t for e in js.get("edges", []) for t in texts(e.get("_ldraw_", []), e["label"])]
    others: list[tuple[str, Box]] = []
    for o in js.get("objects", []):
        if o["name"].startswith("cluster"):
            others += texts(o.get("_ldraw_", []), "title " + o["label"])
        else:
            x, y = map(float, o["pos"].split(","))
            w, h = float(o["width"]) * 36, float(o["height"]) * 36
            others.append((o["name"], (x - w, y - h, x + w, y + h)))
    return labels, others


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is absent")
@pytest.mark.parametrize(("model", "depth", "group"), CASES)
def test_dot_edge_labels_clear_titles_and_nodes(graphs: dict[str, Any], model: str,
                                                depth: int, group: int | None) -> None:
    """The DOT download laid out by Graphviz: no edge label meets a cluster title or a node."""
    labels, others = _dot_boxes(graph_to_dot(graphs[model], depth, highlight_group=group))
    assert labels and any(n.startswith("title ") for n, _ in others)
    hits = [(t, n) for t, a in labels for n, b in others
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
    assert hits == []
