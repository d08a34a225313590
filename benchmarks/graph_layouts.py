"""Compare Cytoscape layouts for the graph component in headless Chromium (issue 11's choice).

streamlit-cytoscape (PyPI) lays out with dagre / fcose / cola; our component uses ELK
(layered, compound-aware). Same elements for all: the 7B-shape Llama folded with every box
open, and resnet50 unfolded with every box open. Reports layout time (median), overlapping
leaf boxes and edges drawn upward (against the dataflow).

    cd benchmarks/graph_layouts && npm ci && npx esbuild bench.js --bundle --minify \\
        --format=iife --outfile=bench.bundle.js && cd ../..
    python benchmarks/graph_layouts.py --runs 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explorer  # noqa: E402
from explorer.io.specs import load_model  # noqa: E402
from explorer.render.view import NodeKind, ViewModel, build_view  # noqa: E402

LLAMA_7B = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
            "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")
PAGE = Path(__file__).resolve().parent / "graph_layouts" / "index.html"


def elements(view: ViewModel) -> list[dict[str, Any]]:
    """Cytoscape elements of the drawn view, node sizes from their labels as in the component."""
    out: list[dict[str, Any]] = []
    for n in view.nodes:
        lines = [n.label, *(n.detail if n.kind is NodeKind.MODULE and not n.expanded else ())]
        data: dict[str, Any] = {"id": n.id, "w": max(40, max(map(len, lines)) * 6.3 + 16),
                                "h": len(lines) * 13 + 12}
        if n.parent is not None:
            data["parent"] = n.parent
        out.append({"group": "nodes", "data": data})
    for i, e in enumerate(view.edges):
        out.append({"group": "edges", "data": {"id": f"e{i}", "source": e.source,
                                               "target": e.target}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    cases = []
    for title, spec, device, fold in [("7B-shape Llama folded, all open", LLAMA_7B, "meta", True),
                                      ("resnet50 unfolded, all open", "timm:resnet50", "cpu",
                                       False)]:
        lm = load_model(spec, device=device)
        mg = explorer.trace(lm.model, lm.example_inputs)
        cases.append((title, elements(build_view(mg, depth=99, fold=fold).visible())))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(PAGE.as_uri())
        for title, els in cases:
            for layout in ("elk", "dagre", "fcose"):
                runs = [page.evaluate("([e, l]) => window.runLayout(e, l)", [els, layout])
                        for _ in range(args.runs)]
                ms = statistics.median(r["ms"] for r in runs)
                r = runs[-1]
                print(f"{title:34s} {layout:6s} {ms:8.0f} ms  {r['nodes']} nodes "
                      f"{r['edges']} edges  overlaps {r['overlaps']}  upward edges "
                      f"{r['upward']}")
        browser.close()


if __name__ == "__main__":
    main()
