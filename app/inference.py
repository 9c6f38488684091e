"""From a request's instances to per-instance answers: validate, run a signature, summarize.

These functions block on TensorFlow; the API runs them in a worker thread.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import ApiError
from app.registry import ServedModel
from training.uncertainty import summarize_classification, summarize_regression

_NUMBER_TYPES = (int, float)


def to_array(instances: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Check every instance against the model's input shape; a float32 batch, or a 422 naming the spot."""
    for index, instance in enumerate(instances):
        _check(instance, shape, f"instances[{index}]")
    batch = np.asarray(instances, dtype=np.float32)
    if not np.isfinite(batch).all():  # finite doubles beyond float32's range
        where = np.argwhere(~np.isfinite(batch))[0]
        position = "".join(f"[{i}]" for i in where)
        raise ApiError(422, f"instances{position}: value is outside the float32 range")
    return batch


def _check(value: Any, shape: tuple[int, ...], where: str) -> None:
    if not shape:
        if type(value) not in _NUMBER_TYPES:
            raise ApiError(422, f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ApiError(422, f"{where}: NaN and infinity are not allowed")
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        got = f"a list of {len(value)}" if isinstance(value, list) else _describe(value)
        raise ApiError(422, f"{where}: expected a list of {shape[0]} (instance shape {list(shape)}), got {got}")
    leaves_are_numbers = len(shape) == 1 and all(type(v) is float or type(v) is int for v in value)
    if leaves_are_numbers and all(math.isfinite(v) for v in value):
        return
    for index, item in enumerate(value):
        _check(item, shape[1:], f"{where}[{index}]")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _scalar_or_list(values: np.ndarray) -> float | list:
    return float(values[0]) if values.shape == (1,) else values.tolist()


def predict(model: ServedModel, batch: np.ndarray) -> list[dict[str, Any]]:
    outputs = model.predict(batch).astype(np.float64)
    if model.task == "classification":
        labels = model.class_labels
        best = outputs.argmax(axis=-1)
        return [
            {"label": labels[k], "probability": float(p[k]), "probabilities": p.tolist()}
            for k, p in zip(best, outputs, strict=True)
        ]
    if model.task == "regression":
        return [{"value": _scalar_or_list(row.reshape(-1))} for row in outputs]
    return [{"outputs": row.tolist()} for row in outputs]


def predict_mc(
    model: ServedModel, batch: np.ndarray, samples: int, seed: int, return_samples: bool
) -> list[dict[str, Any]]:
    draws, variance = model.sample(batch, samples, seed)  # [T, N, ...]; variance: heteroscedastic models
    draws = draws.astype(np.float64)
    if model.task == "classification":
        s = summarize_classification(draws)
        labels = model.class_labels
        answers = [
            {
                "label": labels[s.label[i]],
                "probability": float(s.probability[i]),
                "probabilities": s.mean[i].tolist(),
                "std": s.std[i].tolist(),
                "predictive_entropy": float(s.predictive_entropy[i]),
                "expected_entropy": float(s.expected_entropy[i]),
                "mutual_information": float(s.mutual_information[i]),
                "variation_ratio": float(s.variation_ratio[i]),
            }
            for i in range(len(batch))
        ]
    elif model.task == "regression":
        s = summarize_regression(draws, model.tau, variance)
        answers = [s.answer(i) for i in range(len(batch))]
    else:
        mean, std = draws.mean(axis=0), draws.std(axis=0)
        answers = [{"mean": mean[i].tolist(), "std": std[i].tolist()} for i in range(len(batch))]
    if return_samples:
        for i, answer in enumerate(answers):
            answer["samples"] = draws[:, i].tolist()
    return answers
