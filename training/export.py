"""Export any single-input, single-output Keras 3 model as a versioned SavedModel artifact."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import keras
import tensorflow as tf

from training import artifact, conformity
from training.mc_dropout import dropout_layers, mc_dropout_fn, mc_dropout_segments_fn

ACTIVATION_BUDGET = 2**22
"""Most float32 elements one intermediate tensor of an MC forward pass may hold (16 MiB)."""


def _input_spec(model: keras.Model) -> tf.TensorSpec:
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ValueError("export_model needs a built Sequential or functional model (give it an Input)")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"export_model supports one input and one output; this model has {len(inputs)} "
            f"inputs and {len(outputs)} outputs"
        )
    return tf.TensorSpec([None, *inputs[0].shape[1:]], tf.float32, name=artifact.INPUTS_KEY)


def _widest_row(graph: tf.Graph) -> int:
    """Elements per instance of the largest tensor in a traced forward pass."""
    sizes = [
        t.shape[1:].num_elements()
        for op in graph.get_operations()
        for t in op.outputs
        if t.shape.rank and t.shape[0] is None and t.shape[1:].is_fully_defined()
    ]
    return max(sizes, default=1) or 1


def temper(probabilities: tf.Tensor, temperature: float) -> tf.Tensor:
    """``softmax(log p / temperature)``: temperature scaling of probabilities (logits up to a constant).

    Each row's classes are padded to a multiple of 16 before the ``log``: CPU kernels compute
    elementwise ops in vector packets and finish a ragged tail with scalar code that rounds
    differently, so without the padding a row's result would depend on the batch it came in
    (and ``serving_default`` would no longer give an instance the same bits alone as in a batch).
    """
    classes = probabilities.shape[-1]
    pad = [[0, 0]] * (probabilities.shape.rank - 1) + [[0, -classes % 16]]
    padded = tf.pad(probabilities, pad, constant_values=1.0)
    tiny = tf.constant(1e-30, probabilities.dtype)  # log 0 = -inf would give NaN for an all-zero row
    log_p = tf.math.log(tf.maximum(padded, tiny))[..., :classes]
    return tf.nn.softmax(log_p / temperature, axis=-1)


def _mean_over_samples(draws: tf.Tensor) -> tf.Tensor:
    """``mean_t draws[t]`` of ``[T, N, ...]`` as ``[N, ...]``, the same bits for a row alone as in a batch.

    A reduction over the leading axis runs vectorized across the rows, so its rounding depends on
    the batch; reducing the innermost axis (after a transpose) sums each row's T values on their own.
    """
    last = [*range(1, draws.shape.rank), 0]
    return tf.reduce_sum(tf.transpose(draws, last), axis=-1) / tf.cast(tf.shape(draws)[0], draws.dtype)


def _outputs(values: tf.Tensor, likelihood: artifact.Likelihood, temperature: float | None) -> dict[str, tf.Tensor]:
    """A signature's output dict from the model's output tensor (see the contract in ``training.artifact``)."""
    if likelihood == "heteroscedastic":
        mean, variance = tf.split(values, 2, axis=-1)
        return {artifact.OUTPUTS_KEY: mean, artifact.VARIANCE_KEY: variance}
    if temperature is not None:
        values = temper(values, temperature)
    return {artifact.OUTPUTS_KEY: values}


def write_saved_model(
    model: keras.Model,
    path: Path,
    rows_per_pass: int | None = None,
    *,
    likelihood: artifact.Likelihood = "homoscedastic",
    temperature: float | None = None,
    predictive_temperature: float | None = None,
) -> int:
    """Write ``model`` as a SavedModel with the contract's signatures; returns rows per pass.

    ``mc_dropout`` is written only when the model has dropout layers: without them every
    sample would be identical, and a server should say so rather than report zero uncertainty.
    """
    spec = _input_spec(model)

    def serve(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return _outputs(model(inputs, training=False), likelihood, temperature)

    serving = tf.function(serve, input_signature=[spec], autograph=False).get_concrete_function()
    signatures = {artifact.SERVING_SIGNATURE: serving}
    if rows_per_pass is None:
        rows_per_pass = max(1, ACTIVATION_BUDGET // _widest_row(serving.graph))

    if dropout_layers(model):
        sample = mc_dropout_fn(model, rows_per_pass)

        def mc_dropout(inputs: tf.Tensor, samples: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
            draws = sample(inputs, samples, seed)
            outputs = _outputs(draws, likelihood, None)
            if predictive_temperature is not None:
                outputs[artifact.PREDICTIVE_KEY] = temper(_mean_over_samples(draws), predictive_temperature)
            return outputs

        mc_spec = [
            spec,
            tf.TensorSpec([], tf.int32, name=artifact.SAMPLES_KEY),
            tf.TensorSpec([], tf.int64, name=artifact.SEED_KEY),
        ]
        mc = tf.function(mc_dropout, input_signature=mc_spec, autograph=False)
        signatures[artifact.MC_SIGNATURE] = mc.get_concrete_function()
        signatures[artifact.MC_SEGMENTS_SIGNATURE] = _segments_signature(model, spec, rows_per_pass, likelihood)

    holder = tf.Module()
    holder.model = model
    tf.saved_model.save(holder, str(path), signatures=signatures)
    return rows_per_pass


def _segments_signature(
    model: keras.Model, spec: tf.TensorSpec, rows_per_pass: int, likelihood: artifact.Likelihood
) -> tf.types.experimental.ConcreteFunction:
    """``mc_dropout_segments``: the raw draws of several requests' segments in one call (no ``predictive``:
    a request's calibrated predictive is over all its samples, which may come from several calls)."""
    sample = mc_dropout_segments_fn(model, rows_per_pass)

    def mc_dropout_segments(inputs, segments, seeds, first, samples) -> dict[str, tf.Tensor]:
        return _outputs(sample(inputs, segments, seeds, first, samples), likelihood, None)

    segments_spec = [
        spec,
        tf.TensorSpec([None], tf.int32, name=artifact.SEGMENTS_KEY),
        tf.TensorSpec([None], tf.int64, name=artifact.SEEDS_KEY),
        tf.TensorSpec([None], tf.int32, name=artifact.FIRST_KEY),
        tf.TensorSpec([None], tf.int32, name=artifact.SAMPLES_KEY),
    ]
    return tf.function(mc_dropout_segments, input_signature=segments_spec, autograph=False).get_concrete_function()


