"""Trace and prune the zoo with our engine and, when installed, with Torch-Pruning.

Usage: ``python benchmarks/zoo_bench.py [--runs 3] [--only resnet18 vit_tiny ...]``.
Per model: wall time of trace + one prune step at ratio 0.5 (median of ``--runs`` fresh
models), params after / before, and pass (forward runs and the output shape is unchanged,
dims whose size depends on the data, such as a detector's number of boxes, aside).
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from zoo import ZOO, ZooEntry, main_output_shape  # noqa: E402

from explorer import Pruner, load_model  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional: the table then has our columns only
    tp = None


@dataclass
class Result:
    seconds: float | None = None
    ratio: float | None = None  # params after / before
    ok: bool = False
    error: str = ""


TIMEOUT_S = 120  # one pruning call; past it the cell reads FAIL (timeout)


class _Timeout(Exception):
    pass


def _timeout(_signum: int, _frame: Any) -> None:
    raise _Timeout(f"no result in {TIMEOUT_S} s")




def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ours(model: nn.Module, inputs: tuple[Any, ...], entry: ZooEntry) -> None:
    Pruner(model, inputs, ratio=0.5, importance="magnitude", heads="dims",
           ignored=list(entry.ignored)).step()


def _torch_pruning(model: nn.Module, inputs: tuple[Any, ...], entry: ZooEntry) -> None:
    assert tp is not None
    ignored = [model.get_submodule(n) for n in entry.ignored]
    cls = getattr(tp.pruner, "MagnitudePruner", None) or tp.pruner.BasePruner
    warnings.filterwarnings("ignore", module="torch_pruning")
    pruner = cls(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                 pruning_ratio=0.5, ignored_layers=ignored)
    pruner.step()


def _measure(entry: ZooEntry, fn: Callable[[nn.Module, tuple[Any, ...], ZooEntry], None],
             runs: int) -> Result:
    times: list[float] = []
    res = Result()
    for _ in range(runs):
        lm = load_model(entry.spec, input_shape=entry.input_shape)
        with torch.no_grad():
            expected = entry.comparable(main_output_shape(lm.model(*lm.example_inputs)))
        before = _params(lm.model)
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(TIMEOUT_S)
        try:
            fn(lm.model, lm.example_inputs, entry)
        except Exception as exc:  # noqa: BLE001 - a failure is a table cell, not a crash
            res.error = f"{type(exc).__name__}: {str(exc)[:120]}"
            return res
        finally:
            signal.alarm(0)
        times.append(time.perf_counter() - start)
        res.ratio = _params(lm.model) / before
        try:
            with torch.no_grad():
                res.ok = entry.comparable(main_output_shape(lm.model(*lm.example_inputs))) \
                    == expected
            if not res.ok:
                res.error = "output shape changed"
        except Exception as exc:  # noqa: BLE001
            res.ok, res.error = False, f"forward: {type(exc).__name__}: {str(exc)[:100]}"
    res.seconds = statistics.median(times)
    return res


def _cell(r: Result | None) -> str:
    if r is None:
        return f"{'n/a':>8s} {'':>6s} {'':4s}"
    t = f"{r.seconds:.2f}s" if r.seconds is not None else "-"
    q = f"{r.ratio:.3f}" if r.ratio is not None else "-"
    return f"{t:>8s} {q:>6s} {'pass' if r.ok else 'FAIL':4s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="substrings of zoo ids")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    entries = [e for e in ZOO if not args.only or any(s in e.id for s in args.only)]
    print(f"torch_pruning: {getattr(tp, '__version__', 'not installed')}; runs={args.runs}")
    print(f"{'model':36s} {'ours':>8s} {'kept':>6s} {'':4s} | {'TP':>8s} {'kept':>6s} {'':4s} |"
          f" {'time ours/TP':>12s}")
    errors: list[str] = []
    for e in entries:
        ours = _measure(e, _ours, args.runs)
        theirs = _measure(e, _torch_pruning, args.runs) if tp is not None else None
        speed = (f"{ours.seconds / theirs.seconds:12.1f}" if theirs and theirs.seconds and
                 ours.seconds else f"{'-':>12s}")
        print(f"{e.id:36s} {_cell(ours)} | {_cell(theirs)} | {speed}", flush=True)
        for who, r in (("ours", ours), ("TP", theirs)):
            if r is not None and r.error:
                errors.append(f"{e.id} [{who}]: {r.error}")
    if errors:
        print("\nfailures:")
        print("\n".join(errors))


if __name__ == "__main__":
    main()
