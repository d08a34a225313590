"""Calibration data and losses for data-aware importance criteria.

A `Calibration` is a list of input batches plus how to turn the model's output into a loss:

* ``"model"``: the model's own loss (language models given ``labels=input_ids``);
* ``"ce"``: cross-entropy of the logits against given labels;
* ``"output-norm"``: half the squared norm of the output, a data-free fallback that still
  measures how much each weight moves the output;
* ``"output-probe"``: the output projected on a random Gaussian direction (seeded per
  sample). Its per-sample gradients g_s = J_s^T v_s give E[(g_s . d)^2] = ||J_s d||^2, so
  squared first-order terms estimate how far a weight change d moves the output (the
  Gauss-Newton curvature): what the ``fisher`` criterion uses when ``"auto"`` finds no
  model loss.

When batches carry an attention mask (``mask_index`` names its position in every batch;
1 marks a real token, 0 padding), padded tokens count neither in activation statistics nor
in the ``"output-norm"`` and ``"output-probe"`` losses.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..graph.walk import tensor_leaves

LOSSES = ("auto", "model", "ce", "output-norm", "output-probe")


@dataclass
class Calibration:
    """Batches of positional inputs and the loss to use on them."""

    batches: list[tuple[Any, ...]]
    loss: str = "auto"
    labels: list[torch.Tensor] | None = None  # one per batch, for ``"ce"``
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Position of the padding mask (1 = real token) in each batch, when the text was padded:
    # the model reads it as its ``attention_mask`` and losses and metrics skip padded tokens.
    mask_index: int | None = None

    def mask(self, batch: tuple[Any, ...]) -> torch.Tensor | None:
        """The padding mask of ``batch`` (None when the batches carry no mask)."""
        if self.mask_index is None or self.mask_index >= len(batch):
            return None
        mask = batch[self.mask_index]
        return mask if isinstance(mask, torch.Tensor) else None

    def token_mask(self, batch: tuple[Any, ...]) -> torch.Tensor | None:
        """`mask` as booleans (True: a real token), checked to be (batch, tokens)."""
        m = self.mask(batch)
        if m is None:
            return None
        if m.dim() != 2:
            raise ValueError(f"calibration input {self.mask_index} is not a (batch, tokens) "
                             f"attention mask")
        return m.bool()

    def head(self, samples: int) -> Calibration:
        """The first ``samples`` samples (rows of the batches; the last batch cut short):
        a smaller set for interactive use, in the same batches, loss and mask."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        batches: list[tuple[Any, ...]] = []
        labels: list[torch.Tensor] = []
        left = samples
        for i, batch in enumerate(self.batches):
            if left <= 0:
                break
            n = batch_size(batch)
            take = min(n, left)
            batches.append(batch if take == n else
                           tuple(a[:take] if isinstance(a, torch.Tensor) and a.dim()
                                 and a.shape[0] == n else a for a in batch))
            if self.labels is not None:
                labels.append(self.labels[i][:take])
            left -= take
        return Calibration(batches, self.loss, labels if self.labels is not None else None,
                           dict(self.kwargs), self.mask_index)

    def samples(self) -> list[tuple[tuple[Any, ...], torch.Tensor | None]]:
        """Every batch split into single samples (for per-sample gradients)."""
        out: list[tuple[tuple[Any, ...], torch.Tensor | None]] = []
        for i, batch in enumerate(self.batches):
            n = batch_size(batch)
            for j in range(n):
                one = tuple(a[j:j + 1] if isinstance(a, torch.Tensor) else a for a in batch)
                lab = self.labels[i][j:j + 1] if self.labels is not None else None
                out.append((one, lab))
        return out


def batch_size(batch: tuple[Any, ...]) -> int:
    for a in batch:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    return 1


