"""Server-side time of the Streamlit app (AppTest, no browser): median of N runs.

Each figure is wall time; the 7B Groups page rows also give the CPU time of this process
(AppTest runs the page in it), which a busy shared machine disturbs less.

Measures, per model spec on ``meta``: loading + tracing from the Model page, then the first
render of the Graph page; on the default model one accept + reject round trip on the
Groups page; and on the Llama-2-7B shape (meta) Accept, Undo and Accept all on the Groups
page. Usage: ``python benchmarks/app_render.py [--runs 3] [--only-7b] [--pages-direct]``.
Every run starts from ``app.py`` as on a server (``tests/served.py``: heap trim, registry
measure, session lock after each page run); ``--pages-direct`` gives AppTest's own runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PE_SESSION_DIR", tempfile.mkdtemp())  # not the user's session logs
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # served.py: AppTest runs through app.py

import streamlit as st  # noqa: E402
from served import run_app_py_every_time  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "app.py")
SPECS = ["timm:vit_base_patch16_224",
         "hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
         "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000"]


def _timed(fn) -> float:  # noqa: ANN001
    return _timed_cpu(fn)[0]


def _timed_cpu(fn) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _check(at: AppTest) -> None:
    if at.exception or at.error:
        raise RuntimeError(f"app failed: {[e.value for e in at.exception]} "
                           f"{[e.value for e in at.error]}")


def graph_render(spec: str) -> tuple[float, float]:
    """(load + trace seconds, first Graph page render seconds) for ``spec`` on meta."""
    st.cache_resource.clear()  # measure a cold load, not the shared cache
    at = AppTest.from_file(APP, default_timeout=600).run()
    at.text_input(key="model_spec").set_value(spec)
    at.radio(key="model_device").set_value("meta")
    load = _timed(lambda: at.button(key="model_load").click().run())
    _check(at)
    render = _timed(lambda: at.switch_page("pages/2_graph.py").run())
    _check(at)
    return load, render


def accept_reject() -> tuple[float, float]:
    """(accept seconds, reject seconds) of the first two proposals on the default model."""
    at = AppTest.from_file(APP, default_timeout=600).run()
    at.switch_page("pages/3_groups.py").run()
    accept = _timed(lambda: at.button(key="groups_accept").click().run())
    _check(at)
    reject = _timed(lambda: at.button(key="groups_reject").click().run())
    _check(at)
    return accept, reject


def llama_accept_undo_all() -> list[tuple[float, float]]:
    """(wall, CPU) seconds of Accept, Undo and Accept all on the Groups page for the 7B
    shape on meta."""
    at = AppTest.from_file(APP, default_timeout=600).run()
    at.text_input(key="model_spec").set_value(SPECS[1])
    at.radio(key="model_device").set_value("meta")
    at.button(key="model_load").click().run()
    _check(at)
    at.switch_page("pages/3_groups.py").run()
    _check(at)
    accept = _timed_cpu(lambda: at.button(key="groups_accept").click().run())
    _check(at)
    undo = _timed_cpu(lambda: at.button(key="groups_undo").click().run())
    _check(at)
    accept_all = _timed_cpu(lambda: at.button(key="groups_accept_all").click().run())
    _check(at)
    return [accept, undo, accept_all]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only-7b", action="store_true", help="only the 7B Groups page times")
    ap.add_argument("--pages-direct", action="store_true",
                    help="let AppTest run a switched-to page without app.py, as this "
                         "benchmark did before the option existed (tests/served.py)")
    args = ap.parse_args()
    if not args.pages_direct:
        run_app_py_every_time()
    AppTest.from_file(APP, default_timeout=600).run()  # warm imports and the default model
    rows = []
    runs7 = [llama_accept_undo_all() for _ in range(args.runs)]
    name = "7B shape (meta) Groups page:"
    for i, what in enumerate(("Accept (pre-flight cached, apply, re-analyse)",
                              "Undo (exact, analysis taken back)",
                              "Accept all (solver, apply, re-analyse)")):
        rows.append((f"{name} {what}", [r[i][0] for r in runs7]))
        rows.append((f"{name} {what.split(' (')[0]}, CPU s", [r[i][1] for r in runs7]))
    for spec in [] if args.only_7b else SPECS:
        runs = [graph_render(spec) for _ in range(args.runs)]
        rows.append((f"load+trace {spec.split('?')[0]} (meta)", [r[0] for r in runs]))
        rows.append((f"Graph page first render {spec.split('?')[0]} (meta)",
                     [r[1] for r in runs]))
    runs = [] if args.only_7b else [accept_reject() for _ in range(args.runs)]
    if runs:
        rows.append(("accept (default model, pre-flight + apply + retrace)", [r[0] for r in runs]))
        rows.append(("reject (default model)", [r[1] for r in runs]))
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{width}}  median s  runs (s)")
    for name, times in rows:
        print(f"{name:<{width}}  {statistics.median(times):8.3f}  "
              + ", ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    main()
