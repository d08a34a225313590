"""Sequential reconstruction: refit the layers that read removed channels, one block at a time.

The closed-form reconstruction of FLAP and SlimGPT, for models made of a list of repeated
blocks (decoder layers, encoder layers; `explorer.prune.sequential.decoder_layers`). A
consumer ``y = W x + b`` of removed input channels ``R`` (an MLP down projection, an
attention output projection) keeps columns ``K`` and gets a new weight and bias
``A = [W' b']`` by ridge least squares over calibration tokens:

    A = argmin sum_t ||A [x_t[K]; 1] - y*_t||^2 + lam ||A - P||^2

* ``x_t``: the consumer's input in the **pruned** model, whose blocks below were already cut
  and refit (sequential: each block is fit on the inputs the blocks below really produce);
* ``y*_t``: the target output, one of
  * ``local``: the unpruned layer on the same input, ``[W b] [x_t; 1]`` (the refit only
    makes up for the columns it loses);
  * ``original``: the unpruned layer on its input in the **original** model, ``[W b]
    [z_t; 1]`` (the refit also corrects the error of the layer's input);
  * ``stream``: what puts the residual stream back on the original model's trajectory: the
    original block's output minus the rest of the pruned block's output (``h_orig_out -
    (h_pruned_out - y_t)``), so the refit also absorbs the error the pruned stream carries
    in from below. Only for the last consumer of a block whose output adds to the block's
    output as it is (a residual connection, checked on one batch: pre-norm decoders' MLP);
* ``P``: FLAP's bias compensation ``[W[:, K], b + W[:, R] mean(x[R])]``; the ridge pulls
  towards it, so a strong ridge gives bias compensation back.

A consumer without a bias (Llama's ``down_proj`` and ``o_proj``) is refit without one:
``A = W'`` over ``x_t[K]`` alone and ``P = W[:, K]``, so the refit model has the original's
architecture (its config describes it; a plan replays onto a fresh copy).

The math of one layer is in plain functions of its statistics (`moments`, `refits`,
`heldout_errors`), so a layer-by-layer path that gathers the statistics itself (one decoder
layer in memory at a time) computes the same refits. The targets enter only through output
products ``sum y*_t [x_t[K]; 1]^T`` (out x |K|+1), never the original inputs.

The calibration samples are split: every `HOLDOUT_EVERY`-th sample is held out (each part
batched again by length, `split`). Per consumer, the plain cut, bias compensation and ridge
fits over `RIDGES` for every target tried (`DEFAULT_STREAMS`: ``stream``, else ``original``)
are compared on the held-out tokens and the best one is kept, so a refit stays only where it
helps. The judge is the farthest-reaching target there is: the distance of the block's
output to the original model's (``stream``), else of the layer's output to the original
layer's output (``original``); relative squared error.

The pruned model is simulated on the unpruned one, without copying it: each consumer reads
only its kept inputs (a forward hook replaces its output), which is exactly the cut model
for cuts of MLP channels and heads (the producers' removed rows feed only these columns).
Nothing of the model changes here: the result is the new tensors, installed by
`explorer.prune.compensate.prune_and_compensate` with the cut, all or nothing.

What runs: the original stream is read from the scoring pass where it recorded it
(`explorer.prune.trajectory`), else the original blocks run. The pruned stream runs each
block once per batch, cheaper than the pruned model would: a block's last consumer whose
output adds to the block's output (known from the first block of its class, `_adds`) is
muted (`_muted`: it gives zeros, its inputs are still seen; its refit output is added to the
stream after the fit), and its producers (`Consumer.producers`: an MLP's gate and up
projections) give their kept channels only where one batch showed that to give the same
kept inputs and block output (`_narrow_same`: elementwise between them, not a reshape into
heads). On SmolLM2 the pruned stream costs the attention and 80 % (20 % cut) or 60 % (40 %)
of the gate and up projections.

Memory: every statistic is a sum over tokens, taken batch by batch (`Moments` for the fit,
`Judge` for the held-out errors): a batch runs through the original and the pruned block in
lockstep and leaves nothing behind but its sums. Across batches only the two streams' hidden
states entering the current block are kept (each batch's replaced by the next block's as it
is done), plus up to `KEEP_BYTES` of what moves the pruned stream on without running the
block again (batches past it run again with the fit), and (n+1) x (|K|+1) moments of the
consumer being fit (n inputs); in a block with several consumers (attention output and MLP
down projections), the later consumers' original outputs (real tokens; the original block
runs once per batch, not once per consumer); never a consumer's inputs over all samples,
never a second copy of the model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .calibration import Calibration, batch_size
from .importance import calibrating, input_dim
from .sequential import (
    Inputs,
    SequentialError,
    _first_inputs,
    _hidden_in,
    _with_hidden,
    decoder_layers,
)
from .trajectory import Trajectory

HOLDOUT_EVERY = 5  # every 5th calibration sample judges the refits (20 %)
# ridge strengths tried, relative to the mean input energy (chosen per layer on held-out tokens)
RIDGES = (0.03, 0.1, 0.3, 1.0)
STREAMS = ("local", "original", "stream")  # the targets there are (module docstring)
# the target tried by default: ``stream`` where the block allows it, else ``original`` in its
# place. Both were tried until 2026-12-05: on SmolLM2 (30 layers, 20 % and 40 % MLP cut)
# ``original`` won one layer of 60, the first, where the two targets are the same
DEFAULT_STREAMS = ("stream",)
# what a block keeps of its last consumer's inputs to move the pruned stream on without a
# second run of the block (`_Shift`)
KEEP_BYTES = 96 << 20
# a ridge system whose trace over its ridge (a bound on its condition number) is below this
# is factored and solved in float32 (`_factor`)
FLOAT32_CONDITION = 1e5


@dataclass(frozen=True)
class Affine:
    """A consumer read as ``y = W x + b`` with ``W`` (out, in), whatever layout its module
    stores (`affine`, the one reader of the layers `reconstruct` refits)."""

    weight: torch.Tensor  # W (out, in): the module's weight, transposed where it stores W^T
    bias: torch.Tensor | None
    out_dim: int  # the dim of the stored weight its outputs index (Linear 0, Conv1D 1)

    def oriented(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` between the (out, in) form and the module's layout, either way (the
        transpose of transformers' ``Conv1D``, which stores (in, out), is its own inverse)."""
        return w if self.out_dim == 0 else w.T.contiguous()


