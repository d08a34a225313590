"""Leave the caller's random state (and train/eval modes) as found when we run their model.

Every forward the library runs on its own (a trace, a pre-flight check, calibration and
evaluation passes, latency runs) may draw from torch's global generators: dropout in train
mode, random ops in a model's code. The caller did not ask for those draws, so they run on a
fork: `kept_rng` saves the CPU generator and the generator of each CUDA device the model or
the inputs live on, and puts them back after, however the body ends. `evaluating` adds eval
mode for the body and puts every submodule's own mode back after: the one way the library
runs a caller's model in eval mode (calibration, evaluation, generation, latency, folds).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .walk import tensor_leaves

__all__ = ["evaluating", "kept_rng"]


def _cuda_devices(where: tuple[Any, ...]) -> list[int]:
    """Indices of the CUDA devices the modules' tensors and the tensors in ``where`` use."""
    found: dict[int, None] = {}
    for item in where:
        if isinstance(item, nn.Module):
            tensors: Iterator[torch.Tensor] = (t for group in (item.parameters(), item.buffers())
                                               for t in group)
        else:
            tensors = (t for _path, t in tensor_leaves(item))
        for t in tensors:
            if t.device.type == "cuda":
                found[t.device.index or 0] = None
    return list(found)


@contextmanager
def kept_rng(*where: Any) -> Iterator[None]:
    """Run the body on a fork of torch's global random state; restore it after.

    Args:
        where: modules and (nested) inputs whose CUDA devices' generators are forked too;
            the CPU generator always is.

    Example:
        >>> with kept_rng(model, inputs):
        ...     model(*inputs)  # dropout draws here leave the caller's state unchanged
    """
    with torch.random.fork_rng(devices=_cuda_devices(where)):
        yield


@contextmanager
def evaluating(*where: Any) -> Iterator[None]:
    """Eval mode for every module in ``where``, on a fork of the random state (`kept_rng`,
    which also reads the inputs in ``where``); every submodule's train/eval flag back after,
    however the body ends.

    Example:
        >>> with evaluating(model, inputs), torch.no_grad():
        ...     model(*inputs)  # no dropout; the caller's modes and random state unchanged
    """
    models = [m for m in where if isinstance(m, nn.Module)]
    modes = [(sub, sub.training) for m in models for sub in m.modules()]
    try:
        for m in models:
            m.eval()
        with kept_rng(*where):
            yield
    finally:
        for sub, training in modes:
            sub.training = training
