"""A real browser (Debian's Chromium via Playwright) drives `streamlit run app.py`.

Saves screenshots of the Model, Graph, Groups, Dimensions and Export pages to docs/screenshots/.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llamas import LLAMA_7B, MHA_LLAMA

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Screenshots go to a temporary folder; `PE_SCREENSHOTS=docs/screenshots` refreshes the README's.
_SHOTS_ENV = os.environ.get("PE_SCREENSHOTS")

pytestmark = [
    pytest.mark.browser,
    # CI sets PE_REQUIRE_BROWSER=1 (and installs Chromium), so there the test never skips.
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("PE_REQUIRE_BROWSER"),
                       reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"),
]


STALE_GONE = "!document.querySelector(\"[data-stale='true']\")"  # a rerun is fully drawn


def _settled(page: Any) -> None:
    """Wait until the page's run is over (Streamlit's running indicator gone, nothing stale):
    a screenshot before that can show a spinner and the previous run's elements."""
    page.wait_for_function(
        "!document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=300_000)
    page.wait_for_function(STALE_GONE, timeout=300_000)


def _shots(tmp_path: Path) -> Path:
    """Where screenshots go: ``tmp_path``, or the README's folder under ``PE_SCREENSHOTS``."""
    shots = ROOT / _SHOTS_ENV if _SHOTS_ENV else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextlib.contextmanager
def _chromium(url: str) -> Iterator[Any]:
    """A Chromium page (1400 x 1000) open at ``url``; the browser is closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            yield page
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    # The server's log goes to a file: a pipe nobody reads fills up (64 KiB) and then blocks
    # the server mid-request (seen in CI as a download button that never came back).
    log = (tmp_path_factory.mktemp("streamlit") / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("streamlit did not start within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_browser_accept_a_group(server: str, tmp_path: Path) -> None:
    SHOTS = _shots(tmp_path)  # noqa: N806 - a path constant
    with _chromium(server) as page:
        page.get_by_text("prunable groups").wait_for(timeout=90_000)
        page.screenshot(path=str(SHOTS / "model.png"), full_page=True)

        page.get_by_role("link", name="Groups").click()
        page.get_by_role("button", name="Reject").wait_for(timeout=60_000)
        page.get_by_text("Pre-flight: the pruned copy runs").wait_for(timeout=60_000)
        params = page.get_by_test_id("stMetricValue").first
        start = params.inner_text()
        page.wait_for_timeout(500)  # let the rerun that drew the verdict settle
        page.get_by_role("button", name="Accept", exact=True).click()
        page.get_by_text("accepted 1 group").wait_for(timeout=60_000)
        after = params.inner_text()
        assert after != start
        page.screenshot(path=str(SHOTS / "groups.png"), full_page=True)

        page.get_by_role("link", name="Dimensions & heads").click()
        page.get_by_text("Residual blocks (depth pruning)").wait_for(timeout=60_000)
        page.get_by_role("button", name="Compute sensitivity").click()
        page.get_by_text("sensitivity: relative output change").wait_for(timeout=90_000)
        page.screenshot(path=str(SHOTS / "dimensions.png"), full_page=True)

        page.get_by_role("link", name="Export").click()
        page.get_by_role("button", name="Run forward check").click()
        page.get_by_text("forward ok").wait_for(timeout=60_000)
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="Download plan JSON").click()
        plan = json.loads(Path(download.value.path()).read_text())
        assert plan["schema"] == 2 and plan["steps"] and plan["steps"][0]["tensors"]
        page.get_by_text("All formats").wait_for(timeout=60_000)
        page.get_by_role("button", name="Build export files").click()
        page.get_by_role("button", name="Download report.html").wait_for(timeout=120_000)
        page.get_by_text("CPU latency").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "export.png"), full_page=True)

        # A plain refresh after changing pages through the sidebar keeps the decisions:
        # the page links drop the query string and the app writes the session id back.
        page.wait_for_url(lambda u: "sid=" in u, timeout=30_000)
        page.reload()
        page.get_by_role("link", name="Groups").click()
        page.get_by_role("button", name="Reject").wait_for(timeout=90_000)
        page.get_by_test_id("stMetricValue").first.wait_for(timeout=60_000)
        assert page.get_by_test_id("stMetricValue").first.inner_text() == after
    for name in ("model.png", "groups.png", "dimensions.png", "export.png"):
        assert (SHOTS / name).stat().st_size > 10_000


GRAPH = "iframe[title*='graph_view']"


def _graph_frame(page: Any) -> Any:
    frame = page.frame(url=lambda u: "pe_graph_view" in u)
    assert frame is not None
    return frame


def _node_centre(page: Any, node_id: str) -> tuple[float, float]:
    """Page pixels of a node's centre (the graph is a canvas: ask the component where)."""
    box = _graph_frame(page).evaluate(f"window.peGraph.box({json.dumps(node_id)})")
    frame_box = page.locator(GRAPH).bounding_box()
    assert box is not None and frame_box is not None, node_id
    return (frame_box["x"] + (box["x1"] + box["x2"]) / 2,
            frame_box["y"] + (box["y1"] + box["y2"]) / 2)


def test_browser_graph_select_and_expand(server: str, tmp_path: Path) -> None:
    """A click on a block selects its group (highlighted, op-level chain); a double click
    expands a folded block in place."""
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS = _shots(tmp_path)  # noqa: N806 - a path constant
    with _chromium(server) as page:
        page.get_by_text("prunable groups").wait_for(timeout=90_000)
        page.get_by_role("link", name="Graph").click()
        state = page.frame_locator(GRAPH).locator("#pe-state")
        page.frame_locator(GRAPH).locator("#pe-state[data-ready='1']").wait_for(
            timeout=60_000, state="attached")
        graph = _graph_frame(page)
        assert not graph.evaluate("window.peGraph.isOpen('m:blocks.0')")
        assert graph.evaluate("window.peGraph.info('m:blocks.0').label") == "0-2 x3 (Block)"

        page.wait_for_timeout(500)  # let a rerun that follows the first draw settle
        page.mouse.click(*_node_centre(page, "m:blocks.0"))  # select: back to Python
        page.frame_locator(GRAPH).locator("#pe-state[data-group='2']").wait_for(
            timeout=60_000, state="attached")
        page.get_by_text("Selected group 2: 6 heads x 16: blocks.0.attn.qkv").wait_for(
            timeout=60_000)
        graph = _graph_frame(page)
        graph.wait_for_function("window.peGraph.isOpen('m:blocks.0.attn')", timeout=30_000)
        lit = (state.get_attribute("data-highlighted") or "").split()
        labels = [graph.evaluate(f"window.peGraph.info('{i}').label") for i in lit]
        assert "m:blocks.0.attn.qkv" in lit and "m:blocks.1" not in lit
        assert sorted(x for x in labels if x.startswith("select")) == [
            "select dim 0 [0]", "select dim 0 [1]", "select dim 0 [2]"]
        assert "member" in graph.evaluate("window.peGraph.info('m:blocks.0.attn.qkv')"
                                          ".classes")
        page.wait_for_timeout(500)
        page.screenshot(path=str(SHOTS / "graph.png"), full_page=True)

        page.frame_locator(GRAPH).get_by_role("button", name="Fit").click()
        assert not graph.evaluate("window.peGraph.isOpen('m:blocks.1')")
        assert graph.evaluate("window.peGraph.info('m:blocks.1').label") == "1-2 x2 (Block)"
        page.wait_for_timeout(500)
        page.mouse.dblclick(*_node_centre(page, "m:blocks.1"))  # expand in place
        graph.wait_for_function("window.peGraph.isOpen('m:blocks.1')", timeout=30_000)
        assert "m:blocks.1.attn" in graph.evaluate("window.peGraph.visible()")
        assert state.get_attribute("data-group") == "2"  # a double click selects nothing

        search = page.frame_locator(GRAPH).get_by_placeholder("search ops and modules")
        search.fill("fc2")
        search.press("Enter")  # opens the boxes around every hit and marks them
        graph.wait_for_function("window.peGraph.visible().includes('m:blocks.0.mlp.fc2')",
                                timeout=30_000)
        assert "hit" in graph.evaluate("window.peGraph.info('m:blocks.0.mlp.fc2').classes")

        page.wait_for_timeout(1000)  # the search may rerun the page: let it settle
        for attempt in range(2):  # a click that lands during a rerun is dropped by the app
            try:
                with page.expect_download(timeout=30_000) as download:  # made on click
                    page.get_by_role("button", name="Download DOT").click()
                break
            except sync_api.TimeoutError:
                if attempt:
                    raise
        dot = Path(download.value.path()).read_text()
        assert dot.startswith("digraph model") and 'subgraph "cluster_m:blocks.0"' in dot
    assert (SHOTS / "graph.png").stat().st_size > 10_000




def _load_on_meta(page: Any, spec: str, loaded: str, timeout: int) -> None:
    """On the Model page: type ``spec``, choose the meta device, load and trace, and wait
    until the page shows ``loaded``."""
    box = page.get_by_role("textbox", name="Model spec")
    box.fill(spec)
    box.press("Enter")
    page.get_by_text("meta", exact=True).click()
    page.wait_for_timeout(500)  # let the reruns of the edits settle
    page.get_by_role("button", name="Load and trace").click()
    page.get_by_text(loaded).wait_for(timeout=timeout)


def test_browser_switching_models_redraws_the_model_page(server: str, tmp_path: Path) -> None:
    """Seen on the 7B shape: after loading a transformers model on meta the input-shape field
    still offered DINO's ``1,3,32,32``, the spec was repeated as a large heading, and the
    first proposal was named after the embedding table, not the residual stream."""
    with _chromium(server) as page:
        page.get_by_text("prunable groups").wait_for(timeout=90_000)
        shape = page.get_by_role("textbox", name="Input shape (blank = default)")
        assert shape.get_attribute("placeholder") == "1,3,32,32"
        _load_on_meta(page, MHA_LLAMA, "options: hidden_size=64", 90_000)
        page.wait_for_function(
            "document.querySelector(\"input[aria-label='Input shape (blank = default)']\")"
            ".placeholder == '1,16'", timeout=30_000)
        headings = page.locator("h3").all_inner_texts()
        assert "hf:llama" in [h.strip() for h in headings]
        assert not any(MHA_LLAMA in h for h in headings)
        page.get_by_role("link", name="Groups").click()
        # a language model's residual stream is not a default target: the first
        # proposal is the first layer's heads, named after their projection
        page.get_by_text("Group 2: 4 heads x 16: model.layers.*.self_attn.q_proj (layers 0-2)"
                         ).wait_for(timeout=60_000)
        _settled(page)
        # what the settings cut is made when its box is opened (not on every run)
        said = re.compile(r"^params [\d,]+ (->|→) [\d,]+$")  # Markdown draws -> as →
        assert page.get_by_text(said).count() == 0
        page.get_by_text("What these settings cut").click()
        page.get_by_text(said).wait_for(timeout=60_000)
        page.get_by_text("residual is not a target").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "llama_groups.png"), full_page=True)


