"""Checks of user-given names before anything runs (a typo must not prune the wrong layer)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import nn

__all__ = ["check_module_names"]


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
