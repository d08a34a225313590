"""Scale: trace+groups of 7B/70B shapes on meta, streaming replay, sequential importance.

Usage: ``python benchmarks/scale.py [--parts trace,stream,sequential] [--runs N] [--dir DIR]
[--explorer CHECKOUT]``.

* ``trace``: ``explorer.trace`` (tracer + coupling + groups) of the Llama-2-7B and 70B
  shapes on ``meta``, against the recording meta forward alone (the tracer, no coupling),
  each in a fresh process of its own, ``--runs`` rounds interleaved, medians (the ratio is
  taken per round). CPU time (on a shared machine the stable figure) and wall time; the
  resident set before ``explorer.trace`` starts (imports and the meta model) and its peak,
  and how many channel ids the rules gave out against the intervals the coupling resolved
  them in.
* ``stream``: writes a synthetic Llama checkpoint of about 2.2 GB (random fp32 weights,
  ``save_pretrained(max_shard_size="450MB")``), makes a plan on a ``meta`` copy, and replays
  it with ``explorer.io.stream.replay_checkpoint``: time and peak RSS against the largest
  shard and against the process before the replay (imports). Memory is sampled from
  ``/proc/self/status``: ``RssAnon`` (what the process holds) and ``VmRSS`` (which also
  counts checkpoint pages mapped by safetensors, page cache the kernel can drop).
* ``sequential``: activation importance of that checkpoint, one decoder layer at a time,
  under ``max_memory={"cpu": "600MB"}`` with the rest offloaded to disk (run with
  ``MALLOC_MMAP_THRESHOLD_=1048576``: see `_ENV`); then, in another process, ``taylor``
  importance under the same cap by the layer-wise backward (forward, loss at the head, then
  the layers in reverse, each recomputed with grad on; the kept hidden states in memory).

Every measurement runs in its own process (peak RSS is per process). The synthetic
checkpoint is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# --explorer DIR (passed on to the children as PE_EXPLORER): measure another checkout's
# explorer, e.g. the code before a change.
sys.path.insert(0, os.environ.get("PE_EXPLORER") or str(ROOT))

SHAPES = {
    "7B": "hf:llama?hidden_size=4096&num_hidden_layers=32&num_attention_heads=32"
          "&num_key_value_heads=32&intermediate_size=11008&vocab_size=32000",
    "70B": "hf:llama?hidden_size=8192&num_hidden_layers=80&num_attention_heads=64"
           "&num_key_value_heads=8&intermediate_size=28672&vocab_size=32000",
}
# About 2.2 GB in fp32: 8 layers of 51 M parameters and two 65 M-parameter embeddings.
SYNTHETIC = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
             "max_position_embeddings": 256}
SHARD = "450MB"
CAP = {"cpu": "600MB"}


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Sampler:
    """Peak anonymous and total resident memory of this process, sampled every 20 ms.

    safetensors reads weights through ``mmap``: pages of the checkpoint files it touched
    count in the resident set (``RssFile``) although they are page cache the kernel can
    drop; ``RssAnon`` is the memory the process itself holds.
    """

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._read()

    def __enter__(self) -> _Sampler:
        self._read()
        self.start = dict(self.peak)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


# -- children: each prints one JSON line ---------------------------------------------------
def child_forward(shape: str) -> dict[str, Any]:
    """The recording meta forward alone (the tracer with no coupling), in its own process."""
    from explorer.graph.tracer import trace as raw_trace
    from explorer.io.specs import load_model

    lm = load_model(SHAPES[shape], device="meta")
    t0, c0 = time.perf_counter(), time.process_time()
    raw_trace(lm.model, lm.example_inputs)
    return {"forward_s": time.perf_counter() - t0, "forward_cpu_s": time.process_time() - c0}


def child_trace(shape: str) -> dict[str, Any]:
    """``explorer.trace`` + groups in a process that did nothing else: time, the resident
    set before it started (imports and the meta model) and the peak."""
    import torch  # noqa: F401 - measured: what importing it holds resident

    torch_mb = _status_mb("VmRSS")
    import explorer
    from explorer.io.specs import load_model

    lm = load_model(SHAPES[shape], device="meta")
    before = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    mg = explorer.trace(lm.model, lm.example_inputs, ignored=["lm_head"])
    groups = mg.groups()
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    res = mg.coupling.res
    form = getattr(res, "form", None)  # resolved over intervals (absent before that)
    return {"shape": shape, "ops": mg.num_ops, "groups": len(groups),
            "channel_ids": int(form.cuts[-1]) if form is not None else len(res.label),
            "intervals": len(form.cuts) - 1 if form is not None else None,
            "prunable": sum(g.prunable for g in groups), "trace_groups_s": total,
            "trace_groups_cpu_s": total_cpu, "rss_torch_mb": torch_mb, "rss_before_mb": before,
            "peak_rss_mb": _rss_mb(), "rss_anon_mb": _status_mb("RssAnon")}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) / 1024
    return 0.0


def trace_table(runs: int) -> list[dict[str, Any]]:
    """Per shape, ``runs`` rounds of (forward, trace) children interleaved; medians."""
    import statistics

    out = []
    for shape in SHAPES:
        forwards, traces = [], []
        for _ in range(runs):
            forwards.append(_run("forward", shape))
            traces.append(_run("trace", shape))
        row = dict(traces[0])
        for key in ("trace_groups_s", "trace_groups_cpu_s", "rss_torch_mb", "rss_before_mb",
                    "peak_rss_mb", "rss_anon_mb"):
            row[key] = round(statistics.median(t[key] for t in traces), 2)
        for key in ("forward_s", "forward_cpu_s"):
            row[key] = round(statistics.median(f[key] for f in forwards), 2)
        ratios = [t["trace_groups_cpu_s"] / f["forward_cpu_s"]
                  for f, t in zip(forwards, traces, strict=True)]
        row["ratio_cpu"] = round(statistics.median(ratios), 2)
        row["ratio_cpu_runs"] = [round(r, 2) for r in ratios]
        row["coupling_mb"] = round(row["peak_rss_mb"] - row["rss_before_mb"])
        out.append(row)
    return out


def child_write(folder: str) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import explorer
    from explorer.io.specs import load_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SYNTHETIC, use_cache=False)
    model = AutoModelForCausalLM.from_config(config)
    ckpt = Path(folder) / "ckpt"
    model.save_pretrained(ckpt, max_shard_size=SHARD)
    del model
    spec = f"hf:{ckpt}/config.json"
    lm = load_model(spec, device="meta")
    pruner = explorer.Pruner(lm.model, lm.example_inputs, importance="random", ratio=0.25,
                             heads="whole", ignored=["lm_head"])
    explorer.Plan.from_pruner(pruner, spec, reports=[pruner.step()]).save(
        Path(folder) / "plan.json")
    shards = sorted(ckpt.glob("*.safetensors"))
    return {"checkpoint_gb": round(sum(p.stat().st_size for p in shards) / 1e9, 2),
            "shards": len(shards), "largest_shard_mb": round(max(
                p.stat().st_size for p in shards) / 1e6)}


def child_stream(folder: str) -> dict[str, Any]:
    import explorer  # noqa: F401 - imports counted in the baseline
    from explorer.io.plan import Plan
    from explorer.io.stream import replay_checkpoint

    plan = Plan.load(Path(folder) / "plan.json")
    with _Sampler() as mem:
        t0 = time.perf_counter()
        res = replay_checkpoint(Path(folder) / "ckpt", plan, Path(folder) / "out")
        seconds = time.perf_counter() - t0
    out = sorted((Path(folder) / "out").glob("*.safetensors"))
    return {"seconds": round(seconds, 1), "anon_before_mb": mem.start["RssAnon"],
            "anon_peak_mb": mem.peak["RssAnon"],
            "anon_growth_mb": mem.peak["RssAnon"] - mem.start["RssAnon"],
            "rss_before_mb": mem.start["VmRSS"], "rss_peak_mb": mem.peak["VmRSS"],
            "largest_shard_mb": round(res.largest_shard_bytes / 1e6),
            "kind": res.kind.value, "tensors_cut": res.tensors_cut,
            "out_gb": round(sum(p.stat().st_size for p in out) / 1e9, 2)}


def child_sequential(folder: str, criterion: str = "activation") -> dict[str, Any]:
    import torch

    import explorer
    from explorer.io.specs import load_model, load_offloaded
    from explorer.prune.calibration import Calibration, random_like
    from explorer.prune.sequential import sequential_criterion

    ckpt = Path(folder) / "ckpt"
    ids = torch.full((1, 128), SYNTHETIC["vocab_size"] - 1, dtype=torch.long)
    calib = Calibration(random_like((ids,), num_batches=4, batch_size=2))
    with _Sampler() as mem:
        t0 = time.perf_counter()
        off = load_offloaded(ckpt, max_memory=CAP, offload_folder=Path(folder) / "offload")
        loaded = time.perf_counter() - t0
        c0 = time.process_time()
        crit = sequential_criterion(off.model, calib, criterion)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    lm = load_model(f"hf:{ckpt}/config.json", device="meta")
    mg = explorer.trace(lm.model, lm.example_inputs)
    scored = [crit.scores(lm.model, mg.coupling, g) for g in mg.groups() if g.prunable]
    return {"criterion": criterion, "seconds": round(seconds, 1),
            "load_seconds": round(loaded, 1), "criterion_cpu_s": round(cpu, 1),
            "anon_before_mb": mem.start["RssAnon"], "anon_peak_mb": mem.peak["RssAnon"],
            "anon_growth_mb": mem.peak["RssAnon"] - mem.start["RssAnon"],
            "rss_before_mb": mem.start["VmRSS"], "rss_peak_mb": mem.peak["VmRSS"],
            "cap": CAP, "offloaded": off.offloaded, "groups_scored": len(scored),
            "calibration": "4 batches x 2 x 128 tokens"}


def child_sequential_taylor(folder: str) -> dict[str, Any]:
    return child_sequential(folder, "taylor")


CHILDREN = {"forward": child_forward, "trace": child_trace, "write": child_write,
            "stream": child_stream, "sequential": child_sequential,
            "sequential_taylor": child_sequential_taylor}


# glibc raises its mmap threshold as large blocks are freed, after which freed layer buffers
# stay in the heap and the resident set climbs layer after layer although nothing leaks; a
# fixed threshold hands them back (measured: 2.5 GB -> 1.5 GB peak for `sequential`).
_ENV = {kind: {"MALLOC_MMAP_THRESHOLD_": "1048576"}
        for kind in ("sequential", "sequential_taylor")}


def _run(kind: str, arg: str) -> dict[str, Any]:
    env = {**os.environ, **_ENV.get(kind, {})}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, arg], check=True,
                          capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="trace,stream,sequential")
    parser.add_argument("--runs", type=int, default=3,
                        help="trace part: rounds of (forward, trace) per shape, medians")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--explorer", default=None,
                        help="folder holding the explorer package to measure (default: here)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.explorer:
        os.environ["PE_EXPLORER"] = str(Path(args.explorer).resolve())
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](args.child[1])))
        return
    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    if "trace" in parts:
        results["trace"] = trace_table(args.runs)
    if "stream" in parts or "sequential" in parts:
        scratch = Path(args.dir or tempfile.mkdtemp(prefix="pe-scale-"))
        try:
            results["checkpoint"] = _run("write", str(scratch))
            if "stream" in parts:
                results["stream"] = _run("stream", str(scratch))
            if "sequential" in parts:
                results["sequential"] = _run("sequential", str(scratch))
                results["sequential_taylor"] = _run("sequential_taylor", str(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if "trace" in results:
        print("| shape | ATen ops / groups | meta forward (CPU s) | trace + groups (CPU s) | "
              "ratio (per round) | RSS before / peak | channel ids / intervals |")
        print("|---|---|---|---|---|---|---|")
        for r in results["trace"]:
            print(f"| {r['shape']} | {r['ops']:,} / {r['groups']} | {r['forward_cpu_s']:.2f} | "
                  f"{r['trace_groups_cpu_s']:.2f} | {r['ratio_cpu']:.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in r['ratio_cpu_runs'])}) | "
                  f"{r['rss_before_mb']:.0f} / {r['peak_rss_mb']:.0f} MB | "
                  f"{r['channel_ids']:,} / {r['intervals'] or 0:,} |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
