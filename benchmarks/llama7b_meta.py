"""Trace a Llama-2-7B-shaped model on ``meta``: time of ``explorer.trace`` and peak memory.

Usage: ``python benchmarks/llama7b_meta.py [--runs 3] [--profile]``. No weights are
allocated; the numbers say how the tracer and the coupling analysis scale with model size.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import explorer  # noqa: E402
from explorer.coupling.analyze import Coupling  # noqa: E402
from explorer.graph.tracer import trace as raw_trace  # noqa: E402
from explorer.io.specs import load_model  # noqa: E402

SPEC = ("hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
        "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    args = parser.parse_args()

    t0 = time.perf_counter()
    lm = load_model(SPEC, device="meta")
    build = time.perf_counter() - t0
    rss_build = _peak_rss_mb()

    totals, traces, couples = [], [], []
    mg = None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        graph = raw_trace(lm.model, lm.example_inputs)
        t1 = time.perf_counter()
        Coupling(graph, ignored=["lm_head"])
        t2 = time.perf_counter()
        mg = explorer.trace(lm.model, lm.example_inputs, ignored=["lm_head"])
        t3 = time.perf_counter()
        traces.append(t1 - t0)
        couples.append(t2 - t1)
        totals.append(t3 - t2)
    assert mg is not None
    groups = mg.groups()
    rows = [
        ("model build (meta)", f"{build:.2f} s"),
        (f"explorer.trace, median of {args.runs}", f"{statistics.median(totals):.2f} s"),
        ("  tracer only (median)", f"{statistics.median(traces):.2f} s"),
        ("  coupling only (median)", f"{statistics.median(couples):.2f} s"),
        ("ATen ops", str(mg.num_ops)),
        ("groups / prunable", f"{len(groups)} / {sum(g.prunable for g in groups)}"),
        ("unknown ops", str(sorted(mg.coupling.unknown_ops))),
        ("peak RSS after build", f"{rss_build:.0f} MB"),
        ("peak RSS overall", f"{_peak_rss_mb():.0f} MB"),
    ]
    t0 = time.perf_counter()
    pruner = explorer.Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.25,
                             heads="whole", ignored=["lm_head"])
    report = pruner.step()
    plan_s = time.perf_counter() - t0
    heads = {a.num_heads for a in pruner_attention(pruner)}
    rows += [
        ("head-pruning plan end to end (trace, groups, plan, pre-flight, apply on meta)",
         f"{plan_s:.2f} s"),
        ("  params before -> after", f"{report.params_before / 1e9:.2f} B -> "
                                     f"{report.params_after / 1e9:.2f} B"),
        ("  forward ok / output shape ok / unsafe groups",
         f"{report.forward_ok} / {report.output_shape_ok} / {len(report.unsafe)}"),
        ("  heads per layer after", str(sorted(heads))),
        ("peak RSS after pruning", f"{_peak_rss_mb():.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'llama-2-7B shape on meta':{width}s}  value")
    for key, value in rows:
        print(f"{key:{width}s}  {value}")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        explorer.trace(lm.model, lm.example_inputs, ignored=["lm_head"])
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def pruner_attention(pruner: explorer.Pruner) -> list:
    from explorer.coupling.heads import attention_modules
    return attention_modules(pruner.model, pruner.coupling)


if __name__ == "__main__":
    main()
