"""In-process costs behind the HTTP numbers: why the service calls signatures, and MC in one call.

One ``serving_default`` signature call against Keras ``model.predict`` on the same model, and one
``mc_dropout`` call with T = 100 against 100 inference passes in a Python loop, one instance each;
and one ``mc_dropout`` call with T = 1 and T = 10: what a call costs whatever its samples (the
executor's per-op overhead), the part of an MC request that sampling less (``auto``) cannot save.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def best_of(
    fn: Callable[[], object], repeat: int = 7, number: int = 50, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Milliseconds per call by ``clock`` (wall time, or e.g. ``time.process_time``): the best of several timed
    batches (the least disturbed)."""
    fn()
    times = []
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            fn()
        times.append((clock() - start) / number)
    return min(times) * 1000


def measure(version_dir: Path, instance: list[float], rows: list[list[float]]) -> dict[str, float]:
    """Milliseconds per call of each way, for one instance; and the MC compute limit: one call of ``rows``
    (32 instances) x T = 100, with one seed (``mc_dropout``) and as 32 requests of their own seeds
    (``mc_dropout_segments``, what MC batching runs)."""
    import keras
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    serving, mc = loaded.signatures["serving_default"], loaded.signatures["mc_dropout"]
    x = tf.constant([instance], tf.float32)
    keras_model = keras.Sequential(
        [keras.Input((len(instance),)), keras.layers.TFSMLayer(str(version_dir), call_endpoint="serving_default")]
    )
    samples, seed = tf.constant(100), tf.constant(1, tf.int64)
    batch = tf.constant(rows, tf.float32)
    timings = {
        "signature_ms": best_of(lambda: serving(inputs=x)),
        "keras_predict_ms": best_of(lambda: keras_model.predict(x.numpy(), verbose=0), repeat=3, number=10),
        "mc_dropout_t1_ms": best_of(lambda: mc(inputs=x, samples=tf.constant(1), seed=seed)),
        "mc_dropout_t10_ms": best_of(lambda: mc(inputs=x, samples=tf.constant(10), seed=seed)),
        "mc_dropout_t100_ms": best_of(lambda: mc(inputs=x, samples=samples, seed=seed)),
        "loop_100_passes_ms": best_of(lambda: [serving(inputs=x) for _ in range(100)], repeat=3, number=3),
        "mc_dropout_32x100_ms": best_of(lambda: mc(inputs=batch, samples=samples, seed=seed), number=10),
    }
    segments = loaded.signatures.get("mc_dropout_segments")
    if segments is not None:
        count = len(rows)
        each = {
            "segments": tf.range(count),
            "seeds": tf.range(count, dtype=tf.int64),
            "first": tf.zeros([count], tf.int32),
            "samples": tf.fill([count], 100),
        }
        timings["mc_segments_32x100_ms"] = best_of(lambda: segments(inputs=batch, **each), number=10)
    return timings


def report(ms: dict[str, float]) -> str:
    signature, predict = ms["signature_ms"], ms["keras_predict_ms"]
    one_call, loop = ms["mc_dropout_t100_ms"], ms["loop_100_passes_ms"]
    return "\n".join(
        [
            "in-process, one instance (ms per call, best of several batches)",
            f"  serving_default signature       {signature:8.3f}",
            f"  keras model.predict             {predict:8.3f}   {predict / signature:6.1f}x the signature",
            f"  mc_dropout, T=1, one call       {ms['mc_dropout_t1_ms']:8.3f}   what a call costs whatever T",
            f"  mc_dropout, T=10, one call      {ms['mc_dropout_t10_ms']:8.3f}",
            f"  mc_dropout, T=100, one call     {one_call:8.3f}",
            f"  100 inference passes in a loop  {loop:8.3f}   {loop / one_call:6.1f}x the one MC call",
            "MC compute limit, one call of 32 instances x T=100 (ms per call; instances per second)",
            _limit("  mc_dropout, one seed           ", ms["mc_dropout_32x100_ms"]),
            *[_limit("  mc_dropout_segments, 32 seeds  ", ms[k]) for k in ["mc_segments_32x100_ms"] if k in ms],
        ]
    )


def _limit(label: str, milliseconds: float) -> str:
    return f"{label}{milliseconds:8.3f}   {32_000 / milliseconds:8,.0f} instances/s at T=100"
