"""Calling an artifact's signatures: the client side of the contract in ``training.artifact``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import tensorflow as tf

from training import artifact
from training.draws import Samples, Segment, calibrated_predictive, continued, joined

__all__ = ["Samples", "Segment", "calibrated_predictive", "infer", "infer_variance", "joined", "mc_draws"]
__all__ += ["segment_draws"]


def infer(
    signature, inputs: np.ndarray, input_key: str = artifact.INPUTS_KEY, output_key: str = artifact.OUTPUTS_KEY
) -> np.ndarray:
    """Inference-mode outputs ``[N, ...]`` from a ``serving_default`` signature."""
    return signature(**{input_key: tf.constant(inputs, tf.float32)})[output_key].numpy()


def infer_variance(signature, inputs: np.ndarray) -> np.ndarray | None:
    """A heteroscedastic ``serving_default``'s predicted variance ``[N, ...]``; None if it has none."""
    if artifact.VARIANCE_KEY not in signature.structured_outputs:
        return None
    return signature(**{artifact.INPUTS_KEY: tf.constant(inputs, tf.float32)})[artifact.VARIANCE_KEY].numpy()


def _call(signature, tensors: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """``signature(**tensors)`` without binding the keywords (~0.1 ms of Python a call, a lone MC request's
    latency): the tensors flat, in the order of the signature's parameters."""
    flat = [tensors[name] for name in signature.function_type.parameters]
    return signature._call_flat(flat, signature.captured_inputs)


def mc_draws(signature, inputs: np.ndarray, samples: int, seed: int) -> Samples:
    """``samples`` MC-dropout draws from an ``mc_dropout`` signature, in one call (with variances and
    the calibrated predictive if any)."""
    outputs = _call(
        signature,
        {
            artifact.INPUTS_KEY: tf.constant(inputs, tf.float32),
            artifact.SAMPLES_KEY: tf.constant(samples, tf.int32),
            artifact.SEED_KEY: tf.constant(seed, tf.int64),
        },
    )
    variance, predictive = outputs.get(artifact.VARIANCE_KEY), outputs.get(artifact.PREDICTIVE_KEY)
    return Samples(
        outputs[artifact.OUTPUTS_KEY].numpy(),
        None if variance is None else variance.numpy(),
        None if predictive is None else predictive.numpy(),
    )


@lru_cache(maxsize=1024)
def _int32s(values: tuple[int, ...]) -> tf.Tensor:
    """A constant of a call's per-segment numbers, kept: the first samples and counts of a busy server's calls repeat
    (every job of a fixed-T stream is from sample 0, T = 100), and ``tf.constant`` holds the GIL ~10 µs."""
    return tf.constant(values, tf.int32)


@lru_cache(maxsize=1024)
def _segment_of_rows(sizes: tuple[int, ...]) -> tf.Tensor:
    """Each input row's segment index for segments of ``sizes`` rows, kept as ``_int32s``."""
    return tf.constant(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))


def segment_draws(signature, segments: Sequence[Segment]) -> list[Samples]:
    """Each segment's draws from one ``mc_dropout_segments`` call, in order: ``outputs [samples, N_r, ...]``
    (and ``variance``), bit-identical to what ``mc_dropout`` gives the segment's rows with its seed.

    Every array is the segment's own contiguous copy, so what a caller computes from it cannot depend
    on the segments it shared the call with. No ``predictive``: see ``calibrated_predictive``.
    """
    sizes = tuple(len(segment.inputs) for segment in segments)
    inputs = segments[0].inputs if len(segments) == 1 else np.concatenate([s.inputs for s in segments])
    outputs = _call(
        signature,
        {
            artifact.INPUTS_KEY: tf.constant(inputs, tf.float32),
            artifact.SEGMENTS_KEY: _segment_of_rows(sizes),
            artifact.SEEDS_KEY: tf.constant([s.seed for s in segments], tf.int64),
            artifact.FIRST_KEY: _int32s(tuple(s.first for s in segments)),
            artifact.SAMPLES_KEY: _int32s(tuple(s.samples for s in segments)),
        },
    )
    draws = outputs[artifact.OUTPUTS_KEY].numpy()
    variance = outputs[artifact.VARIANCE_KEY].numpy() if artifact.VARIANCE_KEY in outputs else None
    bounds = np.cumsum([0, *sizes])
    return [
        continued(
            segment,
            Samples(
                np.ascontiguousarray(draws[: segment.samples, start:stop]),
                None if variance is None else np.ascontiguousarray(variance[: segment.samples, start:stop]),
            ),
        )
        for segment, start, stop in zip(segments, bounds[:-1], bounds[1:], strict=True)
    ]
