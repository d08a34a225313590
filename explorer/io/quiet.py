"""No transformers progress bars or load reports while we load or save a model for the caller.

``from_pretrained`` draws a "Loading weights" bar and ``save_pretrained`` a "Writing model
shards" bar on stderr, and a load logs a "LOAD REPORT" table of missing, unexpected or
mismatched keys (our loaders turn those into notes or one error line). The library, the CLI
and the app load and save models as a step of their own work, so they silence the bars and
the log below errors for that step only: `quiet_transformers` turns them off and back on
after, leaving the caller's settings as they were. Nested or concurrent uses (Streamlit
sessions are threads) share one switch: the first turns them off, the last puts the
settings back.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_transformers"]

_LOCK = threading.Lock()
_users = 0  # bodies running inside `quiet_transformers`
_restore: tuple[bool, bool] | None = None  # (transformers bars were on, hub bars were off)
_verbosity: int | None = None  # transformers' log level before the first user silenced it


def _silence() -> None:
    global _users, _restore, _verbosity
    with _LOCK:
        _users += 1
        if _users > 1:
            return
        try:
            from huggingface_hub.utils import (  # type: ignore[attr-defined]  # not re-exported
                are_progress_bars_disabled,
            )
            from transformers.utils import logging as hf_logging
        except ImportError:
            _restore = None
            return
        _verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped there
        on = hf_logging.is_progress_bar_enabled()
        _restore = (on, are_progress_bars_disabled())
        if on:
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped there


def _put_back() -> None:
    global _users, _restore, _verbosity
    with _LOCK:
        _users -= 1
        if _users or _restore is None:
            return
        from transformers.utils import logging as hf_logging
        if _verbosity is not None:
            hf_logging.set_verbosity(_verbosity)
            _verbosity = None
        was_on, hub_was_off = _restore
        _restore = None
        if not was_on:
            return
        from huggingface_hub.utils import (  # type: ignore[attr-defined]  # not re-exported
            disable_progress_bars,
        )
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # also the hub's
        if hub_was_off:
            disable_progress_bars()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block transformers draws no progress bars and logs only errors; the
    caller's settings after.

    Example:
        >>> with quiet_transformers():
        ...     model = AutoModelForCausalLM.from_pretrained(folder)
    """
    _silence()
    try:
        yield
    finally:
        _put_back()