def export_model(
    model: keras.Model,
    repository: str | Path,
    name: str,
    *,
    task: artifact.Task,
    class_labels: list[str] | None = None,
    feature_names: list[str] | None = None,
    target_names: list[str] | None = None,
    tau: float | None = None,
    likelihood: artifact.Likelihood = "homoscedastic",
    temperature: float | None = None,
    predictive_temperature: float | None = None,
    preprocessing: artifact.Preprocessing | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    training: dict[str, object] | None = None,
    history: dict[str, list[float]] | None = None,
    rows_per_pass: int | None = None,
    output_meaning: str | None = None,
    calibration: conformity.CalibrationRows | None = None,
) -> Path:
    """Publish ``model`` as the next version of ``name`` in ``repository``; returns its folder.

    Works on any Keras 3 Sequential or functional model with one input and one output; its
    Dropout, SpatialDropout1D/2D/3D, GaussianDropout and AlphaDropout layers become the
    stochastic part of the ``mc_dropout`` signature. Classification models must output
    class probabilities; ``temperature`` / ``predictive_temperature`` calibrate the inference-mode
    prediction and the MC predictive (``mc_dropout``'s extra ``predictive`` output) inside the
    signatures. A heteroscedastic regression model outputs ``[mean (D), variance (D)]`` in target
    units (see ``training.model.with_preprocessing``); its signatures return them as two keys.
    ``output_meaning`` replaces the metadata's default description of the outputs.
    ``calibration`` (held-out rows nothing was fitted on) stores conformity scores computed through
    the staged version's own ``mc_dropout`` (``training.conformity``), so the published version
    serves prediction sets, conformal intervals and abstention.
    """
    input_shape = [int(d) for d in _input_spec(model).shape[1:]]
    output_shape = [int(d) for d in model.outputs[0].shape[1:]]
    temperatures = (("temperature", temperature), ("predictive_temperature", predictive_temperature))
    for label, value in (("tau", tau), *temperatures):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be a positive number, got {value}")
    if likelihood == "heteroscedastic":
        if task != "regression" or tau is not None or len(output_shape) != 1 or output_shape[0] % 2:
            raise ValueError("a heteroscedastic model is a regression model (no tau) with outputs [mean, variance]")
        output_shape = [output_shape[0] // 2]
    if task != "classification" and (temperature is not None or predictive_temperature is not None):
        raise ValueError("temperatures calibrate classifiers only")
    if task == "classification" and class_labels is not None and output_shape != [len(class_labels)]:
        raise ValueError(f"{len(class_labels)} class labels for an output of shape {output_shape}")
    with artifact.staging_dir(Path(repository), name) as staged:
        rows = write_saved_model(
            model,
            staged,
            rows_per_pass,
            likelihood=likelihood,
            temperature=temperature,
            predictive_temperature=predictive_temperature,
        )
        metadata = artifact.ModelMetadata(
            name=name,
            version=0,
            task=task,
            input_shape=input_shape,
            output_shape=output_shape,
            output_meaning=output_meaning or _meaning(task, likelihood, temperature, predictive_temperature),
            class_labels=class_labels,
            feature_names=feature_names,
            target_names=target_names,
            dropout_layers=[
                artifact.DropoutLayer(name=layer.name, type=type(layer).__name__, rate=float(layer.rate))
                for layer in dropout_layers(model)
            ],
            tau=tau,
            likelihood=likelihood,
            temperature=temperature,
            predictive_temperature=predictive_temperature,
            preprocessing=preprocessing,
            mc_rows_per_pass=rows,
            training=training or {},
            metrics=metrics or {},
            history=history or {},
            tensorflow_version=tf.__version__,
            keras_version=keras.__version__,
            created_at=datetime.now(UTC),
        )
        if calibration is not None:
            metadata.conformal = _calibrate(staged, task, tau, predictive_temperature, calibration)
        return artifact.publish(staged, metadata)


def _calibrate(
    staged: Path,
    task: artifact.Task,
    tau: float | None,
    predictive_temperature: float | None,
    rows: conformity.CalibrationRows,
) -> artifact.ConformalCalibration:
    """Conformity scores through the staged SavedModel's ``mc_dropout``: the predictive a server answers with."""
    loaded = tf.saved_model.load(str(staged))
    if artifact.MC_SIGNATURE not in loaded.signatures:
        raise ValueError("conformal calibration needs MC dropout: the model has no dropout layers")
    return conformity.calibrate(
        loaded.signatures[artifact.MC_SIGNATURE],
        task,
        rows.x,
        rows.y,
        source=rows.source,
        samples=rows.samples,
        seed=rows.seed,
        tau=tau,
        predictive_temperature=predictive_temperature,
        default_risk=rows.default_risk,
        delta=rows.delta,
    )


def _meaning(
    task: artifact.Task,
    likelihood: artifact.Likelihood,
    temperature: float | None,
    predictive_temperature: float | None,
) -> str:
    if task == "classification":
        calibrated = temperature is not None or predictive_temperature is not None
        return "class probabilities, temperature-calibrated" if calibrated else "class probabilities"
    if likelihood == "heteroscedastic":
        return "predicted mean ('outputs') and aleatoric variance ('variance')"
    return "predicted value"
