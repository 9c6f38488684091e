"""Keeping CPython's garbage collector off the request path.

A loaded TensorFlow model is hundreds of thousands of Python objects. Under load the objects of
requests in flight keep reaching the oldest generation, so every few seconds CPython runs a full
collection that walks all of those model objects, holding the GIL for ~200 ms: every request in
flight waits (``bench/serving.py`` showed p99 ≈ 200 ms at 32 connections, in bursts 3 s apart).
So after the set of loaded models changes, the registry runs one full collection and freezes what
survives (``gc.freeze``): the models are not scanned again, and collections see only what requests
create. Everything is unfrozen first, so a retired model's reference cycles are freed too.

What requests create is mostly freed by reference counting as soon as they end, but CPython still
starts a young-generation collection every 700 net allocations, i.e. every few requests, each
one walking the objects of every request in flight. ``relax_young_collections`` raises that
threshold, so the same walk happens a tenth as often (a few percent of the event loop's time
under load); the young generation then holds a few thousand more objects, under a megabyte.
"""

from __future__ import annotations

import gc
import time


def freeze_survivors() -> float:
    """Collect everything, then exempt what is left from later collections; returns the seconds taken."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


YOUNG_THRESHOLD = 7_000
"""Net allocations between young-generation collections (CPython's default: 700)."""


def relax_young_collections() -> None:
    """Collect the young generation every ``YOUNG_THRESHOLD`` allocations; older generations unchanged."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
