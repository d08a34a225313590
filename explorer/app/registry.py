"""The live sessions of one app server, within a memory budget.

Streamlit gives every browser tab its own session state, so two tabs on the same session id
(``?sid=``) would each hold a copy of the model. The registry holds one `Session` per id for
the whole process instead: a second tab, a refresh or a page link finds the same object.
When the sessions together hold more than the budget, the least recently used ones are
dropped; their decisions are on disk (`explorer.app.store`), so opening them again replays
the log.

Memory is read from ``/proc/meminfo`` where there is one (Linux), without any dependency;
elsewhere no budget applies and `memory_short` says nothing.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn

from .allocator import trim_heap

T = TypeVar("T")

MEMINFO = Path("/proc/meminfo")
# what the sessions of one server may hold together when no budget is given: this share of
# the memory available when the registry is made (the rest: the pristine models, Streamlit,
# the transient copies of a pre-flight or an export)
DEFAULT_SHARE = 0.5


def available_bytes(meminfo: Path | None = None) -> int | None:
    """Memory the kernel says a new allocation can get without swapping (``MemAvailable``
    of ``meminfo``, default `MEMINFO`), or None where that is not known."""
    try:
        for line in (meminfo or MEMINFO).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_short(need: int, what: str, meminfo: Path | None = None) -> str | None:
    """One line saying why ``need`` bytes for ``what`` will not fit in memory now, or None
    when they fit (or the free memory is not known)."""
    free = available_bytes(meminfo)
    if free is None or need <= free:
        return None
    return (f"not enough memory for {what}: it needs about {_gb(need)} and {_gb(free)} is "
            f"free; close other sessions or tabs, load the model on meta (shapes only), or "
            f"restart the server with more memory")


def tensor_bytes(modules: Iterable[nn.Module | None], shared: Iterable[nn.Module] = ()) -> int:
    """Bytes of the distinct tensor storages of ``modules`` (parameters and buffers) that
    none of ``shared`` holds: what these modules cost beyond models kept anyway."""
    seen = {key for m in shared for key in _storages(m)}
    total = 0
    for m in modules:
        if m is None:
            continue
        for key, size in _storages(m).items():
            if key not in seen:
                seen.add(key)
                total += size
    return total


def _storages(module: nn.Module) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        out[(t.device.type, storage.data_ptr())] = storage.nbytes()
    return out


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@dataclass
class _Entry(Generic[T]):
    item: T
    size: int  # bytes, as `size_of` said when it was last put or touched


class Registry(Generic[T]):
    """Live items (sessions) by id, most recently used last, within ``budget`` bytes.

    Args:
        size_of: the bytes an item holds (see `tensor_bytes`).
        budget: bytes all items may hold together; None: `DEFAULT_SHARE` of the memory
            available now (no limit where that is not known).
    """

    def __init__(self, size_of: Callable[[T], int], budget: int | None = None) -> None:
        free = available_bytes()
        self.size_of = size_of
        self.budget = budget if budget is not None else (
            None if free is None else int(free * DEFAULT_SHARE))
        self._items: OrderedDict[str, _Entry[T]] = OrderedDict()
        self._lock = threading.Lock()  # Streamlit runs each browser tab in its own thread

    def get(self, key: str) -> T | None:
        """The live item ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry.item

    def put(self, key: str, item: T) -> list[str]:
        """Keep ``item`` as ``key`` (replacing what was there); returns the ids dropped to
        stay within the budget, least recently used first (never ``key`` itself)."""
        size = self.size_of(item)
        with self._lock:
            self._items[key] = _Entry(item, size)
            self._items.move_to_end(key)
            return self._fit(keep=key)

    def touch(self, key: str) -> list[str]:
        """Measure ``key``'s item again (its model grew or shrank) and drop others to fit."""
        with self._lock:
            entry = self._items.get(key)
        if entry is None:
            return []
        size = self.size_of(entry.item)
        with self._lock:
            if self._items.get(key) is entry:
                entry.size = size
                self._items.move_to_end(key)
            return self._fit(keep=key)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def held(self) -> int:
        """Bytes the live items hold together."""
        with self._lock:
            return sum(e.size for e in self._items.values())

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _fit(self, keep: str) -> list[str]:
        dropped: list[str] = []
        if self.budget is None:
            return dropped
        total = sum(e.size for e in self._items.values())
        for key in list(self._items):
            if total <= self.budget:
                break
            if key == keep:
                continue
            total -= self._items.pop(key).size
            dropped.append(key)
        if dropped:
            _release_memory()
        return dropped


def _release_memory() -> None:
    """Give the memory of dropped sessions back now (a model is a web of cycles)."""
    import gc

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Registry", "available_bytes", "memory_short", "tensor_bytes"]
