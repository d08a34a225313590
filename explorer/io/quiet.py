"""No transformers progress bars or load reports while we load or save a model for the caller.

``from_pretrained`` draws a "Loading weights" bar and ``save_pretrained`` a "Writing model
shards" bar on stderr, and a load logs a "LOAD REPORT" table of missing, unexpected or
mismatched keys (our loaders turn those into notes or one error line). A GGUF load draws
a plain ``tqdm`` bar ("Converting and de-quantizing GGUF tensors") that no transformers
switch reaches. The library, the CLI and the app load and save models as a step of their own
work, so they silence the bars and the log below errors for that step only:
`quiet_transformers` turns them off and back on after, leaving the caller's settings as they
were; a GGUF load (``quiet_transformers(stderr=True)``) also drops what the loading thread
itself writes to ``sys.stderr`` meanwhile (other threads' writes pass). Nested or
concurrent uses (Streamlit sessions are threads) share one switch: the first turns them
off, the last puts the settings back.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["quiet_transformers"]

_LOCK = threading.Lock()
_users = 0  # bodies running inside `quiet_transformers`
_restore: tuple[bool, bool] | None = None  # (transformers bars were on, hub bars were off)
_verbosity: int | None = None  # transformers' log level before the first user silenced it
_inside = threading.local()  # .depth: how many quiet bodies this thread is running


class _Muted:
    """``sys.stderr`` while a body runs: what a thread inside a body writes is dropped, every
    other thread's goes to the stream it replaced (``real``)."""

    def __init__(self, real: TextIO) -> None:
        self.real = real

    def write(self, text: str) -> int:
        return len(text) if getattr(_inside, "depth", 0) else self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the real stream's
        return getattr(self.real, name)


_muted: _Muted | None = None  # installed as sys.stderr by the first user, removed by the last


def _silence(stderr: bool) -> None:
    global _users, _restore, _verbosity, _muted
    _inside.depth = getattr(_inside, "depth", 0) + int(stderr)
    with _LOCK:
        _users += 1
        if _users > 1:
            return
        _muted = _Muted(sys.stderr)
        sys.stderr = _muted  # a stream in all but its type (sys.stderr is typed loosely)
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


def _put_back(stderr: bool) -> None:
    global _users, _restore, _verbosity, _muted
    _inside.depth -= int(stderr)
    with _LOCK:
        _users -= 1
        if _users:
            return
        if _muted is not None and sys.stderr is _muted:  # else another swap came after ours
            sys.stderr = _muted.real
        _muted = None
        if _restore is None:
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
def quiet_transformers(stderr: bool = False) -> Iterator[None]:
    """Inside the block transformers draws no progress bars and logs only errors (with
    ``stderr``, this thread's writes to ``sys.stderr`` are dropped too: for a load that
    draws a bar of its own); the caller's settings after.

    Example:
        >>> with quiet_transformers():
        ...     model = AutoModelForCausalLM.from_pretrained(folder)
    """
    _silence(stderr)
    try:
        yield
    finally:
        _put_back(stderr)
