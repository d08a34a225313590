"""The app on a real language model, driven headless (Streamlit AppTest, no browser).

Loads ``--model`` with calibration and held-out text on the Model page, then on the Groups page
accepts 5 proposals, rejects 1, undoes 1 and switches the criterion; opens the session again
by the URL's ``?sid=`` in a fresh browser session, live (a refresh or a second tab) and after a
server restart (the model cache and live sessions cleared: the saved log replays), and builds
an ``hf`` export on the Export page of the reopened session. Prints one JSON object: the median
seconds of each action (with every run), the process's peak RSS in MB (AppTest runs the app
in this process), the RSS after each action, and ``session_mb``: the RSS after the last accept
over the server's before the load (the session, with the pristine model it shares).

Usage::

    python benchmarks/app_llm.py --json \\
        --model hf:$HOME/.cache/pruning-explorer/smollm2-135m-instruct-f32 \\
        --calibration /work/models/text2/calibration.txt --eval /work/models/text2/heldout.txt
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PE_SESSION_DIR", tempfile.mkdtemp())  # not the user's session logs
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # served.py: AppTest runs through app.py

import streamlit as st  # noqa: E402
from served import run_app_py_every_time  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from streamlit.testing.v1.local_script_runner import LocalScriptRunner  # noqa: E402

APP = str(ROOT / "app.py")
TIMEOUT = 1800  # one action on a busy 2-core machine, before the speed work: about a minute


def _rss_mb() -> float:
    """This process's resident memory now, in MB (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _check(at: AppTest, what: str) -> None:
    if at.exception or at.error:
        raise RuntimeError(f"{what}: {[e.value for e in at.exception]} "
                           f"{[e.value for e in at.error]}")


class Bench:
    """Times and memory of each action."""

    def __init__(self, verbose: bool, profile: Path | None) -> None:
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}  # CPU seconds of the process (all threads)
        self.rss: dict[str, float] = {}
        self.verbose = verbose
        self.profile = profile

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.profile is not None:
            _PROFILE[:] = [cProfile.Profile()]
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            _PROFILE.pop().dump_stats(self.profile / f"{what}-{len(self.times.get(what, []))}"
                                                     ".prof")
        self.times.setdefault(what, []).append(dt)
        self.cpu.setdefault(what, []).append(dc)
        self.rss[what] = round(_rss_mb())
        if self.verbose:
            print(f"{what}: {dt:.2f} s ({dc:.2f} s CPU), RSS {self.rss[what]} MB",
                  file=sys.stderr, flush=True)
        return out


# the profiler of the action being timed: AppTest runs the page in a thread of its own
_PROFILE: list[cProfile.Profile] = []
_run_thread = LocalScriptRunner._run_script_thread


def _profiled_thread(self: LocalScriptRunner) -> None:
    prof = _PROFILE[0] if _PROFILE else None
    if prof is not None:
        prof.enable()
    try:
        _run_thread(self)
    finally:
        if prof is not None:
            prof.disable()


LocalScriptRunner._run_script_thread = _profiled_thread  # type: ignore[method-assign]


def _accept(at: AppTest) -> None:
    """Accept the current proposal (its joint proposal when it is unsafe alone)."""
    button = at.button(key="groups_accept")
    if button.disabled:
        button = at.button(key="groups_accept_joint")
    button.click().run()


def run(model: str, calibration: str, heldout: str, criterion: str, accepts: int,
        verbose: bool = True, profile: Path | None = None) -> dict[str, Any]:
    bench = Bench(verbose, profile)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()  # the default demo model
    _check(at, "first page")
    start_mb = round(_rss_mb())  # the server with the default demo model, before ours
    at.text_input(key="model_spec").set_value(model)
    at.text_input(key="model_calib").set_value(calibration)
    at.text_input(key="model_heldout").set_value(heldout)
    bench("load", lambda: at.button(key="model_load").click().run())
    _check(at, "load")
    sid = at.session_state["pe_sid"]
    bench("groups_page", lambda: at.switch_page("pages/3_groups.py").run())
    _check(at, "Groups page")
    for i in range(accepts):
        bench("accept", lambda: _accept(at))
        _check(at, f"accept {i + 1}")
    bench("reject", lambda: at.button(key="groups_reject").click().run())
    _check(at, "reject")
    bench("undo", lambda: at.button(key="groups_undo").click().run())
    _check(at, "undo")
    bench("criterion", lambda: at.selectbox(key="groups_criterion").set_value(criterion).run())
    _check(at, "criterion switch")
    params = at.session_state["pe"].params
    decisions = len(at.session_state["pe"].actions)
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)  # a refresh, or a second tab
    again.query_params["sid"] = sid
    bench("reopen_live", lambda: again.run())
    _check(again, "reopen")
    st.cache_resource.clear()  # a server restart: no live session, no cached model
    saved = AppTest.from_file(APP, default_timeout=TIMEOUT)
    saved.query_params["sid"] = sid
    bench("reopen_saved", lambda: saved.run())
    _check(saved, "reopen from the saved log")
    for tab in (again, saved):
        pe = tab.session_state["pe"]
        if pe.params != params or len(pe.actions) != decisions:
            raise RuntimeError(f"reopen gave {pe.params:,} params and {len(pe.actions)} "
                               f"decisions, not {params:,} and {decisions}")
    at = saved  # the export runs in the reopened session
    at.switch_page("pages/5_export.py").run()
    _check(at, "Export page")
    at.multiselect(key="export_formats").set_value(["hf"])
    bench("export_hf", lambda: at.button(key="export_build").click().run())
    _check(at, "export")
    import torch
    return {"model": model, "criterion": criterion, "accepts": accepts,
            "threads": torch.get_num_threads(),
            "seconds": {k: round(statistics.median(v), 2) for k, v in bench.times.items()},
            "runs": {k: [round(t, 2) for t in v] for k, v in bench.times.items()},
            "cpu_seconds": {k: round(statistics.median(v), 2) for k, v in bench.cpu.items()},
            "peak_rss_mb": round(_peak_mb()), "rss_start_mb": start_mb,
            "rss_after_mb": bench.rss,
            # the session after its accepts, over the server before the load (the pristine
            # model, cached once per server, included)
            "session_mb": round(bench.rss.get("accept", start_mb) - start_mb),
            "params_after": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model spec, e.g. hf:<folder>")
    ap.add_argument("--calibration", required=True, help="calibration text (one sample a line)")
    ap.add_argument("--eval", required=True, help="held-out text, apart from calibration")
    ap.add_argument("--criterion", default="wanda", help="the criterion switched to")
    ap.add_argument("--accepts", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on "
                    "a machine busy with other work, 1 keeps them from spinning on each other")
    ap.add_argument("--profile", type=Path, help="write a cProfile of each action here "
                    "(<action>-<run>.prof; read with python -m pstats)")
    ap.add_argument("--json", action="store_true",
                    help="the JSON object on one line (progress goes to stderr)")
    ap.add_argument("--pages-direct", action="store_true",
                    help="let AppTest run a switched-to page without app.py, as AppTest does "
                         "by default and as this benchmark did before the option existed: no "
                         "heap trim after a run, no session lock (tests/served.py)")
    args = ap.parse_args()
    if not args.pages_direct:
        run_app_py_every_time()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = run(args.model, args.calibration, args.eval, args.criterion, args.accepts,
              profile=args.profile)
    print(json.dumps(out, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
