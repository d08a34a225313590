"""Quality of a pruned model against the original on held-out data.

`evaluate` runs both models on the same batches and reports, for any model, the cosine
similarity of their outputs (per token for logits, mask-pooled per sample for encoders, per
sample otherwise) and, where the outputs are logits, the KL divergence and top-1 agreement;
for causal language models also the perplexity of each on the held-out text. Padded tokens
(the batches' padding mask, see `Calibration.mask_index`) are skipped everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.rng import evaluating
from ..graph.walk import tensor_leaves
from ..prune.calibration import Calibration
from .task import HEADLINE, Metric, Task, infer_task

# tasks whose main output is logits even when the model returns a bare tensor (timm)
_LOGIT_TASKS = frozenset({Task.CAUSAL_LM, Task.MASKED_LM, Task.SEQUENCE_CLASSIFICATION,
                          Task.IMAGE_CLASSIFICATION})


@dataclass(frozen=True)
class Quality:
    """Quality of ``model`` against ``reference`` on held-out batches."""

    task: Task
    metric: Metric  # the headline metric of the task
    before: float  # headline on the reference (1.0 for the similarity metrics)
    after: float  # headline on the model
    cosine: float  # mean output cosine similarity to the reference
    kl: float | None  # mean KL(reference || model) per token or sample; None without logits
    top1: float | None  # argmax agreement with the reference; None without logits
    perplexity_before: float | None  # causal LMs only
    perplexity_after: float | None
    samples: int  # held-out samples (rows) evaluated

    def to_dict(self) -> dict[str, Any]:
        """``{metric, before, after, ...}`` for JSON output."""
        return {"metric": self.metric.value, "before": self.before, "after": self.after,
                "task": self.task.value, "cosine": self.cosine, "kl": self.kl,
                "top1": self.top1, "perplexity_before": self.perplexity_before,
                "perplexity_after": self.perplexity_after, "samples": self.samples}


@dataclass
class _Sums:
    """Running sums over batches (each metric is a sum and a count)."""

    cosine: float = 0.0
    cosine_n: int = 0
    kl: float = 0.0
    top1: float = 0.0
    logit_n: int = 0
    nll_before: float = 0.0
    nll_after: float = 0.0
    tokens: int = 0
    samples: int = 0


def evaluate(model: nn.Module, reference: nn.Module,
             data: Calibration | Sequence[tuple[Any, ...]], *,
             task: Task | str | None = None) -> Quality:
    """Measure how far ``model`` has moved from ``reference`` on held-out ``data``.

    Both models run on each batch in lockstep and only running sums are kept, so memory
    follows one batch, not the data: a batch whose outputs are large (a language model's
    vocabulary logits) runs a few rows at a time (`OUTPUT_BUDGET`).

    Args:
        model: the pruned model.
        reference: the original model (same inputs, same output structure).
        data: held-out batches of positional inputs, or a `Calibration` (whose
            ``mask_index`` names the padding mask). Keep them apart from calibration data.
        task: what the model does (a `Task` or its value); inferred from the model's class
            when None.

    Returns:
        The `Quality` record; neither model is changed (train/eval modes are restored).

    Raises:
        ValueError: if there is no batch, or the two models' outputs differ in shape.
    """
    calib = as_data(data)
    kind = Task(task) if task is not None else infer_task(reference)
    sums = _Sums()
    rows: int | None = None  # rows per forward, from the first output's size
    with evaluating(model), evaluating(reference), torch.no_grad():
        for batch in calib.batches:
            n = _splittable_rows(batch)
            start = 0
            while start < (n or 1):
                stop = 1 if n is None else min(n, start + (rows or 1))
                part = batch if n is None else _slice(batch, start, stop)
                ref = _primary(reference(*_to(part, reference), **calib.kwargs))
                out = _primary(model(*_to(part, model), **calib.kwargs))
                _check_shapes(ref[0], out[0])
                _accumulate(sums, kind, ref, out, part, calib.mask(part))
                if rows is None:
                    rows = _rows_per_forward(ref[0])
                del ref, out
                start = stop
    return _result(kind, sums)


Output = tuple[torch.Tensor, bool]  # the compared output of one batch, and "is it logits"

# Bytes of one model output a forward of `evaluate` may produce: batches run this much at a
# time (at least one row), so a 49k-token vocabulary costs a few rows of logits, not a batch.
OUTPUT_BUDGET = 32 * 2**20
# Elements of one float64 block of rows the metrics work on at a time.
_BLOCK_ELEMENTS = 2**20


def as_data(data: Calibration | Sequence[tuple[Any, ...]]) -> Calibration:
    """``data`` as a `Calibration` (batches of positional inputs).

    Raises:
        ValueError: if there is no batch.
    """
    calib = data if isinstance(data, Calibration) else Calibration([tuple(b) for b in data])
    if not calib.batches:
        raise ValueError("evaluation data is empty: give at least one held-out batch")
    return calib


def reference_outputs(reference: nn.Module, data: Calibration) -> list[Output]:
    """The reference model's compared output on every batch (on CPU, to be reused).

    This keeps every output: for a small probe batch (`QualityProbe`), not for a data set
    (`evaluate` streams). Batches run a few rows at a time (`OUTPUT_BUDGET`)."""
    out: list[Output] = []
    with evaluating(reference), torch.no_grad():
        for batch in data.batches:
            parts = [(t.detach().cpu(), flag) for _start, _stop, t, flag
                     in _row_forwards(reference, batch, data, None)]
            out.append((torch.cat([t for t, _f in parts]) if len(parts) > 1 else parts[0][0],
                        parts[0][1]))
    return out


def compare(model: nn.Module | None, references: Sequence[Output], data: Calibration,
            task: Task) -> Quality:
    """`Quality` of ``model`` against precomputed `reference_outputs` on the same ``data``
    (``model`` None: the reference against itself, with no forward). Batches run a few rows
    at a time (`OUTPUT_BUDGET`), each compared with the reference's rows and let go.

    Raises:
        ValueError: if an output's shape differs from the reference's.
    """
    sums = _Sums()
    if model is None:
        for batch, ref in zip(data.batches, references, strict=True):
            _accumulate(sums, task, ref, ref, batch, data.mask(batch))
        return _result(task, sums)
    with evaluating(model), torch.no_grad():
        for batch, ref in zip(data.batches, references, strict=True):
            for start, stop, out, flag in _row_forwards(model, batch, data, ref[0]):
                part = batch if stop is None else _slice(batch, start, stop)
                rows = ref if stop is None else (ref[0][start:stop], ref[1])
                _check_shapes(rows[0], out)
                _accumulate(sums, task, rows, (out, flag), part, data.mask(part))
                del out
    return _result(task, sums)


def _row_forwards(model: nn.Module, batch: tuple[Any, ...], data: Calibration,
                  reference: torch.Tensor | None
                  ) -> Iterator[tuple[int, int | None, torch.Tensor, bool]]:
    """``(start, stop, output, is_logits)`` of ``model`` on ``batch``, a few rows at a time
    (how many: from ``reference``'s size per row, else from the first one-row output); stop
    is None when the batch cannot be split and ran whole."""
    n = _splittable_rows(batch)
    if n is None:
        out, flag = _primary(model(*_to(batch, model), **data.kwargs))
        yield 0, None, out, flag
        return
    rows = None if reference is None else _rows_per_forward(reference)
    start = 0
    while start < n:
        stop = min(n, start + (rows or 1))
        out, flag = _primary(model(*_to(_slice(batch, start, stop), model), **data.kwargs))
        if rows is None:
            rows = _rows_per_forward(out)
        yield start, stop, out, flag
        start = stop


def _check_shapes(ref: torch.Tensor, out: torch.Tensor) -> None:
    if ref.shape != out.shape:
        raise ValueError(f"the pruned model's output {tuple(out.shape)} differs from "
                         f"the original's {tuple(ref.shape)}; cannot compare them")


def _rows_per_forward(output: torch.Tensor) -> int:
    """Rows one forward may take so that its output stays within `OUTPUT_BUDGET` (measured
    on the first forward, which took one row when the batch could be split)."""
    rows = max(1, int(output.shape[0]) if output.dim() else 1)
    per_row = output.numel() * output.element_size() / rows
    return max(1, int(OUTPUT_BUDGET // max(per_row, 1.0)))


def _splittable_rows(batch: tuple[Any, ...]) -> int | None:
    """The batch's number of samples when every tensor in it has that leading size (it can
    run a few rows at a time), else None."""
    tensors = [a for a in batch if isinstance(a, torch.Tensor)]
    sizes = {int(a.shape[0]) if a.dim() else -1 for a in tensors}
    return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None


def _slice(batch: tuple[Any, ...], start: int, stop: int) -> tuple[Any, ...]:
    return tuple(a[start:stop] if isinstance(a, torch.Tensor) else a for a in batch)


def _result(kind: Task, s: _Sums) -> Quality:
    cosine = min(1.0, s.cosine / max(s.cosine_n, 1))  # rounding can pass 1 by an ulp
    kl = s.kl / s.logit_n if s.logit_n else None
    top1 = s.top1 / s.logit_n if s.logit_n else None
    ppl_before = math.exp(s.nll_before / s.tokens) if s.tokens else None
    ppl_after = math.exp(s.nll_after / s.tokens) if s.tokens else None
    metric = HEADLINE[kind]
    if metric is Metric.PERPLEXITY and ppl_before is not None and ppl_after is not None:
        before, after = ppl_before, ppl_after
    elif metric is Metric.TOP1 and top1 is not None:
        before, after = 1.0, top1
    else:
        metric, before, after = Metric.COSINE, 1.0, cosine
    return Quality(kind, metric, before, after, cosine, kl, top1, ppl_before, ppl_after,
                   s.samples)


def _accumulate(s: _Sums, kind: Task, ref: tuple[torch.Tensor, bool],
                out: tuple[torch.Tensor, bool], batch: tuple[Any, ...],
                mask: torch.Tensor | None) -> None:
    """Add one batch's cosine, KL, top-1 and NLL sums to ``s`` (in float64, a block of rows
    at a time: no full-vocabulary copy of the batch)."""
    r, is_logits = ref[0].detach().cpu(), ref[1] or kind in _LOGIT_TASKS
    o = out[0].detach().cpu()
    s.samples += int(r.shape[0]) if r.dim() else 1
    valid = _valid(r, mask)
    if kind is Task.ENCODER and r.dim() == 3:
        weights = valid.unsqueeze(-1).double()
        pooled_r = (r.double() * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled_o = (o.double() * weights).sum(1) / weights.sum(1).clamp(min=1)
        s.cosine += float(F.cosine_similarity(pooled_r, pooled_o, dim=-1).sum())
        s.cosine_n += int(r.shape[0])
        return
    if kind is Task.ENCODER_CLS and r.dim() == 3:  # the embedding is the first token's
        s.cosine += float(F.cosine_similarity(r[:, 0].double(), o[:, 0].double(), dim=-1).sum())
        s.cosine_n += int(r.shape[0])
        return
    if r.dim() < 2:
        s.cosine += float(F.cosine_similarity(r.double().flatten(), o.double().flatten(), dim=0))
        s.cosine_n += 1
        return
    rows_r, rows_o = _rows(r, valid), _rows(o, valid)
    targets = _next_tokens(batch, valid) if kind is Task.CAUSAL_LM and is_logits \
        and r.dim() == 3 else None
    step = max(1, _BLOCK_ELEMENTS // max(1, int(rows_r[0].numel()) if len(rows_r) else 1))
    for start in range(0, int(rows_r.shape[0]), step):
        br, bo = rows_r[start:start + step].double(), rows_o[start:start + step].double()
        s.cosine += float(F.cosine_similarity(br, bo, dim=-1).sum())
        s.cosine_n += int(br.shape[0])
        if not is_logits:
            continue
        log_r, log_o = br.log_softmax(-1), bo.log_softmax(-1)
        s.kl += float((log_r.exp() * (log_r - log_o)).sum())
        s.top1 += float((br.argmax(-1) == bo.argmax(-1)).sum())
        s.logit_n += int(br.shape[0])
        if targets is not None:
            t = targets[start:start + step]
            real = t >= 0
            picked = t[real].unsqueeze(-1)
            s.nll_before -= float(log_r[real].gather(-1, picked).sum())
            s.nll_after -= float(log_o[real].gather(-1, picked).sum())
            s.tokens += int(real.sum())


def scored_tokens(data: Calibration) -> int | None:
    """How many next tokens held-out ``data`` gives perplexity to score (two real tokens in a
    row, padding left out); None when its first input is not token ids."""
    total = 0
    for batch in data.batches:
        ids = batch[0] if batch else None
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
            return None
        mask = data.mask(batch)
        real = mask.cpu() != 0 if mask is not None and mask.shape == ids.shape else \
            torch.ones(ids.shape, dtype=torch.bool)
        total += int((real[:, :-1] & real[:, 1:]).sum())
    return total


def _next_tokens(batch: tuple[Any, ...], valid: torch.Tensor) -> torch.Tensor | None:
    """For each valid (sample, position), in `_rows` order, the id of the next token when
    both are real tokens, else -1; None when the first input is not token ids."""
    ids = batch[0] if batch else None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or \
            tuple(ids.shape) != tuple(valid.shape):
        return None
    ids = ids.cpu().long()
    nxt = torch.full_like(ids, -1)
    pairs = valid[:, :-1] & valid[:, 1:]
    nxt[:, :-1] = torch.where(pairs, ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return nxt[valid]


def _valid(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Which (sample, position) entries of a (B, T, ...) output are real tokens."""
    if output.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(output.shape[:2]):
        return mask.cpu() != 0
    if output.dim() == 3:
        return torch.ones(output.shape[:2], dtype=torch.bool)
    return torch.ones(output.shape[:1], dtype=torch.bool)


def _rows(output: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The output as (rows, features): one row per valid token (3-D) or per sample."""
    if output.dim() == 3:
        return output.flatten(0, 1) if bool(valid.all()) else output[valid]
    return output.reshape(output.shape[0], -1)[valid]


def _primary(out: Any) -> tuple[torch.Tensor, bool]:
    """The output compared: ``logits`` when there are any (flag True), else the hidden state
    or the first floating-point tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, False
    leaves = [t for _p, t in tensor_leaves(out) if t.is_floating_point()]
    if not leaves:
        raise ValueError("the model returned no floating-point tensor to compare")
    return leaves[0], False


def _to(batch: tuple[Any, ...], model: nn.Module) -> tuple[Any, ...]:
    """``batch`` with its tensors on the device of ``model``'s first parameter."""
    param = next(model.parameters(), None)
    if param is None:
        return batch
    return tuple(a.to(param.device) if isinstance(a, torch.Tensor) else a for a in batch)