def affine(module: nn.Module) -> Affine | None:
    """``module`` as a consumer to refit: a layer whose 2-D weight multiplies its input
    channels (`nn.Linear`; transformers' GPT-2 ``Conv1D``, weight (in, out)), else None."""
    dim = input_dim(module)
    weight = getattr(module, "weight", None)
    if dim is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    bias = getattr(module, "bias", None)
    w = weight.detach()
    return Affine(w if dim == 1 else w.T, bias.detach() if isinstance(bias, torch.Tensor)
                  else None, 1 - dim)


def kept_rows(model: nn.Module, name: str, tensor: torch.Tensor,
              keeps: Mapping[tuple[str, int], Sequence[int]]) -> torch.Tensor:
    """A refit tensor (``name``: a consumer's weight or bias, in its module's layout, at the
    unpruned output width) cut to the output rows ``keeps`` leaves its module."""
    owner, _, attr = name.rpartition(".")
    form = affine(model.get_submodule(owner))
    out_dim = 0 if form is None else form.out_dim
    rows = keeps.get((f"{owner}.weight", out_dim))
    if rows is None:
        return tensor
    return tensor.index_select(out_dim if attr == "weight" else 0, torch.as_tensor(rows))


@dataclass
class Consumer:
    """One layer to refit: it loses input columns."""

    module: str
    weight: str  # qualified weight name
    kept: np.ndarray  # kept input indices (of the unpruned layer)
    # layers of its block whose output channels are its inputs, cut to the same ``kept``
    # (`compensate.block_consumers`): the pruned stream may run them at the cut width
    producers: tuple[str, ...] = ()


@dataclass
class Fit:
    """What was chosen for one consumer, with its held-out errors."""

    module: str
    kept: np.ndarray  # kept input indices
    choice: str  # "plain", "bias", or "ridge <lam> <stream>"
    error_plain: float  # relative squared output error of the plain cut (held-out tokens)
    error: float  # the same for the choice


