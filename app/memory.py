"""Keeping CPython's garbage collector off the request path.

A loaded TensorFlow model is hundreds of thousands of Python objects. Under load the objects of
requests in flight keep reaching the oldest generation, so every few seconds CPython runs a full
collection that walks all of those model objects, holding the GIL for ~200 ms: every request in
flight waits (``bench/serving.py`` showed p99 ≈ 200 ms at 32 connections, in bursts 3 s apart).
So after the set of loaded models changes, the registry runs one full collection and freezes what
survives (``gc.freeze``): the models are not scanned again, and collections see only what requests
create. Everything is unfrozen first, so a retired model's reference cycles are freed too.
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
