"""Example inputs: parsing and checking input shapes, resizing inputs, seeding the build."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ...quality.task import ModelKind
from ._types import Built, SpecError

MAX_INPUT_ELEMENTS = 2**27  # 512 MiB of float32: far above one example, far below a crash


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` or ``"1x3x224x224"`` into a tuple of positive ints.

    Raises:
        SpecError: if the text is empty or holds anything but positive integers.
    """
    cleaned = text.strip().strip("()[]").lower().replace("x", ",")
    parts = [p.strip() for p in cleaned.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # allow a trailing comma, as in "(1, 16,)"
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise SpecError(
            f"input shape {text!r} is not a list of positive integers; "
            "write it like '1,3,224,224' or '1x3x224x224'"
        )
    return check_input_shape(dims) or dims


def check_input_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """``shape`` as a tuple (None stays None).

    Raises:
        SpecError: if it is empty or holds anything but positive ints.
    """
    if shape is None:
        return None
    dims = tuple(shape)
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise SpecError(f"input_shape {shape!r} must be a non-empty sequence of positive ints")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise SpecError(
            f"input shape {dims} has {math.prod(dims):,} elements, more than the "
            f"{MAX_INPUT_ELEMENTS:,} an example input may have; one example is enough "
            "(batch 1, e.g. 1,3,224,224)"
        )
    return dims


def resized_inputs(
    inputs: tuple[Any, ...], shape: tuple[int, ...], built: Built, spec: str
) -> tuple[Any, ...]:
    """Replace the first example input with one of ``shape``, keeping its dtype.

    Raises:
        SpecError: if there is no tensor to replace or ``shape`` does not fit the model's kind.
    """
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise SpecError(f"{spec!r} has no tensor example input for input_shape {shape} to replace")
    first = inputs[0]
    if built.kind is ModelKind.VISION and len(shape) != 4:
        raise SpecError(
            f"input_shape {shape} for {spec!r} must be a full image shape (batch, channels, "
            "height, width), e.g. (1, 3, 224, 224)"
        )
    if first.is_floating_point():
        new = torch.randn(shape, dtype=first.dtype)
    else:
        if built.kind in (ModelKind.LM, ModelKind.ENCODER) and len(shape) != 2:
            raise SpecError(
                f"input_shape {shape} for {spec!r} must be (batch, seq_len), e.g. (1, 32)"
            )
        high = built.vocab_size or (int(first.max()) + 1 if first.device.type != "meta" else 1)
        new = torch.randint(0, max(high, 1), shape, dtype=first.dtype)
    return (new, *inputs[1:])


@contextmanager
def seeded(device: str) -> Iterator[None]:
    """Seed with 0 for reproducible random weights, restoring the caller's RNG state after."""
    dev = torch.device(device)
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        yield
