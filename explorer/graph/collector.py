"""The cyclic garbage collector paused over bursts of short-lived model copies.

A pre-flight deep-copies the model onto meta, cuts the copy and traces it; a config update
builds the architecture on meta a dozen times. Each copy or build is thousands of containers
(modules and their dicts) that live for the length of one check or build and are then freed
by reference counting. Collections running meanwhile walk them and promote them to the older
generations, which soon makes a collection a full one, over every object of the process
(about 0.3 to 0.9 s beside a 7B-shape session, in about every other Accept). Paused, they are
never promoted; the collector runs as usual on what outlives the pause. The coupling of a
large model makes hundreds of thousands of small objects and no cycles; collections scanning
them were a quarter of its time on the 70B shape.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused"]


@contextmanager
def paused() -> Iterator[None]:
    """Run the body with the cyclic collector off; on again afterwards if it was on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
