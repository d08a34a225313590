"""A real browser (Debian's Chromium via Playwright) drives `streamlit run app.py`.

Saves screenshots of the Model, Graph, Groups, Dimensions and Export pages to docs/screenshots/.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def test_browser_accept_a_group(server: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS = ROOT / _SHOTS_ENV if _SHOTS_ENV else tmp_path  # noqa: N806 - a path constant
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)
            page.get_by_text("prunable groups").wait_for(timeout=90_000)
            page.screenshot(path=str(SHOTS / "model.png"), full_page=True)

            page.get_by_role("link", name="Graph").click()
            page.locator("svg").filter(has_text="blocks").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SHOTS / "graph.png"), full_page=True)

            page.get_by_role("link", name="Groups").click()
            page.get_by_role("button", name="Reject").wait_for(timeout=60_000)
            page.get_by_text("Pre-flight: the pruned copy runs").wait_for(timeout=60_000)
            params = page.get_by_test_id("stMetricValue").first
            start = params.inner_text()
            page.get_by_role("button", name="Accept", exact=True).click()
            page.get_by_text("accepted 1 group").wait_for(timeout=60_000)
            assert params.inner_text() != start
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
        finally:
            browser.close()
    for name in ("model.png", "graph.png", "groups.png", "dimensions.png", "export.png"):
        assert (SHOTS / name).stat().st_size > 10_000