@dataclass
class Reconstruction:
    """New tensors (unpruned output rows, kept input columns) and the per-layer choices."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    fits: list[Fit] = field(default_factory=list)
    heldout: bool = True  # False: too few samples to hold any out; judged on the fit tokens

    def summary(self) -> str:
        """One line for the report: where the refit was kept and what it bought."""
        if not self.fits:
            return ""
        kept = [f for f in self.fits if f.choice != "plain"]
        before = float(np.mean([f.error_plain for f in self.fits]))
        after = float(np.mean([f.error for f in self.fits]))
        where = "held-out calibration tokens" if self.heldout else \
            "the calibration tokens (too few samples to hold some out)"
        kinds = sorted({f.choice.split()[0] + (" " + f.choice.split()[-1]
                                               if f.choice.startswith("ridge") else "")
                        for f in kept})
        return (f"reconstruction (sequential least squares) kept in {len(kept)}/"
                f"{len(self.fits)} layers ({', '.join(kinds) or 'none'}): mean relative "
                f"output error of the cut layers on {where} {before:.4g} -> {after:.4g}")


def split(calib: Calibration, every: int = HOLDOUT_EVERY) -> tuple[Calibration, Calibration | None]:
    """(fit, held-out): every ``every``-th sample held out; None when there are too few.

    Each part is batched again (`_rebatched`): samples of like length together, as many per
    batch as the largest batch given. So the held-out fifth runs in a few full batches
    rather than one or two samples of every batch (which doubled the block calls), and the
    batches carry little padding (prose paragraphs padded to the longest of eight are a
    third padding). The same samples and real tokens as the batches given: every sum over
    them is the same up to float rounding.
    """
    total = sum(batch_size(b) for b in calib.batches)
    if total < every:
        return calib, None
    fit: list[tuple[Any, ...]] = []
    held: list[tuple[Any, ...]] = []
    start = 0
    for batch in calib.batches:
        n = batch_size(batch)
        hold = torch.tensor([(start + j) % every == every - 1 for j in range(n)])
        start += n
        for out, rows in ((fit, ~hold), (held, hold)):
            if bool(rows.any()):
                out.append(tuple(a[rows] if isinstance(a, torch.Tensor) and a.dim() > 0
                                 and a.shape[0] == n else a for a in batch))
    size = max(batch_size(b) for b in calib.batches)
    return (_rebatched(Calibration(fit, calib.loss, None, dict(calib.kwargs), calib.mask_index),
                       size),
            _rebatched(Calibration(held, calib.loss, None, dict(calib.kwargs),
                                   calib.mask_index), size))


def in_order(calib: Calibration) -> Calibration:
    """``calib``'s batches as `reconstruct` runs them: the fit split's, then the held-out
    split's (`split`). A pass over these that keeps its blocks' outputs (a `Trajectory`) saves
    `reconstruct` running the original blocks again."""
    fit, held = split(calib)
    return Calibration(fit.batches + (held.batches if held is not None else []), fit.loss,
                       None, dict(fit.kwargs), fit.mask_index)


def _rebatched(calib: Calibration, size: int) -> Calibration:
    """``calib``'s samples in batches of up to ``size``, longest first (length: up to the
    last real token of the padding mask), each batch cut or padded on the right to its
    longest sample (the mask pads with 0, other token inputs with the value the data padded
    with). ``calib`` as it is where its batches do not line up: a non-tensor entry differs
    between batches, or a per-sample tensor that is not token-aligned (shaped like the
    mask) differs in shape."""
    batches = calib.batches
    kinds = [_entry_kinds(calib, b) for b in batches]
    if len(batches) < 2 or any(k != kinds[0] for k in kinds) or any(
            kind[0] == "shared" and any(b[i] is not batches[0][i] for b in batches)
            for i, kind in enumerate(kinds[0])):
        return calib
    samples: list[tuple[int, int, int]] = []  # (length, batch, row)
    for b, batch in enumerate(batches):
        mask = calib.token_mask(batch)
        for j in range(batch_size(batch)):
            real = torch.nonzero(mask[j]).flatten() if mask is not None else None
            samples.append((int(real[-1]) + 1 if real is not None and len(real) else 1, b, j))
    if calib.mask_index is not None:
        samples.sort(key=lambda s: -s[0])  # stable: like lengths keep the order given
    pads = [_pad_value(calib, i) if kind == "tokens" else 0
            for i, (kind, _shape) in enumerate(kinds[0])]
    out = []
    for at in range(0, len(samples), size):
        chunk = samples[at:at + size]
        width = max(s[0] for s in chunk)
        entries: list[Any] = []
        for i, (kind, _shape) in enumerate(kinds[0]):
            if kind == "shared":
                entries.append(batches[0][i])
                continue
            rows = [batches[b][i][j:j + 1] for _n, b, j in chunk]
            if kind == "tokens":
                rows = [_to_width(r, width, pads[i]) for r in rows]
            entries.append(torch.cat(rows))
        out.append(tuple(entries))
    return Calibration(out, calib.loss, None, dict(calib.kwargs), calib.mask_index)


def _entry_kinds(calib: Calibration, batch: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """What each entry of ``batch`` is: ``tokens`` (per sample and token-aligned: its first
    two dims are the padding mask's), ``rows`` (per sample, with its shape), or ``shared``;
    with what must agree between batches to batch their samples together."""
    n = batch_size(batch)
    mask = calib.token_mask(batch)
    kinds: list[tuple[str, Any]] = []
    for a in batch:
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != n:
            kinds.append(("shared", None))
        elif mask is not None and a.dim() >= 2 and tuple(a.shape[:2]) == tuple(mask.shape):
            kinds.append(("tokens", (tuple(a.shape[2:]), a.dtype)))
        else:
            kinds.append(("rows", (tuple(a.shape[1:]), a.dtype)))
    return kinds


def _pad_value(calib: Calibration, index: int) -> Any:
    """What the data pads the token-aligned entry ``index`` with (its value at the first
    padded token; 0 where nothing is padded, and for the mask itself)."""
    if index == calib.mask_index:
        return 0
    for batch in calib.batches:
        mask = calib.token_mask(batch)
        entry = batch[index]
        if mask is not None and isinstance(entry, torch.Tensor) and bool((~mask).any()):
            return entry[~mask][0].clone()
    return 0


def _to_width(row: torch.Tensor, width: int, pad: Any) -> torch.Tensor:
    """A token-aligned (1, tokens, ...) entry cut or padded on the right to ``width``."""
    if row.shape[1] >= width:
        return row[:, :width]
    fill = torch.full((1, width - row.shape[1], *row.shape[2:]), 0, dtype=row.dtype)
    fill[...] = pad
    return torch.cat([row, fill], dim=1)


def inside_blocks(model: nn.Module, modules: Sequence[str]) -> dict[str, int]:
    """Module -> index of the repeated block holding it (modules outside are left out)."""
    try:
        prefix, layers = decoder_layers(model)
    except SequentialError:
        return {}
    out = {}
    for m in modules:
        head = f"{prefix}." if prefix else ""
        if m.startswith(head):
            first = m[len(head):].split(".", 1)[0]
            if first.isdigit() and int(first) < len(layers) and \
                    affine(model.get_submodule(m)) is not None:
                out[m] = int(first)
    return out


def reconstruct(model: nn.Module, consumers: Sequence[Consumer], calib: Calibration,
                ridges: Sequence[float] = RIDGES, streams: Sequence[str] = DEFAULT_STREAMS,
                resident: Callable[[nn.Module], AbstractContextManager[Any]] | None = None,
                block_done: Callable[[int, Reconstruction], None] | None = None,
                keep_bytes: int = KEEP_BYTES, trajectory: Trajectory | None = None
                ) -> Reconstruction:
    """Refit ``consumers`` (layers `affine` reads, inside the repeated blocks) block by
    block.

    Args:
        model: the unpruned model (left unchanged: hooks only, removed on leaving).
        consumers: the layers that lose input columns, with their kept columns.
        calib: calibration batches (split into fit and held-out samples, `split`).
        ridges: ridge strengths to try, relative to the mean energy of the kept inputs.
        streams: targets to try (`STREAMS`, module docstring); ``stream`` where a block
            does not define it is ``original`` in its place.
        resident: a context each block's work runs in (a model larger than memory keeps an
            offloaded block's weights loaded there, `explorer.prune.sequential`).
        block_done: called with a block's index and the reconstruction so far once that
            block is fit; it may take the block's tensors out of ``tensors`` (to disk): later
            blocks read only their own.
        keep_bytes: what a block may keep of its last consumer's kept inputs to give the
            pruned stream's next inputs without running the block again (`_Shift`); batches
            past it run the block again.
        trajectory: the original blocks' outputs on the batches `in_order` gives, recorded
            by a pass over them (`Trajectory.recording`); read in place of running the
            original blocks where it `matches` the model and batches (the same result).

    Returns:
        The new tensors of the refit layers (less those ``block_done`` took) and the
        choice for every consumer.

    Raises:
        SequentialError: the model has no repeated blocks, or its forward does not reach them.
    """
    for s in streams:
        if s not in STREAMS:
            raise ValueError(f"unknown reconstruction target {s!r}; choose from {STREAMS}")
    _prefix, layers = decoder_layers(model)
    where = inside_blocks(model, [c.module for c in consumers])
    by_layer: dict[int, list[Consumer]] = {}
    for c in consumers:
        if c.module in where:
            by_layer.setdefault(where[c.module], []).append(c)
    fit_data, held_data = split(calib)
    out = Reconstruction(heldout=held_data is not None)
    if not by_layer:
        return out
    data = [fit_data] + ([held_data] if held_data is not None else [])
    recorded = trajectory is not None and trajectory.matches(
        model, [b for d in data for b in d.batches])
    with torch.no_grad(), calibrating(model):
        orig = [_first_inputs(model, layers[0], d) for d in data]
        pruned = [list(s) for s in orig]
        adds: dict[tuple[Any, ...], bool] = {}  # `_adds`, per block class and consumer
        for i, layer in enumerate(layers[:max(by_layer) + 1]):
            dense = _Dense(trajectory, i, [len(d.batches) for d in data]) \
                if recorded and trajectory is not None else None
            with (resident or _as_is)(layer):
                orig, pruned = _block(model, layer, by_layer.get(i, []), data, orig, pruned,
                                      out, ridges, streams, keep_bytes, adds, dense)
            if block_done is not None and i in by_layer:
                block_done(i, out)
    return out


@dataclass
class _Dense:
    """One block's recorded outputs (`Trajectory`), by split and batch."""

    trajectory: Trajectory
    block: int
    sizes: list[int]  # batches per split

    def next(self, d: int, b: int, inp: Inputs) -> Inputs:
        """The original stream's next inputs for batch ``b`` of split ``d`` (``inp``: its
        inputs to this block)."""
        hidden = self.trajectory.hidden(self.block, sum(self.sizes[:d]) + b)
        if hidden.shape != _hidden_in(inp).shape:
            raise SequentialError(f"the recorded output of block {self.block} is shaped "
                                  f"{tuple(hidden.shape)}, its input "
                                  f"{tuple(_hidden_in(inp).shape)}")
        return _with_hidden(inp, hidden)


def _block(model: nn.Module, layer: nn.Module, todo: list[Consumer], data: list[Calibration],
           orig: list[list[Inputs]], pruned: list[list[Inputs]], out: Reconstruction,
           ridges: Sequence[float], streams: Sequence[str], keep_bytes: int,
           adds: dict[tuple[Any, ...], bool], dense: _Dense | None = None
           ) -> tuple[list[list[Inputs]], list[list[Inputs]]]:
    """Fit one block's consumers; the next block's inputs of both streams (the lists are
    replaced batch by batch, in place).

    One consumer at a time, in the order the forward runs them, and for each one batch at a
    time: the batch through the original block gives the targets (run once, for the first
    consumer: the later ones' outputs are kept for them), through the pruned block (this
    block's consumers fit so far read their kept inputs) the consumer's inputs. The fit
    split's batches are summed into the moments (`Moments`), then the held-out split's judge
    the refits (`Judge`): nothing of a batch outlives its turn but the streams and, where the
    last consumer's output adds to the block's output, up to ``keep_bytes`` of what gives
    the next pruned inputs without running the block again (`_Shift`). With ``dense`` (the
    recorded original outputs) the original block runs only where a consumer's original
    output is a target.
    """
    start = len(out.fits)  # the fits of this block: the only ones its forward reads
    names = {id(model.get_submodule(c.module)): c for c in todo}
    # the forward's order matters only between several consumers (one run finds it)
    order = _in_order(layer, todo, names, pruned[0][0]) if len(todo) > 1 else todo
    masks = [_masks(orig[d], data[d]) for d in range(len(data))]
    shift = _Shift(keep_bytes)
    later: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # the later consumers' targets
    for j, c in enumerate(order):
        _fit(model, layer, c, masks, orig, pruned, out, ridges, streams, start,
             shift if j == len(order) - 1 else None, adds,
             ([x.module for x in order[1:]], later) if j == 0 else ([], later), dense)
    if not order:  # nothing to fit here: the original stream through the block as it is
        for d, batches in enumerate(orig):
            for b, inp in enumerate(batches):
                batches[b] = dense.next(d, b, inp) if dense is not None else \
                    _run(layer, inp, masks[d][b], model).next
    for d, batches in enumerate(pruned):
        for b, inp in enumerate(batches):
            x = shift.kept.pop((d, b), None)
            if x is not None:  # (out - old) in place of the input, + new: the chosen fit
                batches[b] = _with_hidden(inp, _hidden_in(inp) + _refit_output(
                    model, out.fits[-1], out, x))
                continue
            with _replaced(model, out, start):
                batches[b] = _run(layer, inp, masks[d][b], model).next
    return orig, pruned


class _Shift:
    """The last consumer's kept inputs per batch, up to a byte budget: with the block's
    output less that consumer's output (which takes the place of the batch's pruned-stream
    input, read no more) they give the next inputs without running the block again (the
    consumer's output adds to the block's output as it is, `_adds`)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.kept: dict[tuple[int, int], torch.Tensor] = {}

    def keep(self, at: tuple[int, int], x: torch.Tensor) -> bool:
        """Keep ``x`` for batch ``at`` if it fits the budget; whether it was kept."""
        size = x.numel() * x.element_size()
        if size > self.budget:
            return False
        self.kept[at] = x
        self.budget -= size
        return True


def _fit(model: nn.Module, layer: nn.Module, c: Consumer, masks: list[list[torch.Tensor | None]],
         orig: list[list[Inputs]], pruned: list[list[Inputs]], out: Reconstruction,
         ridges: Sequence[float], streams: Sequence[str], start: int,
         shift: _Shift | None, known: dict[tuple[Any, ...], bool],
         later: tuple[list[str], dict[tuple[int, int], dict[str, torch.Tensor]]],
         dense: _Dense | None = None) -> None:
    """Fit ``c`` batch by batch (`_block`): moments over the fit split, then the candidates
    judged on the held-out split; the choice goes into ``out``. The block's first consumer
    runs the original stream on to the next block's inputs and keeps the outputs of the
    later consumers (``later``: their names, and the outputs per batch) for them; with
    ``shift`` (the block's last consumer) what the pruned stream's next inputs need is kept
    there. With ``dense``, the original block runs only when a consumer's original output
    is a target (not for a lone ``stream`` fit: its target is the block's output)."""
    module = model.get_submodule(c.module)
    form = affine(module)
    assert form is not None  # `inside_blocks` keeps these only
    cols = torch.as_tensor(c.kept)
    want = "stream" in streams and shift is not None
    # whether the producers must run at full width: known per block class; at the cut
    # width the consumer's removed inputs are not seen, which only its bias compensation
    # (the removed inputs' means) and the ``local`` target read
    wide = (_class_key(layer, module), "wide", _places(model, layer, c.producers))
    if not c.producers or form.bias is not None or "local" in streams:
        known.setdefault(wide, True)
    after, kept_outs = later
    acc: Moments | None = None
    judge: Judge | None = None
    adds: bool | None = None if shift is not None else False
    tried: list[str] = []  # the targets fit (`_tried`), known from the first batch
    for d in range(len(orig)):
        if d == 1 and acc is not None:  # the fit split is summed: its candidates
            judge = Judge(refits(form.weight, form.bias, c.kept, acc.gram, acc.cross, ridges,
                                 tried), c.kept)
        for b in range(len(orig[d])):
            mask = masks[d][b]
            # the block's last consumer adding to its output (known from a block of its
            # class) need not run: the stream takes its refit output after the fit; and
            # its producers run at the cut width where that was found to give the same
            # kept inputs (`_narrow_same`)
            mute = want and known.get(_class_key(layer, module)) is True
            narrow = mute and known.get(wide) is False
            with _replaced(model, out, start), \
                    _muted(module, form.weight.shape[0]) if mute else contextlib.nullcontext(), \
                    _narrowed(model, c.producers, cols) if narrow else contextlib.nullcontext():
                p = _run(layer, pruned[d][b], mask, model, inputs=[c.module],
                         full=c.module if shift is not None else None, hidden=want)
            if mute and wide not in known:
                known[wide] = not _narrow_same(model, layer, c, out, start, pruned[d][b], mask,
                                               p, form.weight.shape[0])
            if adds is None:
                adds = _adds(model, layer, c, out, p, pruned[d][b], start, known)
            mine: torch.Tensor | None = None
            if (d, b) in kept_outs:  # a later consumer: the first one ran the original block
                mine = kept_outs[(d, b)].pop(c.module)
            elif dense is not None and not after and adds and want and \
                    "original" not in streams:  # the original output is no target here
                orig[d][b] = dense.next(d, b, orig[d][b])
            else:  # the block's first consumer: the original stream moves on
                o = _run(layer, orig[d][b], mask, model, outputs=[c.module, *after])
                orig[d][b] = o.next
                mine = o.outs[c.module]
                kept_outs[(d, b)] = {m: o.outs[m] for m in after}
            targets: dict[str, torch.Tensor] = {} if mine is None else {"original": mine}
            if adds and want:  # the block's output back onto the original stream
                assert p.hidden is not None
                o_hidden = _rows(_hidden_in(orig[d][b]), mask).float()  # moved on: its output
                targets["stream"] = o_hidden - (p.hidden - _rows(p.full[0][1], mask).float())
            goal = "stream" if "stream" in targets else "original"
            x = p.rows[c.module]
            if d == 0:
                if acc is None:
                    tried = _tried(streams, targets)
                    acc = Moments.empty(form.weight.shape[1], cols, {k: targets[k].shape[1]
                                                           for k in dict.fromkeys([*tried, goal])
                                                           if k in targets},
                                        all_rows="local" in tried, goal=goal)
                acc.add(x, targets)
            elif judge is not None:
                judge.add(x, targets[goal])
            if adds and shift is not None:
                x_full, old = p.full[0]
                if shift.keep((d, b), _kept(x_full, cols)):
                    pruned[d][b] = _with_hidden(pruned[d][b], _hidden_in(p.next) - old)
    assert acc is not None  # every split has a batch
    if judge is None or not judge.tokens:
        # no held-out split, or none of its tokens reached this layer (samples that are all
        # padding): the fit tokens judge, from their moments, and the summary says so
        out.heldout = False
        cands = judge.cands if judge is not None else refits(
            form.weight, form.bias, c.kept, acc.gram, acc.cross, ridges, tried)
        errors = acc.errors(cands)
    else:
        cands, errors = judge.cands, judge.errors()
    choice = min(errors, key=lambda k: (errors[k], k != "plain"))
    out.fits.append(Fit(c.module, c.kept, choice, errors["plain"], errors[choice]))
    if choice != "plain":
        dtype = form.weight.dtype
        out.tensors[c.weight] = form.oriented(cands[choice][:, :-1]).to(dtype)
        if form.bias is not None:  # a layer without a bias is refit without one
            out.tensors[f"{c.module}.bias"] = cands[choice][:, -1].to(dtype)


def _tried(streams: Sequence[str], targets: Mapping[str, torch.Tensor]) -> list[str]:
    """The targets of ``streams`` a consumer is fit to, given the ``targets`` its block
    defines: ``stream`` where defined, else ``original`` in its place (`DEFAULT_STREAMS`)."""
    tried = [s for s in streams if s in targets or s == "local"]
    if "stream" in streams and "stream" not in targets and "original" not in tried:
        tried.append("original")
    return tried


@contextlib.contextmanager
def _as_is(_module: nn.Module) -> Iterator[None]:
    yield


def _in_order(layer: nn.Module, todo: list[Consumer], names: dict[int, Consumer],
              first: Inputs) -> list[Consumer]:
    """``todo`` in the order the block's forward runs them (on one batch)."""
    seen: list[Consumer] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, _a: seen.append(names[id(mod)]) if names[id(mod)] not in seen else None)
        for m in layer.modules() if id(m) in names]
    try:
        args, kwargs = first
        layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen + [c for c in todo if c not in seen]


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, channels) of a channels-last input, real tokens only."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def _masks(inputs: list[Inputs], data: Calibration) -> list[torch.Tensor | None]:
    """The token mask of every batch, or None where the batch has none."""
    out: list[torch.Tensor | None] = []
    for batch, inp in zip(data.batches, inputs, strict=True):
        mask = data.token_mask(batch)
        hidden = _hidden_in(inp)
        out.append(mask if mask is not None and tuple(hidden.shape[:2]) == tuple(mask.shape)
                   else None)
    return out


