"""Transformers architectures outside the built-in families: what each run gets.

Usage: ``python benchmarks/hf_breadth.py [--only vit bert ...]``. For every architecture of
``tests/test_hf_breadth.py`` (tiny random configs) and both head modes: parameters kept at
ratio 0.5, unsafe groups, whether ``type(model)(model.config)`` with the pruned state dict
computes the pruned model's logits in memory (``rebuild``: constants the config derives are
folded at cut time), and the export the config allows (``hf``: a ``save_pretrained`` folder
whose config holds the pruned widths; ``safetensors``: the fall-back, with its reason).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from rebuild import output  # noqa: E402
from test_hf_breadth import ARCHS, _build, _inputs  # noqa: E402

from explorer import Pruner  # noqa: E402
from explorer.io.export import export  # noqa: E402
from explorer.io.plan import Plan  # noqa: E402


def _row(name: str, heads: str) -> str:
    arch = ARCHS[name]
    model = _build(arch)
    x = _inputs(arch)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    pruner = Pruner(model, (x,), ratio=0.5, heads=heads, ignored=list(arch.ignored))
    report = pruner.step()
    seconds = time.perf_counter() - start
    kept = sum(p.numel() for p in model.parameters()) / before
    rebuild = "no"
    try:
        fresh = type(model)(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        if torch.allclose(output(fresh, x), output(model, x), rtol=1e-4, atol=1e-5):
            rebuild = "same"
    except (RuntimeError, ValueError):
        pass  # shapes the config cannot build: the step's report says why
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, folder, "hf", plan=Plan.from_pruner(pruner, f"hf:{name}"))
    how = "hf" if "hf" in result.files else "safetensors"
    reason = "" if how == "hf" or result.config is None else result.config.reason[:90]
    return (f"{name:10s} {heads:5s} {kept:6.3f} {len(report.unsafe):6d} {seconds:6.1f}s "
            f"{rebuild:7s} {how:11s} {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':10s} {'heads':5s} {'kept':>6s} {'unsafe':>6s} {'step':>7s} rebuild export")
    for name in ARCHS:
        if args.only and name not in args.only:
            continue
        for heads in ("whole", "dims"):
            print(_row(name, heads), flush=True)


if __name__ == "__main__":
    main()
