"""The unpruned model's hidden states between its repeated blocks, kept from a pass that runs
anyway, so the reconstruction does not run the original blocks a second time.

A one-shot prune with ``--compensate lstsq`` runs the calibration data through the unpruned
model twice: the scoring pass (`explorer.prune.importance.Activation`: every layer's input
norms) and the reconstruction's original stream (`explorer.prune.reconstruct`: the targets
the refits aim for are the original blocks' outputs, block by block). Both compute the same
hidden states when they run the same batches. `Trajectory.recording` keeps each block's
output of every batch of the scoring pass on disk (appended to one file per block, so memory
holds one batch at a time); the reconstruction reads them back (`hidden`) in place of running
the block, when the model is still the one recorded (every parameter and buffer the same
tensor, unmodified) and the batches are the same (`matches`). Anything else (another
criterion's pass, a cut since, other batches) and the reconstruction runs the original
blocks as before: a trajectory only ever saves work, it never changes a result.

Disk: every block's output of every batch (SmolLM2-135M, the benchmark's 64 samples of up to
128 tokens: 5,696 tokens a block in length-sorted batches x 576 channels x 4 bytes x 30
blocks, 394 MB); the recording stops, and is dropped, when it would use more than half of
the free disk. The files are removed on `close` (or when the trajectory is garbage
collected).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .calibration import Calibration
from .sequential import SequentialError, _hidden_out, decoder_layers


@dataclass(frozen=True)
class _Entry:
    offset: int  # bytes into the block's file
    shape: tuple[int, ...]
    dtype: torch.dtype


class Trajectory:
    """The outputs of ``model``'s repeated blocks for every batch of one recorded pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._dir = Path(tempfile.mkdtemp(prefix="pe-trajectory-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._entries: list[list[_Entry]] = []
        self._batches: list[tuple[Any, ...]] = []
        self._state: list[tuple[weakref.ref[torch.Tensor], int]] = []
        self.complete = False

    def close(self) -> None:
        """Remove the files (the trajectory reads nothing after)."""
        self.complete = False
        self._entries = []
        self._cleanup()

    @contextlib.contextmanager
    def recording(self, calib: Calibration) -> Iterator[None]:
        """Keep every block's output while the model runs the batches of ``calib`` once each,
        in order (a forward given other inputs, or a block run out of turn, drops the
        recording: `complete` stays False)."""
        try:
            _prefix, layers = decoder_layers(self.model)
        except SequentialError:
            yield
            return
        self._entries = [[] for _ in layers]
        self._batches = list(calib.batches)
        budget = shutil.disk_usage(self._dir).free // 2
        seen: list[int] = []  # batches begun (the model's forward was called with them)
        broken: list[str] = []

        def started(_m: nn.Module, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
            k = len(seen)
            if k >= len(self._batches) or not _same(args, self._batches[k]):
                broken.append("a forward on other inputs")
            seen.append(k)

        first: list[tuple[tuple[Any, ...], dict[str, Any]]] = []  # block 0's inputs, this batch

        def given(i: int) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                # the refit runs every block on block 0's other inputs (its mask, positions);
                # a block given others (a per-layer sliding-window mask) is not read from here
                if i == 0:
                    first[:] = [(args[1:], kwargs)]
                elif not first or not _same(args[1:], first[0][0]) or \
                        kwargs.keys() != first[0][1].keys() or \
                        not _same([kwargs[k] for k in sorted(kwargs)],
                                  [first[0][1][k] for k in sorted(kwargs)]):
                    broken.append(f"block {i} is given other inputs than block 0")
            return hook

        def keep(i: int) -> Any:
            def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
                nonlocal budget
                if broken:
                    return
                if len(self._entries[i]) != len(seen) - 1:
                    broken.append(f"block {i} ran out of turn")
                    return
                hidden = _hidden_out(output).detach().cpu().contiguous()
                raw = hidden.reshape(-1).view(torch.uint8).numpy()
                budget -= raw.nbytes
                if budget < 0:
                    broken.append("the disk budget")
                    return
                path = self._dir / f"{i}.bin"
                try:
                    with path.open("ab") as f:
                        offset = f.tell()
                        raw.tofile(f)
                except OSError as e:  # a full disk: the refit runs the blocks instead
                    broken.append(f"writing {path}: {e}")
                    return
                self._entries[i].append(_Entry(offset, tuple(hidden.shape), hidden.dtype))
            return hook

        handles = [self.model.register_forward_pre_hook(started, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(given(i), with_kwargs=True)
                    for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.complete = not broken and len(seen) == len(self._batches) and all(
            len(e) == len(self._batches) for e in self._entries)
        if self.complete:
            self._state = _state(self.model)
        else:
            self.close()

    def matches(self, model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> bool:
        """Whether the recording holds ``model``'s block outputs for ``batches``: the same
        model, every parameter and buffer the tensor recorded and unchanged since, and
        batches equal to the recorded ones."""
        if not self.complete or model is not self.model or len(batches) != len(self._batches):
            return False
        now = _state(model)
        if len(now) != len(self._state) or any(
                a() is not b() or va != vb for (a, va), (b, vb) in zip(now, self._state,
                                                                       strict=True)):
            return False
        return all(_same(a, b) for a, b in zip(batches, self._batches, strict=True))

    def hidden(self, block: int, batch: int) -> torch.Tensor:
        """Block ``block``'s output for batch ``batch`` of the recorded pass."""
        e = self._entries[block][batch]
        count = int(np.prod(e.shape)) * torch.empty((), dtype=e.dtype).element_size()
        raw = np.fromfile(self._dir / f"{block}.bin", dtype=np.uint8, count=count,
                          offset=e.offset)
        return torch.from_numpy(raw).view(e.dtype).reshape(e.shape)


def _state(model: nn.Module) -> list[tuple[weakref.ref[torch.Tensor], int]]:
    """Every parameter and buffer with its in-place version counter."""
    return [(weakref.ref(t), t._version)
            for t in [*model.parameters(), *model.buffers()]]


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Two batches (or a block's other inputs) with equal entries: tensors equal in shape
    and value, tuples and lists entry by entry, other objects identical or equal."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is y:
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            if not _same(x, y):
                return False
        else:
            try:
                if not bool(x == y):
                    return False
            except Exception:  # noqa: BLE001 - objects without a plain equality differ
                return False
    return True


__all__ = ["Trajectory"]
