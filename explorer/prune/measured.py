"""Measured allocation: per-layer widths from the change each layer's cut causes alone.

The ``measured`` allocation of `explorer.Pruner` (``--allocation measured``). Every candidate
axis is cut alone, lowest scores first, at a few depths around the uniform cut (`LEVELS`
times its count), on the first `SAMPLES` calibration samples, and the change of the model's
output against the unpruned model is measured: for a language model (an output with
``logits``) the mean KL divergence of the next-token distribution over the real tokens, else
the relative L2 change of all floating outputs. Each trial is applied and undone exactly
(`removal.apply_removal` / `removal.undo`: the same tensors come back).

Then the cut is deepened one index at a time where the measured change per removed parameter
is least (linear between the measured depths, each axis' slopes made non-decreasing so its
curve is convex, never past the deepest depth measured) until it removes as many parameters as
the uniform cut at the same ratio: the same parameter count, the least summed change. A layer
whose cut costs more than the others' (SmolLM2's first and last MLPs) keeps more, the cheap
ones lose more. The summed change of the uniform cut and of the chosen one are reported, read
off the same curves.

Cost: one forward of the samples per axis and depth (3 x 30 for a 30-layer MLP cut), on top
of the criterion's own pass. Widths then differ per layer, which one transformers config
cannot describe: the export writes safetensors + plan (`explorer.load_pruned` reloads it).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coupling.analyze import Coupling
from ..graph.metrics import count_params
from ..graph.walk import tensor_leaves
from .calibration import Calibration, batch_size
from .importance import calibrating, lowest
from .records import Candidate
from .removal import Removal, apply_removal, undo

LEVELS = (0.5, 1.0, 1.5)  # depths measured, as multiples of the uniform cut's count
SAMPLES = 8  # calibration samples the trials run on


@dataclass(frozen=True)
class Curve:
    """One candidate axis cut alone at the measured depths (the first is no cut)."""

    title: str
    removed: tuple[int, ...]  # indices removed at each depth
    params: tuple[int, ...]  # parameters removed at each depth
    change: tuple[float, ...]  # measured output change at each depth

    def at(self, n: int) -> float:
        """The change at ``n`` removed indices, linear between the measured depths."""
        return float(np.interp(n, self.removed, self.change))


@dataclass(frozen=True)
class Measured:
    """The measured allocation of one cut: counts per candidate and what they cost."""

    counts: list[int]  # indices to remove, per candidate (in the candidates' order)
    curves: list[Curve]
    measure: str  # what ``change`` is: "KL" or "relative L2"
    samples: int  # calibration samples measured on
    uniform: float  # summed measured change of the uniform cut
    chosen: float  # the same for ``counts``

    def note(self) -> str:
        """One line for the report: how the widths were chosen and what uniform would cost."""
        gain = 1.0 - self.chosen / self.uniform if self.uniform > 0 else 0.0
        depths = max((len(c.removed) - 1 for c in self.curves), default=0)
        whole = sum(1 for n in self.counts if n == 0)
        return (f"measured allocation: each layer cut alone at {depths} depths around the "
                f"uniform cut, {self.measure} of the outputs on {self.samples} calibration "
                f"samples; summed change {self.uniform:.4g} at uniform widths -> "
                f"{self.chosen:.4g} at these widths ({gain:.0%} less), the same parameter "
                f"budget" + (f"; {whole} of {len(self.counts)} left whole" if whole else ""))


Measure = Callable[[nn.Module], float]


def measure_change(model: nn.Module, calib: Calibration) -> tuple[Measure, str]:
    """The change of ``model``'s outputs on ``calib`` against their values now: mean KL of
    the next-token distribution over real tokens for an output with ``logits``, else the
    relative L2 change of every floating output. Returns (measure, its name)."""
    outputs = _outputs(model, calib)
    if all(isinstance(getattr(o, "logits", None), torch.Tensor) for o in outputs):
        base = [_logprobs(o, b, calib) for o, b in zip(outputs, calib.batches, strict=True)]

        def kl(m: nn.Module) -> float:
            total, count = 0.0, 0
            for o, b, ref in zip(_outputs(m, calib), calib.batches, base, strict=True):
                total += float((ref.exp() * (ref - _logprobs(o, b, calib))).sum())
                count += ref.shape[0]
            return total / max(count, 1)
        return kl, "KL"
    ref = _flat(outputs)
    return (lambda m: float((_flat(_outputs(m, calib)) - ref).norm() / (ref.norm() + 1e-12)),
            "relative L2")


def _outputs(model: nn.Module, calib: Calibration) -> list[Any]:
    with torch.no_grad(), calibrating(model):
        return [model(*batch, **calib.kwargs) for batch in calib.batches]


def _logprobs(output: Any, batch: tuple[Any, ...], calib: Calibration) -> torch.Tensor:
    """Log-probabilities of the next token at the real tokens of ``batch``."""
    logits = output.logits
    mask = calib.token_mask(batch)
    rows = logits[mask] if mask is not None and tuple(logits.shape[:2]) == tuple(mask.shape) \
        else logits.reshape(-1, logits.shape[-1])
    return torch.log_softmax(rows.float(), -1)


def _flat(outputs: list[Any]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for out in outputs
                      for _p, t in tensor_leaves(out) if t.is_floating_point()])


def curves(model: nn.Module, coupling: Coupling, cands: Sequence[Candidate],
           uniform: Sequence[int], measure: Measure,
           levels: Sequence[float] = LEVELS, max_ratio: float = 0.9) -> list[Curve]:
    """Each candidate cut alone at ``levels`` x its ``uniform`` count (at most ``max_ratio``
    of its width, at least one index kept), measured and undone; a cut that breaks the
    forward ends its curve."""
    out = []
    for cand, n_uniform in zip(cands, uniform, strict=True):
        size = cand.group.axes[cand.axis].size
        cap = min(size - 1, int(size * max_ratio))
        depths = sorted({min(int(round(n_uniform * lv)), cap) for lv in levels} - {0})
        removed, params, change = [0], [0], [0.0]
        for n in depths:
            trial = _trial(model, coupling, cand, n, measure)
            if trial is None:
                break
            removed.append(n)
            params.append(trial[0])
            change.append(trial[1])
        role = cand.group.axes[cand.axis].role
        out.append(Curve(f"{cand.group.title} [{role}]", tuple(removed), tuple(params),
                         tuple(change)))
    return out


def _trial(model: nn.Module, coupling: Coupling, cand: Candidate, n: int, measure: Measure
           ) -> tuple[int, float] | None:
    """(parameters removed, change) of ``cand`` cut alone by ``n``; None if the cut model
    does not run."""
    removal = Removal()
    removal.add(cand.group.id, cand.axis, lowest(cand.scores, n))
    before = count_params(model)
    applied = apply_removal(model, coupling, removal)
    try:
        return before - count_params(model), measure(model)
    except (RuntimeError, IndexError, ValueError):  # a cut the model code cannot take
        return None
    finally:
        undo(model, applied)


def choose(found: Sequence[Curve], budget: int) -> list[int]:
    """Counts per curve removing at least ``budget`` parameters (or all the curves allow)
    with the least summed change: one index at a time, cheapest change per parameter first,
    skipping an index that would pass the budget while smaller ones still fit (a whole kv
    group beside MLP channels); then the cheapest indices left until the budget is met, and
    last the dearest indices taken given back while the budget stays met."""
    slopes: list[list[tuple[float, float]]] = []  # per curve: (cost per param, params) per index
    for c in found:
        steps: list[tuple[float, float]] = []
        worst = -np.inf
        for k in range(1, len(c.removed)):
            n = c.removed[k] - c.removed[k - 1]
            per_index = (c.params[k] - c.params[k - 1]) / n
            cost = (c.change[k] - c.change[k - 1]) / max(c.params[k] - c.params[k - 1], 1)
            worst = max(worst, cost)  # convex: a deeper index never costs less
            steps += [(worst, per_index)] * n
        slopes.append(steps)
    counts = [0] * len(found)
    removed = 0.0
    for fit in (True, False):  # first what fits in the budget, then what meets it
        heap = [(s[counts[i]][0], i) for i, s in enumerate(slopes) if counts[i] < len(s)]
        heapq.heapify(heap)
        while removed < budget and heap:
            _cost, i = heapq.heappop(heap)
            size = slopes[i][counts[i]][1]
            if fit and removed + size > budget:
                continue  # this curve's next index passes the budget: leave it for now
            removed += size
            counts[i] += 1
            if counts[i] < len(slopes[i]):
                heapq.heappush(heap, (slopes[i][counts[i]][0], i))
    while True:  # past the budget: give back the dearest indices that keep it met
        back = [(slopes[i][n - 1][0], i) for i, n in enumerate(counts)
                if n and removed - slopes[i][n - 1][1] >= budget]
        if not back:
            return counts
        i = max(back)[1]
        removed -= slopes[i][counts[i] - 1][1]
        counts[i] -= 1


def measured(model: nn.Module, coupling: Coupling, cands: Sequence[Candidate],
             uniform: Sequence[int], calib: Calibration, max_ratio: float = 0.9,
             samples: int = SAMPLES, levels: Sequence[float] = LEVELS) -> Measured:
    """The measured allocation for candidates whose uniform cut removes ``uniform`` indices
    each (module docstring). The model is changed only inside each trial and restored."""
    data = calib.head(samples)
    measure, name = measure_change(model, data)
    found = curves(model, coupling, cands, uniform, measure, levels, max_ratio)
    budget = 0
    for c, n in zip(found, uniform, strict=True):
        budget += int(round(np.interp(n, c.removed, c.params)))
    counts = choose(found, budget)
    return Measured(counts, found, name, sum(batch_size(b) for b in data.batches),
                    sum(c.at(n) for c, n in zip(found, uniform, strict=True)),
                    sum(c.at(n) for c, n in zip(found, counts, strict=True)))


__all__ = ["LEVELS", "SAMPLES", "Curve", "Measured", "choose", "curves", "measure_change",
           "measured"]
