"""Memory a process frees goes back to the system, so its peak follows what it holds.

glibc's ``malloc`` serves a block smaller than its *mmap threshold* from its heap and keeps
it there when freed, for reuse. The threshold starts at 128 KiB and rises to the size of
every larger block freed (up to 32 MiB), so after the first big tensors a forward's
activations, logits and statistics of a few MiB each all come from the heap, and the heap
keeps the high-water mark of every phase as resident memory: on SmolLM2 a calibration pass
of 32 samples held 271 MB more at its peak than before it, 39 MB with the threshold fixed
at 128 KiB (blocks above it are mapped on their own and unmapped when freed). Torch's CPU
allocator has no cache of its own; it calls ``malloc``.

The threshold is a process setting, so the entry points set it (the command line:
`return_freed_memory`; the app server: `one_heap`), never the library: a program embedding
``explorer`` keeps its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable
from typing import cast

MMAP_THRESHOLD = 128 * 1024  # bytes: blocks from this size up are returned when freed
# The server's: a fixed 128 KiB threshold made every forward's activations fresh mapped
# pages, and an Accept on SmolLM2 took 35 % more CPU (3.0 -> 4.1 s; 1 MiB: 3.7 s); from
# 8 MiB up (weights, logits, calibration statistics) it costs nothing measurable.
SERVER_MMAP_THRESHOLD = 8 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


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


def one_heap(threshold: int = SERVER_MMAP_THRESHOLD) -> bool:
    """The app server's setting: one malloc arena for every thread, and blocks from
    ``threshold`` up mapped on their own (`return_freed_memory`).

    Streamlit runs each page run in a thread of its own, and glibc gives threads arenas of
    their own (up to 8 per core): a block freed in one run's arena is reused only by threads
    on that arena, so every run could grow a heap of its own. Measured on SmolLM2 (load, 5
    accepts, `benchmarks/app_llm.py`'s flow, process RSS above the server before the load):
    glibc's defaults 1.42-2.10 GB after the accepts (peak 1.80-2.26 GB); one arena and an 8 MiB
    threshold 1.10 GB (peak 1.34 GB), at the same CPU seconds per action.

    Returns:
        Whether both were set (False off Linux or without glibc's ``mallopt``).
    """
    if not return_freed_memory(threshold):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, 1))


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
