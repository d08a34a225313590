"""Checks of what a user gives before anything runs: module names (a typo must not prune the
wrong layer) and weights (NaN/Inf values make every score and cut meaningless)."""
from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["check_module_names", "nonfinite_text", "nonfinite_weights"]


def check_module_names(model: nn.Module, names: Iterable[str], what: str) -> None:
    """Raise if a name is not a module of ``model``, with the closest module names.

    Args:
        model: the model the names refer to.
        names: dotted module names (``"layer1.0.conv1"``), e.g. modules to leave unpruned.
        what: what the names are for, for the message (``"ignored"``).

    Raises:
        ValueError: one line naming the first unknown name and up to three close names.
    """
    known = [n for n, _m in model.named_modules() if n]
    have = set(known)
    for name in names:
        if name not in have:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; modules include {', '.join(known[:3])} ..."
            raise ValueError(f"{what} module '{name}' is not in the model{hint}")


def nonfinite_weights(model: nn.Module) -> dict[str, int]:
    """Parameter or buffer name -> how many NaN/Inf values it holds (only those with any;
    tensors on ``meta`` have no values and are skipped)."""
    found: dict[str, int] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device.type == "meta" or not tensor.is_floating_point():
            continue
        t = tensor.detach()
        if not t.numel():
            continue
        low, high = torch.aminmax(t)  # NaN propagates, Inf is an extreme: no full-size mask
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            continue
        finite = torch.isfinite(t)
        found[name] = int(finite.numel() - int(finite.sum()))
    return found


def nonfinite_text(found: Mapping[str, int]) -> str:
    """``'fc1.weight' holds 3 NaN/Inf values (and 2 more tensors, 7 in all)``."""
    (first, count), rest = next(iter(found.items())), len(found) - 1
    more = f" (and {rest} more tensor(s), {sum(found.values()):,} in all)" if rest else ""
    return f"'{first}' holds {count:,} NaN/Inf value(s){more}"
