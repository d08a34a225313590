"""Memory a process frees goes back to the system, so its peak follows what it holds.

glibc's ``malloc`` serves a block smaller than its *mmap threshold* from its heap and keeps
it there when freed, for reuse. The threshold starts at 128 KiB and rises to the size of
every larger block freed (up to 32 MiB), so after the first big tensors a forward's
activations, logits and statistics of a few MiB each all come from the heap, and the heap
keeps the high-water mark of every phase as resident memory: on SmolLM2 a calibration pass
of 32 samples held 271 MB more at its peak than before it, 39 MB with the threshold fixed
at 128 KiB (blocks above it are mapped on their own and unmapped when freed). Torch's CPU
allocator has no cache of its own; it calls ``malloc``.

The threshold is a process setting, so the entry points set it (the command line), never
the library: a program embedding ``explorer`` keeps its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable
from typing import cast

MMAP_THRESHOLD = 128 * 1024  # bytes: blocks from this size up are returned when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` (no dynamic rise).

    Returns:
        Whether it was set: False off Linux or with a C library that has no ``mallopt``
        (musl), where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def trim_heap() -> bool:
    """Give heap pages freed since (a forward's activations, a pre-flight's or a cost's
    copies) back to the system; whether it could (glibc's ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed memory in its arenas: without this the server's RSS grows by a few
    hundred MB on a 135 M model that no object holds (measured on SmolLM2: after three
    accepts 215 MB came back, docs/app.md); the app calls it after every page run (`app.py`)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast(Callable[[int], int], libc.malloc_trim)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None