@dataclass
class _Run:
    """One batch of one stream through one block: what the hooks saw, the next inputs."""

    rows: dict[str, torch.Tensor]  # module -> its inputs (real tokens, float32)
    outs: dict[str, torch.Tensor]  # module -> its outputs (real tokens, float32)
    next: Inputs
    full: list[tuple[torch.Tensor, torch.Tensor]]  # the ``full`` module's (input, output)
    hidden: torch.Tensor | None  # the block's output (real tokens, float32), when asked


def _run(layer: nn.Module, inp: Inputs, mask: torch.Tensor | None, model: nn.Module,
         inputs: Sequence[str] = (), full: str | None = None, outputs: Sequence[str] = (),
         hidden: bool = False) -> _Run:
    """Run one batch through ``layer``, keeping the inputs of ``inputs`` and the outputs of
    ``outputs`` (real-token rows, float32; several calls of a module in one forward are
    stacked), for ``full`` its whole input and output, and with ``hidden`` the block's
    output rows."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in [*inputs, *outputs]}
    full_io: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [model.get_submodule(m).register_forward_pre_hook(
        lambda _m, args, into=seen[m]: into.append(_rows(args[0].detach(), mask).float()))
        for m in inputs]
    handles += [model.get_submodule(m).register_forward_hook(
        lambda _m, _a, output, into=seen[m]: into.append(_rows(output.detach(), mask).float()))
        for m in outputs if m not in inputs]
    if full is not None:
        handles.append(model.get_submodule(full).register_forward_hook(
            lambda _m, args, output: full_io.append((args[0].detach(), output.detach()))))
    try:
        nxt = _with_hidden(inp, layer(*inp[0], **inp[1]))
    finally:
        for h in handles:
            h.remove()
    stacked = {m: v[0] if len(v) == 1 else torch.cat(v) for m, v in seen.items()}
    return _Run({m: stacked[m] for m in inputs}, {m: stacked[m] for m in outputs}, nxt,
                full_io, _rows(_hidden_in(nxt), mask).float() if hidden else None)


def _adds(model: nn.Module, layer: nn.Module, c: Consumer, rec: Reconstruction, run: _Run,
          inp: Inputs, start: int, known: dict[tuple[Any, ...], bool]) -> bool:
    """Whether ``c``'s output is added to the block's output as it is (a residual
    connection): the block with ``c`` cut gives ``out + cut - old``, checked on one batch
    (``run``, of the pruned stream ``inp``). Then the block's next inputs need no second run
    (`_Shift`), and the ``stream`` target is defined.

    How a block's forward combines a consumer's output is its code's, the same in every
    block of a class: the check runs once per block class and consumer (its path in the
    block), in ``known``, and later blocks read it (a block run per block less)."""
    if len(run.full) != 1:  # called more than once per forward
        return False
    module = model.get_submodule(c.module)
    x, old = run.full[0]
    out = _hidden_in(run.next)
    if out.shape != old.shape:  # e.g. a layer on flattened tokens: no plain sum
        return False
    key = _class_key(layer, module)
    if key not in known:
        known[key] = _sums(model, layer, module, c, rec, run, inp, start)
    return known[key]


def _class_key(layer: nn.Module, module: nn.Module) -> tuple[Any, ...]:
    """``module``'s place in blocks of ``layer``'s class (what `_adds` knows per class)."""
    where = next(n for n, m in layer.named_modules() if m is module)
    return (type(layer), where, type(module))


def _places(model: nn.Module, layer: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """The places in ``layer`` of the modules ``names`` (of ``model``)."""
    ids = {id(model.get_submodule(n)) for n in names}
    return tuple(sorted(n for n, m in layer.named_modules() if id(m) in ids))


@contextlib.contextmanager
def _muted(module: nn.Module, out_features: int) -> Iterator[None]:
    """``module`` gives zeros while inside (its hooks still run: its inputs are seen), and
    costs nothing: for the block's last consumer when its output adds to the block's output
    (`_adds`), whose output then is the block's output less the rest of the block, which is
    all the pruned stream needs (the consumer's output is the refit's, added after)."""
    had = module.__dict__.get("forward")  # an instance forward (accelerate's) to put back

    def silent(x: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    module.forward = silent
    try:
        yield
    finally:
        if had is not None:
            module.forward = had
        else:
            del module.forward


@contextlib.contextmanager
def _narrowed(model: nn.Module, producers: Sequence[str], cols: torch.Tensor) -> Iterator[None]:
    """``producers`` give their kept output channels ``cols`` only while inside."""
    handles = [model.get_submodule(m).register_forward_hook(
        lambda _m, _a, output: output.index_select(-1, cols.to(output.device)))
        for m in producers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _narrow_same(model: nn.Module, layer: nn.Module, c: Consumer, rec: Reconstruction,
                 start: int, inp: Inputs, mask: torch.Tensor | None, run: _Run,
                 out_features: int) -> bool:
    """Whether ``c``'s producers at the cut width give the block's forward the same kept
    inputs of ``c`` and the same output as at full width (``run``, muted): elementwise
    between them (an MLP's gate, activation and up projection), not through a reshape into
    heads. Checked on one batch, once per block class."""
    if not c.producers:
        return False
    cols = torch.as_tensor(c.kept)
    try:
        with _replaced(model, rec, start), _muted(model.get_submodule(c.module), out_features), \
                _narrowed(model, c.producers, cols):
            narrow = _run(layer, inp, mask, model, inputs=[c.module], hidden=True)
    except Exception:  # noqa: BLE001 - whatever the block's code refuses at the cut width
        return False
    x, wide = narrow.rows[c.module], run.rows[c.module].index_select(-1, cols)
    assert run.hidden is not None and narrow.hidden is not None
    return x.shape == wide.shape and narrow.hidden.shape == run.hidden.shape and bool(
        torch.allclose(x, wide, rtol=1e-5, atol=1e-6 * (float(wide.abs().max()) + 1e-12))
        and torch.allclose(narrow.hidden, run.hidden, rtol=1e-5,
                           atol=1e-6 * (float(run.hidden.abs().max()) + 1e-12)))


def _sums(model: nn.Module, layer: nn.Module, module: nn.Module, c: Consumer,
          rec: Reconstruction, run: _Run, inp: Inputs, start: int) -> bool:
    """`_adds`' check: the block run again with ``c``'s output changed, twice: cut (the
    change the refit makes), and moved by a fixed pattern the size of the block's output
    (where the cut changes little, as for removed channels that carry nothing, the first
    says nothing; a norm after the consumer, as in a post-norm block, takes the pattern's
    mean and scale away). Additive where both changes come out of the block as they went
    in."""
    x, old = run.full[0]
    out = _hidden_in(run.next)
    cut = _reader(module, Fit(c.module, c.kept, "plain", 0.0, 0.0), Reconstruction())
    pattern = torch.linspace(-1.0, 1.0, old.shape[-1], dtype=old.dtype,
                             device=old.device) * (float(out.pow(2).mean().sqrt()) + 1e-6)
    for change, delta in ((cut, cut(module, (x,), old) - old),
                          (lambda _m, _a, o: o + pattern, pattern)):
        guess = out + delta
        handle = module.register_forward_hook(change)
        try:
            with _replaced(model, rec, start):
                args, kwargs = inp
                real = _hidden_in(_with_hidden(inp, layer(*args, **kwargs)))
        finally:
            handle.remove()
        if real.shape != guess.shape or \
                float((real - guess).abs().max()) > 1e-4 * (float(real.abs().max()) + 1e-12):
            return False
    return True


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W b]`` in float64 (a zero column for a layer without a bias)."""
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b.unsqueeze(1)], dim=1)