def test_browser_7b_shape_on_meta_groups_page(server: str, tmp_path: Path) -> None:
    """The Llama-2-7B shape on meta (no weights): loaded on the Model page, its Groups page
    drawn to the end (the layer table of 32 layers' heads), screenshot."""
    shots = _shots(tmp_path)
    with _chromium(server) as page:
        page.get_by_text("prunable groups").wait_for(timeout=90_000)
        _load_on_meta(page, LLAMA_7B, "options: hidden_size=4096", 300_000)
        page.get_by_role("link", name="Groups").click()
        page.get_by_text("Group 2: 32 heads x 128: model.layers.*.self_attn.q_proj "
                         "(layers 0-31)").wait_for(timeout=300_000)
        page.get_by_role("button", name="Reject").wait_for(timeout=300_000)
        _settled(page)  # the run is over, not only its first elements drawn
        assert page.get_by_text("33 layer rows").count() == 1  # the shared rotary row + 32
        page.screenshot(path=str(shots / "llama7b_groups.png"), full_page=True)
    assert (shots / "llama7b_groups.png").stat().st_size > 10_000


def test_browser_smollm2_decision_shows_its_cost_and_exports(server: str, tmp_path: Path,
                                                             smollm2: Path,
                                                             prose: tuple[Path, Path]) -> None:
    """A real decoder (SmolLM2-135M-Instruct) with real calibration and held-out text: the
    proposal's cost is on screen in the colour of its severity before Accept, a one-layer MLP
    cut says it would end the `from_pretrained` folder and offers the same cut in every
    layer, and the export after that is a transformers folder."""
    import re
    import zipfile

    SHOTS = _shots(tmp_path)  # noqa: N806 - a path constant
    with _chromium(server) as page:
        # The sidebar is the app's navigation, never the pages folder. (Only the first run
        # of a fresh server lists that folder, Streamlit's multipage v1, until app.py's
        # st.navigation replaces it in the same run: waited for, not raced.)
        page.get_by_role("link", name="Dimensions & heads").wait_for(timeout=90_000)
        assert page.get_by_role("link", name="session").count() == 0
        page.get_by_text("prunable groups").wait_for(timeout=90_000)
        page.get_by_text("Local checkpoint and data (real weights").click()
        fields = {"Local folder or weights file": str(smollm2),
                  "Calibration data": str(prose[0]),
                  "Held-out data (quality)": str(prose[1])}
        for name, value in fields.items():
            box = page.get_by_role("textbox", name=name)
            box.fill(value)
            box.press("Enter")
            page.wait_for_timeout(300)
            page.wait_for_function(STALE_GONE, timeout=120_000)  # the rerun is drawn
        for name, value in (("Samples (0 = all)", "8"), ("Sequence length", "32"),
                            ("Batch size", "4")):
            box = page.get_by_role("spinbutton", name=name)  # not its help button
            box.fill(value)
            box.press("Enter")
            page.wait_for_timeout(300)
            page.wait_for_function(STALE_GONE, timeout=120_000)  # the rerun is drawn
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Load and trace").click()
        page.get_by_test_id("stMetricLabel").filter(has_text="perplexity").first.wait_for(
            timeout=300_000)
        _settled(page)
        page.screenshot(path=str(SHOTS / "smollm2_model.png"), full_page=True)

        page.get_by_role("link", name="Groups").click()
        page.get_by_role("button", name="Reject").wait_for(timeout=300_000)
        page.get_by_test_id("stSelectbox").filter(has_text="Proposal").click()
        page.get_by_role("option", name=re.compile(r"model\.layers\.3\.mlp")).click()
        page.get_by_text("Group").filter(has_text="model.layers.3.mlp").first.wait_for(
            timeout=120_000)
        cost = page.get_by_test_id("stMarkdownContainer").filter(
            has_text=re.compile(r"Accepting it (costs|breaks)")).first
        cost.wait_for(timeout=300_000)
        assert re.search(r"perplexity [\d.,]+ → [\d.,]+ \(×", cost.inner_text())
        same = page.get_by_role("button", name="Accept the same cut in all 30 layers")
        same.wait_for(timeout=300_000)
        page.get_by_text("makes widths differ between layers").wait_for(timeout=60_000)
        _settled(page)
        page.screenshot(path=str(SHOTS / "smollm2_groups.png"), full_page=True)
        # the same cut in every layer costs far more than one layer: seen before Accept
        page.get_by_role("button", name="What does the same cut in all 30 layers cost?"
                         ).click()
        page.get_by_text("The same cut in all 30 layers:").wait_for(timeout=600_000)
        page.wait_for_function(STALE_GONE, timeout=300_000)
        same = page.get_by_role("button", name="Accept the same cut in all 30 layers")
        page.wait_for_timeout(500)
        same.click()
        page.get_by_text("accepted 30 group(s)").wait_for(timeout=600_000)
        # the rerun is over when the page says every group is decided (a language model
        # with real weights keeps its attention by default: no head proposal follows)
        page.get_by_text("Every prunable group is decided").wait_for(timeout=300_000)
        page.get_by_text("trade-off: quality against parameters").first.wait_for(
            timeout=300_000)
        page.wait_for_function(STALE_GONE, timeout=300_000)
        _settled(page)
        page.screenshot(path=str(SHOTS / "smollm2_accepted.png"), full_page=True)

        page.get_by_role("link", name="Export").click()
        page.get_by_text("All formats").wait_for(timeout=120_000)
        assert page.get_by_text("cannot describe the pruned model").count() == 0
        formats = page.get_by_test_id("stMultiSelect")
        for gone in ("pt", "safetensors", "report"):  # hf only: a short export
            formats.get_by_role("button", name=f"Remove {gone}").first.click()
            page.wait_for_timeout(300)
        page.get_by_role("button", name="Build export files").click()
        button = page.get_by_role("button", name="Download pruned_hf.zip")
        button.wait_for(timeout=600_000)
        with page.expect_download(timeout=300_000) as download:
            button.click()
        with zipfile.ZipFile(download.value.path()) as zf:
            config = json.loads(zf.read("hf/config.json"))
        assert config["intermediate_size"] < 1536  # one width for every layer, said
    for name in ("smollm2_model.png", "smollm2_groups.png", "smollm2_accepted.png"):
        assert (SHOTS / name).stat().st_size > 10_000