def random_like(example_inputs: tuple[Any, ...], num_batches: int = 4, batch_size: int = 2,
                seed: int = 0) -> list[tuple[Any, ...]]:
    """Random batches shaped like the example inputs (token ids stay in their range)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        batch = []
        for a in example_inputs:
            if not isinstance(a, torch.Tensor):
                batch.append(a)
                continue
            shape = (batch_size,) + tuple(a.shape[1:])
            if a.dtype in (torch.long, torch.int, torch.int32):
                high = int(a.max()) + 1 if a.numel() and a.device.type != "meta" else 2
                batch.append(torch.randint(0, max(high, 2), shape, generator=gen))
            else:
                batch.append(torch.randn(shape, generator=gen).to(a.dtype))
        out.append(tuple(batch))
    return out


def load_calibration(source: str | Path | Callable[[], Any] | Calibration | None,
                     example_inputs: tuple[Any, ...], loss: str = "auto",
                     labels: Sequence[torch.Tensor] | None = None) -> Calibration:
    """Build a `Calibration` from a file, a callable, batches, or random inputs.

    Args:
        source: ``None`` for random inputs like the example; a ``.pt`` file holding a tensor,
            a tuple of tensors or a list of batches (loaded with ``weights_only=True``); a
            callable returning the same; or a ready `Calibration`.
        example_inputs: the model's example inputs (shape and dtype template).
        loss: one of `LOSSES`.
        labels: one label tensor per batch for the ``"ce"`` loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}'; choose one of {LOSSES}")
    if isinstance(source, Calibration):
        return source
    if source is None:
        batches = random_like(example_inputs)
    else:
        if callable(source):
            data = source()
        else:
            path = Path(source)
            if path.is_dir() or path.suffix in (".txt", ".jsonl"):
                raise ValueError(f"calibration '{path}' is text or images, which need the "
                                 "model's tokenizer or transform: pass "
                                 "explorer.load_data(path, loaded_model) instead of the path")
            if not path.is_file():
                raise FileNotFoundError(f"calibration file '{path}' does not exist")
            try:
                with warnings.catch_warnings():  # torch warns about foreign pickle protocols
                    warnings.simplefilter("ignore")
                    data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises a different type per cause
                raise ValueError(f"cannot read calibration file '{path}' as tensors "
                                 f"(torch.load, weights_only=True, failed with "
                                 f"{type(e).__name__}); save a tensor, a tuple of tensors "
                                 f"or a list of batches with torch.save") from e
        batches = _as_batches(data)
    return Calibration(batches, loss, list(labels) if labels is not None else None)


def _as_batches(data: Any) -> list[tuple[Any, ...]]:
    if isinstance(data, torch.Tensor):
        return [(data,)]
    if isinstance(data, tuple):
        return [data]
    if isinstance(data, list) and data:
        return [b if isinstance(b, tuple) else (b,) for b in data]
    raise ValueError("calibration data must be a tensor, a tuple of tensors or a list of "
                     f"batches, got {type(data).__name__}")


def compute_loss(model: nn.Module, batch: tuple[Any, ...], calib: Calibration,
                 label: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """The calibration loss of one batch (see the module docstring).

    Args:
        model: the model.
        batch: positional inputs.
        calib: the calibration (its loss kind, mask and keyword inputs).
        label: the batch's labels for ``"ce"``.
        seed: seeds the random direction of ``"output-probe"``.
    """
    kind = calib.loss
    if kind in ("auto", "model") and model_loss_applies(model, batch):
        mask = calib.mask(batch)
        labels = batch[0] if mask is None else batch[0].masked_fill(mask == 0, -100)
        out = model(*batch, labels=labels, **calib.kwargs)
        if getattr(out, "loss", None) is not None:
            loss: torch.Tensor = out.loss
            return loss
    out = model(*batch, **calib.kwargs)
    if kind == "ce":
        if label is None:
            raise ValueError("the 'ce' loss needs labels for every calibration batch")
        logits = getattr(out, "logits", out)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           label.reshape(-1))
    if kind == "model":
        raise ValueError("the model did not return a loss; use loss='ce' or 'output-norm'")
    leaves = [t for _p, t in tensor_leaves(out) if t.is_floating_point()]
    mask = calib.token_mask(batch)
    if kind == "output-probe":
        gen = torch.Generator().manual_seed(seed)
        return sum(_projection(t, mask, gen) for t in leaves)  # type: ignore[return-value]
    return sum(_half_square_mean(t, mask) for t in leaves)  # type: ignore[return-value]


def model_loss_applies(model: nn.Module, batch: tuple[Any, ...]) -> bool:
    """Whether ``"auto"`` uses the model's own loss (token ids in, ``labels`` accepted)."""
    return _accepts_labels(model) and bool(batch) and isinstance(batch[0], torch.Tensor) \
        and not batch[0].is_floating_point()


def _real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask]
    return t


def _projection(t: torch.Tensor, mask: torch.Tensor | None,
                gen: torch.Generator) -> torch.Tensor:
    """t . v over real tokens, v standard Gaussian."""
    real = _real(t, mask)
    v = torch.randn(real.shape, generator=gen).to(real.dtype)
    return (real * v).sum()


def _half_square_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """0.5 * mean of t^2, over real tokens only when ``t`` is (batch, tokens, ...)."""
    return 0.5 * _real(t, mask).pow(2).mean()


def _accepts_labels(model: nn.Module) -> bool:
    import inspect
    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