def refits(weight: torch.Tensor, bias: torch.Tensor | None, kept: np.ndarray,
           gram: torch.Tensor, cross: Mapping[str, torch.Tensor] | None = None,
           ridges: Sequence[float] = RIDGES, streams: Sequence[str] = STREAMS
           ) -> dict[str, torch.Tensor]:
    """The candidate refits of one consumer ``y = W x + b`` from its input statistics.

    The math of one layer only (no model, no hooks): `reconstruct` calls it block by
    block, and a layer-by-layer path can call it on statistics it gathers itself.

    Args:
        weight: ``W`` (out, n), the unpruned layer's weight.
        bias: ``b`` (out,), or None: the layer has no bias and is refit without one (every
            candidate's bias column is zero), so the result fits the same architecture.
        kept: the kept input indices ``K``.
        gram: `moments` of the pruned-stream inputs: sums of ``[x; 1] [x_K; 1]^T``,
            (n + 1, |K| + 1).
        cross: per target output (``original``, ``stream``): sums of ``y* [x_K; 1]^T``,
            (out, |K| + 1) (`moments`), or None.
        ridges: ridge strengths, relative to the mean energy of the kept inputs.
        streams: the targets to fit: ``local`` (needs ``gram`` only) and those in
            ``cross`` (others are skipped).

    Returns:
        Candidate ``[W' b']`` (out, |K| + 1), float64: ``plain`` (the cut), ``bias``
        (FLAP's mean compensation; a layer without a bias has none), and ``ridge <lam>
        <stream>`` for every strength and target whose system is positive definite.
    """
    n = weight.shape[1]
    has_bias = bias is not None
    full = _augmented(weight, bias)  # (out, n + 1)
    kept_aug = torch.as_tensor(np.append(kept, n))
    removed = torch.as_tensor(np.setdiff1d(np.arange(n), kept))
    count = max(float(gram[n, -1]), 1.0)
    plain = full[:, kept_aug].clone()
    cands: dict[str, torch.Tensor] = {"plain": plain}
    prior = plain.clone()
    if has_bias:
        prior[:, -1] += full[:, removed] @ (gram[removed, -1] / count)  # FLAP: the mean dropped
        cands["bias"] = prior
    # a layer without a bias solves for its kept columns only (the last row/column out)
    size = len(kept_aug) if has_bias else len(kept_aug) - 1
    g_kk = gram[kept_aug][:size, :size]
    scale = float(torch.diagonal(g_kk).mean())
    rhs = {}
    if "local" in streams:
        rhs["local"] = full @ gram[:, :size]
    for name, products in (cross or {}).items():
        if name in streams:
            rhs[name] = products[:, :size]
    eye = torch.eye(size, dtype=g_kk.dtype)
    for r in ridges:
        lam = r * scale
        chol = _factor(g_kk + lam * eye, lam)
        if chol is None:  # not positive definite even with the ridge: skip this strength
            continue
        for s, right in rhs.items():
            sol = torch.cholesky_solve((right + lam * prior[:, :size]).T.to(chol.dtype),
                                       chol).T.double()
            if not has_bias:
                sol = torch.cat([sol, torch.zeros(sol.shape[0], 1, dtype=sol.dtype)], dim=1)
            cands[f"ridge {r:g} {s}"] = sol
    return cands


