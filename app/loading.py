"""One loaded model version: a SavedModel read through the artifact contract and warmed up.

Only ``tf.saved_model.load`` is used, never Keras: any SavedModel whose ``serving_default``
takes one float32 tensor serves; ``mc_dropout`` is used when the artifact has it, and
``mc_dropout_segments`` (MC requests batched together) when it has that too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from app.runner import Runner, Runtime
from app.settings import Settings
from training import artifact, signatures


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    path: Path
    task: artifact.Task | None
    """None for a SavedModel without metadata: outputs are returned as they are."""
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    metadata: artifact.ModelMetadata | None
    serving: tf.types.experimental.ConcreteFunction
    mc_dropout: tf.types.experimental.ConcreteFunction | None
    input_key: str
    output_key: str
    saved_model: object = field(repr=False)
    """The loaded SavedModel; the signatures' variables live as long as it does."""
    runner: Runner = field(repr=False)
    """How this version runs off the event loop (``app.runner``), given by the runtime that loaded it."""

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Inference-mode outputs of a float32 batch ``[N, *input_shape]``, by the signature's flat entry.

        A call by keyword (``signatures.infer``) binds the arguments and checks them against the
        signature in Python on every call, holding the GIL for about a fifth of a small batch's
        cost. The loader has checked that ``serving`` takes one float32 ``[batch, ...]`` tensor and
        every door hands it such a batch, so the call goes straight to the concrete function
        (TensorFlow's ``_call_flat``, stable within the pinned 2.21; ``tests/test_batching.py``
        checks that it answers exactly as the keyword call does).
        """
        return _call_serving(self.serving, self.output_key, inputs)

    def sample(self, inputs: np.ndarray, samples: int, seed: int) -> signatures.Samples:
        """``outputs [T, N, ...]``, and ``variance`` (same shape) for a heteroscedastic model, else None."""
        return signatures.mc_draws(self.mc_dropout, inputs, samples, seed)

    @property
    def tau(self) -> float | None:
        return self.metadata.tau if self.metadata else None

    @property
    def predictive_temperature(self) -> float | None:
        """The calibrated classifier's temperature of the MC predictive (None: not calibrated)."""
        return self.metadata.predictive_temperature if self.metadata else None

    @property
    def class_labels(self) -> list[str] | None:
        if self.metadata and self.metadata.class_labels:
            return self.metadata.class_labels
        if self.task == "classification":
            return [str(i) for i in range(self.output_shape[-1])]
        return None


@cache
def signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """A version's SignatureDefs as TF Serving lists them (without internal ``__`` ones), read from its
    ``saved_model.pb`` once: the metadata both TF Serving doors (REST and gRPC) answer."""
    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    return {key: defs[key] for key in defs if not key.startswith("__")}


def _call_serving(serving: tf.types.experimental.ConcreteFunction, output_key: str, inputs: np.ndarray) -> np.ndarray:
    outputs = serving._call_flat([tf.constant(inputs, tf.float32)], serving.captured_inputs)
    return outputs[output_key].numpy()


def _draw_segments(mc, segments, stretches: list[signatures.Segment]) -> list[signatures.Samples]:
    """One call for several requests' stretches. A lone stretch from sample 0 goes to ``mc_dropout``, which
    tiles the batch without gathers and draws the same bits (``tests/test_mc_segments.py``)."""
    if len(stretches) == 1 and stretches[0].first == 0:
        alone = stretches[0]
        outputs, variance, _ = signatures.mc_draws(mc, alone.inputs, alone.samples, alone.seed)
        return [signatures.Samples(outputs, variance)]
    return signatures.segment_draws(segments, stretches)


def load_version(name: str, path: Path, runtime: Runtime | None = None) -> ServedModel:
    """Load one version folder and run each signature once, so the first request is not slow.

    ``runtime`` gives the version its runner (a server's pools); without one, asyncio's default pool.

    Raises ValueError (or TensorFlow's error) with a message that says what is wrong.
    """
    loaded = tf.saved_model.load(str(path))
    if artifact.SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"{path} has no {artifact.SERVING_SIGNATURE!r} signature")
    serving = loaded.signatures[artifact.SERVING_SIGNATURE]
    inputs = serving.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{path}: serving_default takes {len(inputs)} inputs; only one is supported")
    input_key, spec = next(iter(inputs.items()))
    outputs = serving.structured_outputs
    output_key = artifact.OUTPUTS_KEY if artifact.OUTPUTS_KEY in outputs else next(iter(outputs))
    if spec.shape.rank is None or not spec.shape[1:].is_fully_defined() or spec.dtype != tf.float32:
        raise ValueError(f"{path}: input must be float32 [batch, fixed dims...], got {spec}")
    metadata = artifact.read_metadata(path)
    mc = loaded.signatures.get(artifact.MC_SIGNATURE)
    segments = loaded.signatures.get(artifact.MC_SEGMENTS_SIGNATURE)
    version, task = int(path.name), metadata.task if metadata else None
    runtime = runtime or Runtime(Settings(), pooled=False)
    draw_segments = None if mc is None or segments is None else partial(_draw_segments, mc, segments)
    runner = runtime.runner(
        name,
        version,
        task,
        partial(_call_serving, serving, output_key),
        partial(signatures.mc_draws, mc),
        draw_segments,
    )
    model = ServedModel(
        name=name,
        version=version,
        path=path,
        task=task,
        input_shape=tuple(spec.shape[1:].as_list()),
        output_shape=tuple(outputs[output_key].shape[1:].as_list()),
        metadata=metadata,
        serving=serving,
        mc_dropout=mc,
        input_key=input_key,
        output_key=output_key,
        saved_model=loaded,
        runner=runner,
    )
    warm = np.zeros((1, *model.input_shape), np.float32)
    model.predict(warm)
    if mc is not None:
        model.sample(warm, 2, 0)
    if draw_segments is not None:
        draw_segments([signatures.Segment(warm, 0, 0, 2), signatures.Segment(warm, 1, 2, 1)])
    return model
