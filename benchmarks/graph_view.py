"""Graph view benchmark: view-model build time (and, with --browser, first render and a click).

    python benchmarks/graph_view.py --runs 5            # view model: 7B shape folded, resnet50 open
    python benchmarks/graph_view.py --runs 3 --browser  # + page interactive and click round trip

Targets (issue 11): view model <= 0.5 s for both graphs; the Graph page interactive within
2 s of load. Traces are built once and not timed (see benchmarks/llama7b_meta.py for those).
The browser part starts ``streamlit run app.py`` headless and drives Debian's Chromium.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import explorer  # noqa: E402
from explorer.io.specs import load_model  # noqa: E402
from explorer.render.view import build_view  # noqa: E402

LLAMA_7B = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
            "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")


def _median_build(mg: explorer.ModelGraph, runs: int, **kwargs: object) -> tuple[float, float]:
    """(first build, median of the following ``runs``) in seconds."""
    t0 = time.perf_counter()
    build_view(mg, **kwargs)  # type: ignore[arg-type]
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        build_view(mg, **kwargs)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def view_models(runs: int) -> None:
    cases = [("7B-shape Llama, meta, folded, depth 3", LLAMA_7B, "meta", {"depth": 3}),
             ("resnet50, fully expanded, unfolded", "timm:resnet50", "cpu",
              {"depth": 99, "fold": False})]
    for title, spec, device, kwargs in cases:
        lm = load_model(spec, device=device)
        mg = explorer.trace(lm.model, lm.example_inputs)
        first, median = _median_build(mg, runs, **kwargs)
        view = build_view(mg, **kwargs)  # type: ignore[arg-type]
        shown = view.visible()
        print(f"{title}: first {first:.3f} s, median of {runs} {median:.3f} s "
              f"({len(view.nodes)} nodes, {len(view.edges)} op edges; drawn "
              f"{len(shown.nodes)} nodes, {len(shown.edges)} edges)")


def browser(runs: int) -> None:
    """Load the Graph page on the default model; time first render and a click round trip."""
    import os
    import socket
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py",
                             "--server.headless", "true", "--server.port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            loads, clicks = [], []
            ready = "#pe-state[data-ready='1']"
            for _ in range(runs):
                page = b.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)  # a new session: the default model is traced (cached after)
                page.get_by_text("prunable groups").wait_for(timeout=120_000)
                t0 = time.perf_counter()
                page.get_by_role("link", name="Graph").click()
                frame = page.frame_locator("iframe[title*='graph_view']")
                frame.locator(ready).wait_for(timeout=60_000, state="attached")
                loads.append(time.perf_counter() - t0)
                f = page.frame(url=lambda u: "pe_graph_view" in u)
                assert f is not None
                box = f.evaluate("window.peGraph.box('m:blocks.0')")
                el = page.locator("iframe[title*='graph_view']").bounding_box()
                assert box is not None and el is not None
                t0 = time.perf_counter()
                page.mouse.click(el["x"] + (box["x1"] + box["x2"]) / 2,
                                 el["y"] + (box["y1"] + box["y2"]) / 2)
                frame.locator("#pe-state[data-group='2']").wait_for(timeout=60_000,
                                                                    state="attached")
                clicks.append(time.perf_counter() - t0)
                page.close()
            b.close()
        print(f"Graph page (default model demo:dino_vit_safe): drawn and interactive "
              f"{statistics.median(loads):.2f} s after opening it, click-to-select round trip "
              f"(click, rerun, new view drawn) {statistics.median(clicks):.2f} s "
              f"(medians of {runs})")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also time the Graph page")
    args = parser.parse_args()
    view_models(args.runs)
    if args.browser:
        browser(args.runs)


if __name__ == "__main__":
    main()