def _factor(system: torch.Tensor, ridge: float) -> torch.Tensor | None:
    """The Cholesky factor of a ridge system ``G + ridge I`` (float64 sums), in float32
    where that is accurate, else float64; None when it is not positive definite.

    float32 halves the cost of the factor and the solves (a third of the reconstruction's
    linear algebra on SmolLM2). Its condition number is at most ``trace / ridge`` (``G`` is
    positive semi-definite): ``n / r + n`` for the strength ``r`` relative to the mean
    diagonal, 4.2e4 for 1,229 kept channels at ``RIDGES[0]``, so a float32 solve is good to
    about 1e-3 at worst; a system past ``FLOAT32_CONDITION`` is solved in float64.
    """
    if ridge > 0 and float(torch.diagonal(system).sum()) / ridge < FLOAT32_CONDITION:
        try:
            factor: torch.Tensor = torch.linalg.cholesky(system.float())
            return factor
        except RuntimeError:
            pass
    try:
        factor = torch.linalg.cholesky(system)
    except RuntimeError:
        return None
    return factor


class Moments:
    """The sums over tokens a refit reads (`refits`), added batch by batch (`moments`).

    ``gram``: the columns of the (n+1)^2 moment matrix of ``[x; 1]`` a refit reads,
    (n+1, |cols|+1); ``cross``: per target, ``sum y [x[cols]; 1]^T``, (out, |cols|+1);
    ``energy``: ``sum ||y||^2`` of the ``goal`` target (`errors`). ``all_rows=False`` leaves
    out the products of ``gram``'s removed rows (they keep only their sums, the last
    column): all that `refits` reads except for the ``local`` target, at |cols| / n of the
    cost. Then the kept block, ``x[cols]^T x[cols]``, is summed on its own (`_gram_kept`:
    symmetric, three quarters of a full product) and put in place when ``gram`` is read.
    """

    def __init__(self, gram: torch.Tensor, cross: dict[str, torch.Tensor], cols: torch.Tensor,
                 all_rows: bool = True, goal: str | None = None) -> None:
        self._gram, self.cross, self.cols = gram, cross, cols
        self.all_rows, self.goal, self.energy = all_rows, goal, 0.0
        self._kept: torch.Tensor | None = None  # the kept block's sums not yet in ``_gram``

    @property
    def gram(self) -> torch.Tensor:
        if self._kept is not None:
            self._gram[self.cols, :-1] += self._kept
            self._kept = None
        return self._gram

    @classmethod
    def empty(cls, n: int, cols: torch.Tensor, outs: Mapping[str, int], all_rows: bool = True,
              goal: str | None = None) -> Moments:
        """Zero sums for inputs of ``n`` channels and targets of ``outs`` channels."""
        return cls(torch.zeros(n + 1, len(cols) + 1, dtype=torch.float64),
                   {k: torch.zeros(v, len(cols) + 1, dtype=torch.float64)
                    for k, v in outs.items()}, cols, all_rows, goal)

    def add(self, p: torch.Tensor, ys: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: inputs ``p`` (tokens, n), or the kept inputs alone (tokens, |cols|:
        not with ``all_rows``), and target outputs (tokens, out)."""
        gram, cols = self._gram, self.cols
        n = gram.shape[0] - 1
        pk = _kept(p, cols)
        sums = pk.sum(0).double()
        if self.all_rows:
            gram[:n, :-1] += (p.T @ pk).double()
        else:
            kept = _gram_kept(pk)
            self._kept = kept if self._kept is None else self._kept.add_(kept)
        if p.shape[1] == n:
            gram[:n, -1] += p.sum(0).double()
        else:  # the kept inputs only (producers at the cut width): the removed rows' sums,
            gram[cols, -1] += sums  # read only by a bias compensation, are not known
        gram[n, :-1] += sums
        gram[n, -1] += p.shape[0]
        for k, into in self.cross.items():
            y = ys[k]
            into[:, :-1] += (y.T @ pk).double()
            into[:, -1] += y.sum(0).double()
        if self.goal is not None:
            self.energy += float((ys[self.goal].double() ** 2).sum())

    def errors(self, cands: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Relative squared error of each candidate ``[W' b']`` against the ``goal`` target
        on the summed tokens, from the sums alone: ``tr(A G A^T) - 2 tr(A C^T) + sum y^2``."""
        assert self.goal is not None
        n = self.gram.shape[0] - 1
        g = self.gram[torch.cat([self.cols, torch.tensor([n])])]
        c = self.cross[self.goal]
        den = max(self.energy, 1e-30)
        return {k: max(float(((a @ g) * a).sum() - 2 * (a * c).sum()) + self.energy, 0.0) / den
                for k, a in cands.items()}


def _kept(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The kept columns ``cols`` of inputs ``x`` (..., n); ``x`` itself when it holds them
    alone (..., |cols|: its producers ran at the cut width)."""
    return x if x.shape[-1] == len(cols) else x.index_select(-1, cols)


def _gram_kept(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` in float64 from three products of its column halves (the fourth is the
    transpose of one: the product is symmetric)."""
    h = x.shape[1] // 2
    if h < 64:  # too small to gain
        return (x.T @ x).double()
    a, b = x[:, :h], x[:, h:]
    ab = (a.T @ b).double()
    return torch.cat([torch.cat([(a.T @ a).double(), ab], dim=1),
                      torch.cat([ab.T, (b.T @ b).double()], dim=1)])


def moments(xp: list[torch.Tensor], ys: Mapping[str, list[torch.Tensor]] | None,
            cols: torch.Tensor, all_rows: bool = True
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Second moments of the pruned-stream inputs ``xp`` and the target outputs ``ys``
    against the kept inputs ``[x[cols]; 1]`` (per batch, (tokens, n) and (tokens, out)
    each), summed batch by batch (`Moments`). Sums, not means: add the moments of more
    batches to them.

    Returns:
        ``gram`` and ``cross`` of `Moments`.
    """
    acc = Moments.empty(xp[0].shape[1], cols, {k: v[0].shape[1] for k, v in (ys or {}).items()},
                        all_rows)
    for b, p in enumerate(xp):
        acc.add(p, {k: v[b] for k, v in (ys or {}).items()})
    return acc.gram, acc.cross


class Judge:
    """Held-out errors of candidate refits (`refits`), summed batch by batch: relative
    squared error of each candidate's output on pruned-stream inputs against the target
    outputs."""

    def __init__(self, cands: dict[str, torch.Tensor], kept: np.ndarray) -> None:
        self.cands, self.kept = cands, torch.as_tensor(kept)
        self.names = list(cands)
        self.stacked = torch.cat([cands[k].float() for k in self.names])  # one product for all
        self.num = torch.zeros(len(self.names), dtype=torch.float64)
        self.den = 0.0
        self.tokens = 0

    def add(self, p: torch.Tensor, target: torch.Tensor) -> None:
        """One batch: inputs ``p`` (tokens, n), target outputs (tokens, out)."""
        if not p.shape[0]:  # a batch of padding only: no token to judge on
            return
        self.den += float((target ** 2).sum())
        outs = (_aug(_kept(p, self.kept)) @ self.stacked.T).reshape(p.shape[0], len(self.names), -1)
        self.num += ((outs - target.unsqueeze(1)) ** 2).sum(dim=(0, 2)).double()
        self.tokens += p.shape[0]

    def errors(self) -> dict[str, float]:
        return {k: float(v) / max(self.den, 1e-30)
                for k, v in zip(self.names, self.num, strict=True)}


def heldout_errors(cands: dict[str, torch.Tensor], xp: list[torch.Tensor],
                   goal: list[torch.Tensor], kept: np.ndarray) -> dict[str, float]:
    """Relative squared error of each candidate's output on inputs ``xp`` (pruned stream)
    against the target outputs ``goal`` (per batch, (tokens, out) each; `Judge`)."""
    judge = Judge(cands, kept)
    for p, target in zip(xp, goal, strict=True):
        judge.add(p, target)
    return judge.errors()


@contextlib.contextmanager
def _replaced(model: nn.Module, rec: Reconstruction, start: int = 0) -> Iterator[None]:
    """Every consumer fit so far (from ``rec.fits[start]`` on) reads only its kept inputs,
    with its chosen weights."""
    handles = []
    for f in rec.fits[start:]:
        module = model.get_submodule(f.module)
        handles.append(module.register_forward_hook(_reader(module, f, rec)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _chosen(module: nn.Module, f: Fit, rec: Reconstruction
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kept input indices, weight (out, in) and bias of ``f``'s choice (the plain cut's, or
    a refit)."""
    form = affine(module)
    assert form is not None  # `inside_blocks` keeps these only
    kept = torch.as_tensor(f.kept)
    weight = rec.tensors.get(f"{f.module}.weight")
    bias = rec.tensors.get(f"{f.module}.bias")
    if weight is None:  # the plain cut
        weight, bias = form.weight[:, kept], form.bias
    else:
        weight = form.oriented(weight)
    return kept, weight, bias


def _refit_output(model: nn.Module, f: Fit, rec: Reconstruction, x: torch.Tensor
                  ) -> torch.Tensor:
    """``f``'s chosen layer on its kept inputs ``x`` (what `_reader` computes)."""
    _kept, w, b = _chosen(model.get_submodule(f.module), f, rec)
    return nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _reader(module: nn.Module, f: Fit, rec: Reconstruction) -> Callable[..., torch.Tensor]:
    """A forward hook: ``module``'s output from its kept inputs, with its chosen weights."""
    kept, w, b = _chosen(module, f, rec)

    def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> torch.Tensor:
        x = args[0]
        return nn.functional.linear(x.index_select(-1, kept.to(x.device)), w.to(x.dtype),
                                    None if b is None else b.to(x.dtype))
    return hook
