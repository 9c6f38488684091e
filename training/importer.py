"""``python -m training import``: publish a user's trained Keras model, with MC dropout, after checking it.

The ``mc_dropout`` signature switches on exactly the model's dropout-family layers, nested models included
(``training.keras_file`` loads it). What could make a served answer wrong is refused with what fixes it: a
classifier whose outputs are not probabilities (``--logits`` applies softmax inside both signatures, so every
MC draw is a probability vector too), several inputs or outputs, non-float inputs, a model that is random
in inference mode. A model without dropout layers is published for inference only, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from training import artifact, metrics
from training.calibration import Calibration, fit_calibration
from training.conformity import CalibrationRows
from training.data import read_columns
from training.export import export_model
from training.keras_file import ImportRefused, load
from training.mc_dropout import dropout_layers

PROBE_ROWS = 64
CONFORMAL_ROWS = 20
"""Fewest calibration rows that are split in two (temperatures / tau, and conformal scores); fewer: no scores."""


@dataclass
class Imported:
    """What ``import_model`` published, and what the user should know about it."""

    path: Path
    task: artifact.Task
    calibration: Calibration
    notes: list[str] = field(default_factory=list)


def import_model(
    source: Path,
    repository: Path,
    name: str,
    *,
    task: artifact.Task | None = None,
    class_labels: list[str] | None = None,
    calibration_data: Path | None = None,
    target: str | None = None,
    logits: bool = False,
    custom_objects: str | None = None,
    samples: int = 100,
    seed: int = 0,
) -> Imported:
    """Check the Keras model at ``source`` and publish it as the next version of ``name``."""
    artifact.validate_name(name)
    model = load(source, custom_objects)
    input_shape = _check_structure(model)
    rows = _calibration_inputs(calibration_data, target, input_shape) if calibration_data else None
    probe = _probe(model, input_shape, rows)
    served, task, meaning = _served(model, probe, task, logits)
    output_shape = list(served.outputs[0].shape[1:])
    notes = []
    if task == "classification":
        class_labels = _class_labels(class_labels, output_shape)
    elif class_labels:
        raise ImportRefused("--class-labels apply to classifiers only")
    layers = dropout_layers(served)
    if not layers:
        notes.append(
            "no dropout layers: published for inference only (no mc_dropout signature; MC-dropout requests "
            "are answered with an error saying so)"
        )
    elif not any(getattr(layer, "rate", 1.0) for layer in layers):
        notes.append("every dropout layer has rate 0: MC samples will all be equal")

    fitted, scores, conformal = Calibration(), {}, None
    if rows is not None:
        x, raw = rows
        y = _targets(raw, task, class_labels, output_shape, calibration_data)
        fit, held = _halves(len(y), seed) if layers and len(y) >= CONFORMAL_ROWS else (np.arange(len(y)), None)
        fitted = fit_calibration(served, x[fit], y[fit], task, samples=samples, seed=seed)
        scores = {"calibration_rows_uncalibrated": _scores(served, x, y, task)}
        if held is not None:
            source = f"--calibration-data: the {len(held)} of {len(y)} rows (seed {seed}) the temperatures or tau skip"
            conformal = CalibrationRows(x[held], y[held], source=source, samples=samples)
        elif layers:
            notes.append(f"fewer than {CONFORMAL_ROWS} calibration rows: no prediction sets, intervals or abstention")
    else:
        notes.append(
            "no --calibration-data: probabilities are served uncalibrated"
            if task == "classification"
            else "no --calibration-data: no tau, so answers carry no aleatoric noise (epistemic spread only)"
        )
    path = export_model(
        served,
        repository,
        name,
        task=task,
        class_labels=class_labels,
        output_meaning=_meaning(meaning, fitted),
        metrics=scores,
        training={
            "imported_from": str(source),
            "logits": logits,
            "custom_objects": custom_objects,
            "calibration_data": None if calibration_data is None else str(calibration_data),
            "calibration_rows": 0 if rows is None else len(rows[0]),
            "notes": notes,
        },
        **fitted.export_arguments(),
        calibration=conformal,
    )
    return Imported(path, task, fitted, notes)


def _halves(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The calibration rows in two random halves: one fits the temperatures or tau, the other (which nothing
    is fitted on) gives the conformal scores, so the coverage guarantee holds (``training.conformity``)."""
    order = np.random.default_rng(seed).permutation(rows)
    return np.sort(order[: rows // 2]), np.sort(order[rows // 2 :])


def _check_structure(model: keras.Model) -> list[int]:
    """One float input of fixed instance shape and one output, in a Sequential or functional model."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ImportRefused(
            f"{type(model).__name__} is a subclassed model without a traced input: wrap it as "
            "keras.Model(inputs, model(inputs)) with inputs = keras.Input(shape) and save that"
        )
    if len(inputs) != 1:
        raise ImportRefused(f"the model has {len(inputs)} inputs; the service sends one tensor per instance")
    if len(outputs) != 1:
        raise ImportRefused(f"the model has {len(outputs)} outputs; the service serves one")
    dtype = str(inputs[0].dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ImportRefused(
            f"the model's input is {dtype} (e.g. token ids for an Embedding); the service sends float32 "
            "instances, so give the model a float input (cast inside it)"
        )
    shape = list(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ImportRefused(f"the input shape {shape} has free dimensions; the service needs a fixed instance shape")
    return shape


def _calibration_inputs(path: Path, target: str | None, input_shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Features shaped for the model (a CSV's flat rows are reshaped) and the raw labels."""
    columns = read_columns(path, target)
    x = columns.x
    if list(x.shape[1:]) != input_shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
            raise ImportRefused(
                f"{path}: instances of shape {list(x.shape[1:])}, the model takes {input_shape} "
                f"({int(np.prod(input_shape))} values)"
            )
        x = x.reshape(len(x), *input_shape)
    return x.astype(np.float32), np.asarray(columns.labels)


def _probe(model: keras.Model, input_shape: list[int], rows: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Inputs to look at the model's outputs with: calibration rows, else standard-normal noise."""
    if rows is not None:
        return rows[0][:PROBE_ROWS]
    return np.random.default_rng(0).standard_normal((PROBE_ROWS, *input_shape)).astype(np.float32)


def _final_activation(model: keras.layers.Layer) -> str | None:
    """Name of the activation the model ends in (its last layer's, nested models followed), if any."""
    last = model
    while getattr(last, "layers", None):
        last = last.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", None)


def _is_probabilities(values: np.ndarray) -> bool:
    """Rows of finite values in [0, 1] that sum to 1: class probabilities."""
    if values.ndim != 2 or values.shape[-1] < 2 or not np.isfinite(values).all():
        return False
    in_range = values.min() >= -1e-6 and values.max() <= 1 + 1e-6
    return bool(in_range and np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))


def _served(
    model: keras.Model, probe: np.ndarray, task: artifact.Task | None, logits: bool
) -> tuple[keras.Model, artifact.Task, str | None]:
    """The model to export, its task and, if the import changed its outputs, what they now mean.

    Refuses what would be served wrong.
    """
    values, again = (keras.ops.convert_to_numpy(model(probe, training=False)) for _ in range(2))
    if not np.isfinite(values).all():
        raise ImportRefused("the model's outputs on a probe batch are not finite (NaN or infinity)")
    if not np.array_equal(values, again):
        raise ImportRefused(
            "the model is random in inference mode: a layer ignores training=False, such as an MCDropout that "
            "calls Dropout with training=True, so serving_default would not be reproducible. Load it as plain "
            "Dropout, which the import switches on for MC sampling itself: --custom-objects with a module "
            "holding CUSTOM_OBJECTS = {'MCDropout': keras.layers.Dropout}"
        )
    activation = _final_activation(model)
    if task is None:
        if not (activation == "softmax" or _is_probabilities(values) or logits):
            raise ImportRefused(
                f"cannot tell the task: the model does not end in softmax (its last activation: {activation}) "
                "and its outputs are not probabilities; pass --task regression, or --task classification "
                "(with --logits if its outputs are logits)"
            )
        task = "classification"
    if task == "regression":
        if logits:
            raise ImportRefused("--logits applies to classifiers only")
        return model, task, None
    if len(model.outputs[0].shape) != 2:
        raise ImportRefused(f"a classifier outputs one vector of class scores; this one outputs {values.shape[1:]}")
    served, meaning = _as_probabilities(model, values, activation, logits)
    return served, task, meaning


def _as_probabilities(
    model: keras.Model, values: np.ndarray, activation: str | None, logits: bool
) -> tuple[keras.Model, str | None]:
    """A classifier that outputs class probabilities: as it is, or wrapped (softmax of logits, [1 - p, p])."""
    if values.shape[-1] == 1:  # one unit: P(class 1), or its logit
        if not (logits or activation == "sigmoid"):
            raise ImportRefused(
                "a classifier with one output must end in a sigmoid (P(class 1)); if the output is a logit "
                "pass --logits, and a sigmoid is applied inside both signatures"
            )
        source = "sigmoid of its logit" if logits else "sigmoid output"
        return _wrapped(model, logits, binary=True), f"class probabilities [1 - p, p] of the imported model's {source}"
    probabilities = _is_probabilities(values)
    if logits:
        if activation == "softmax" or probabilities:
            raise ImportRefused("--logits, but the model already outputs probabilities (softmax would apply twice)")
        return _wrapped(model, logits, binary=False), "class probabilities (softmax of the imported model's logits)"
    if not probabilities:
        sums = values.sum(axis=-1)
        raise ImportRefused(
            "the classifier's outputs are not probabilities (on a probe batch: values in "
            f"[{values.min():.3g}, {values.max():.3g}], row sums in [{sums.min():.3g}, {sums.max():.3g}]); "
            "if they are logits pass --logits, and softmax is applied inside both signatures. "
            "Serving logits as probabilities would be wrong, so nothing was published"
        )
    return model, None


def _wrapped(model: keras.Model, logits: bool, binary: bool) -> keras.Model:
    """The user's model nested inside one that outputs probabilities, so its dropout layers are still found."""
    inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="features")
    outputs = model(inputs)
    if binary:
        p = keras.layers.Activation("sigmoid", name="sigmoid_of_logit")(outputs) if logits else outputs
        outputs = keras.layers.Concatenate(name="two_classes")([1.0 - p, p])
    else:
        outputs = keras.layers.Softmax(name="softmax_of_logits")(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_probabilities")


def _class_labels(given: list[str] | None, output_shape: list[int]) -> list[str]:
    classes = output_shape[0]
    if given is None:
        return [str(i) for i in range(classes)]
    if len(given) != classes:
        raise ImportRefused(f"{len(given)} --class-labels for a classifier with {classes} outputs")
    if len(set(given)) != len(given):
        raise ImportRefused("--class-labels must be distinct")
    return list(given)


def _label_text(value: object) -> str:
    """A label as text: the integral numbers of an .npz file as '3', not '3.0'."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _targets(
    raw: np.ndarray, task: artifact.Task, class_labels: list[str], output_shape: list[int], path: Path
) -> np.ndarray:
    """Calibration targets: class indices by label (as the model numbers its outputs), or ``[rows, outputs]``."""
    if task == "classification":
        if raw.ndim != 1:
            raise ImportRefused(f"{path}: classification needs one label per row, got shape {list(raw.shape)}")
        index = {label: i for i, label in enumerate(class_labels)}
        texts = [_label_text(v) for v in raw]
        unknown = sorted(set(texts) - set(index))
        if unknown:
            raise ImportRefused(
                f"{path}: labels {', '.join(unknown[:5])} are not among the class labels {class_labels}; "
                "labels are output indices 0..K-1 unless --class-labels names the outputs in order"
            )
        return np.asarray([index[t] for t in texts], dtype=np.int64)
    try:
        y = raw.astype(np.float64).reshape(len(raw), -1)
    except ValueError:
        raise ImportRefused(f"{path}: regression needs a numeric target") from None
    width = int(np.prod(output_shape))
    if y.shape[1] != width or not np.isfinite(y).all():
        raise ImportRefused(f"{path}: targets must be {width} finite number(s) per row, got {y.shape[1]}")
    return y


def _scores(model: keras.Model, x: np.ndarray, y: np.ndarray, task: artifact.Task) -> dict[str, float]:
    """Inference-mode scores on the calibration rows, before calibration: a check that inputs mean the same."""
    predicted = keras.ops.convert_to_numpy(model(x, training=False))
    if task == "classification":
        return metrics.classification_scores(predicted, y)
    return {"rmse": metrics.rmse(predicted, y)}


def _meaning(served: str | None, fitted: Calibration) -> str | None:
    """The metadata's description of outputs the import changed; None keeps the default."""
    if served is None:
        return None
    return served + (", temperature-calibrated" if fitted.temperature is not None else "")
