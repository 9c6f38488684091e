"""Request and response bodies, with examples that work against the default digits model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0]
DIGIT_ZERO += [0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
"""The first image of scikit-learn's digits set (a zero), 8x8 intensities 0-16, row by row."""

SEED_MAX = 2**63 - 1


def _nested_numbers(depth: int) -> dict[str, Any]:
    """A number, or arrays of numbers nested up to ``depth`` deep."""
    if depth == 0:
        return {"type": "number"}
    return {"anyOf": [{"type": "number"}, {"type": "array", "items": _nested_numbers(depth - 1)}]}


Instances = Annotated[
    list[Any],
    WithJsonSchema({"type": "array", "minItems": 1, "items": _nested_numbers(4)}),
]
"""Checked against the model's input shape by ``app.rows.to_batch``, not here: that check
knows the shape and names the bad element, and costs one NumPy conversion when all is well."""


class PredictRequest(BaseModel):
    # Strict: the documented types only (no "5" for 5, no 0 for false), and no unknown fields.
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"instances": [DIGIT_ZERO]}]}
    )

    instances: Instances = Field(
        min_length=1, description="one entry per input, each shaped like the model's input (64 numbers for digits)"
    )
    model: str | None = Field(None, description="model name; default: the service's default model")
    version: int | None = Field(None, ge=1, description="model version; default: the latest loaded")


def _samples(value: Any) -> Any:
    """One clear message for a bad ``samples`` (a union would report each of its members)."""
    if value is None or value == "auto":
        return value
    if type(value) is not int:
        raise PydanticCustomError("samples_type", 'Input should be a positive integer or "auto"')
    if value < 1:
        raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 1")
    return value


class MCDropoutRequest(PredictRequest):
    samples: Annotated[Annotated[int, Field(ge=1)] | Literal["auto"] | None, BeforeValidator(_samples)] = Field(
        None,
        description='Monte-Carlo samples T (default 100, bounded), or "auto": each instance samples until the '
        "Monte-Carlo standard error of its answer is below the tolerance (or the server's maximum)",
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        le=1,
        description='with samples "auto": the standard error that settles an answer (default: the server\'s, 0.05)',
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="makes the answer reproducible; default: fresh random"
    )
    return_samples: bool = Field(False, description="include every sample's output")
    alpha: float | None = Field(
        None, gt=0, lt=1, description="conformal sets and intervals cover the truth with probability 1 - alpha (0.1)"
    )
    risk: float | None = Field(
        None, gt=0, lt=1, description="abstain so that accepted answers are wrong at most this often (model default)"
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"instances": [DIGIT_ZERO], "samples": 100, "seed": 42}]},
    )


class ClassPrediction(BaseModel):
    label: str
    probability: float = Field(description="probability of the predicted label")
    probabilities: list[float] = Field(description="one per class, in the order of the model's class labels")


class RegressionPrediction(BaseModel):
    value: float | list[float]


class RawPrediction(BaseModel):
    outputs: list[Any]


class PredictResponse(BaseModel):
    model: str
    version: int
    class_labels: list[str] | None = None
    predictions: list[ClassPrediction | RegressionPrediction | RawPrediction]


class ClassMCPrediction(ClassPrediction):
    std: list[float] = Field(description="per-class standard deviation over samples")
    predictive_entropy: float = Field(
        description="entropy of the samples' mean (nats, before any calibration of 'probabilities'): total uncertainty"
    )
    expected_entropy: float = Field(description="mean entropy of each sample (nats): aleatoric part")
    mutual_information: float = Field(description="their difference, BALD (nats): epistemic part")
    variation_ratio: float = Field(description="share of samples whose top class is not the modal one")
    prediction_set: list[str] | None = Field(
        None, description="conformal set: holds the true label with probability 1 - alpha (may be empty)"
    )
    abstain: bool | None = Field(None, description="true: do not act on this answer at the requested risk")
    samples: list[list[float]] | None = Field(None, description="every sample, raw (uncalibrated)")
    samples_used: int | None = Field(None, description='with samples "auto": the T this prediction used')


class RegressionMCPrediction(BaseModel):
    mean: float | list[float]
    epistemic_std: float | list[float] = Field(description="spread of the sampled predictions")
    aleatoric_std: float | list[float] | None = Field(
        description="noise the model expects in the data: 1 / sqrt(tau), or per instance if heteroscedastic"
    )
    total_std: float | list[float]
    interval_95: list[float | list[float]] = Field(description="[lower, upper], mean ± 1.96 total_std")
    interval: list[float | list[float]] | None = Field(
        None, description="[lower, upper], conformal: holds the truth with probability 1 - alpha"
    )
    samples: list[Any] | None = None
    samples_used: int | None = Field(None, description='with samples "auto": the T this prediction used')


class RawMCPrediction(BaseModel):
    mean: list[Any]
    std: list[Any]
    samples: list[Any] | None = None


class MCDropoutResponse(BaseModel):
    model: str
    version: int
    samples: int = Field(description='T, the number of Monte-Carlo samples used (with "auto": the most any used)')
    seed: int = Field(description="the seed used; send it back to reproduce this answer exactly")
    tolerance: float | None = Field(None, description='with samples "auto": the tolerance that settled the answers')
    class_labels: list[str] | None = None
    alpha: float | None = Field(None, description="the conformal level used (coverage 1 - alpha), if the model has one")
    risk: float | None = Field(None, description="the abstention risk used, if the model abstains")
    conformal_note: str | None = Field(None, description="why the guarantee is only approximate for this request")
    predictions: list[ClassMCPrediction | RegressionMCPrediction | RawMCPrediction]


class ModelVersion(BaseModel):
    version: int
    task: str | None
    input_shape: list[int]
    output_shape: list[int]
    class_labels: list[str] | None
    dropout_layers: list[dict[str, Any]]
    mc_dropout: bool = Field(description="whether the artifact has the mc_dropout signature")
    tau: float | None
    conformal: dict[str, Any] | None = Field(
        None, description="the calibration behind prediction sets, intervals and abstention (rows, T, seed, risk)"
    )
    conformal_unavailable: str | None = Field(None, description="why the version answers without them")
    metrics: dict[str, dict[str, float]]
    created_at: str | None


class ModelInfo(BaseModel):
    name: str
    default: bool
    latest: int
    versions: list[ModelVersion]
    labels: dict[str, int] = Field(default_factory=dict, description="version labels, e.g. stable -> 3")


class ProtocolError(BaseModel):
    """Every TF Serving and Open Inference Protocol error, as those servers write theirs."""

    error: str = Field(description="what is wrong")


class ErrorResponse(BaseModel):
    """Every native error: one message that names the problem."""

    detail: str = Field(description="what is wrong, e.g. \"instances[0][5]: expected a number, got str '7'\"")
