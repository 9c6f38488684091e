"""The artifact contract: how a model lives in the model repository.

This module is the single written definition; ``training`` writes artifacts through it and
``app`` reads them through it. It imports neither Keras nor TensorFlow.

Layout (TensorFlow Serving's, so TF Serving can serve the same folder)::

    <repository>/<model name>/<version>/     version: a positive integer, newest is highest
        saved_model.pb, variables/, ...      a TensorFlow SavedModel
        metadata.json                        ModelMetadata below, as JSON

A version folder appears atomically: it is written under ``<model name>/.staging-*`` and then
renamed into place, so a reader never sees half of one. Names starting with a dot are never
versions. A new version takes the next integer.

Signatures of the SavedModel (inputs are float32 with a free batch axis ``N``):

``serving_default``
    ``inputs [N, *input_shape]`` -> ``outputs [N, *output_shape]``: inference mode, exactly
    ``model(inputs, training=False)``. Classification outputs are class probabilities;
    regression outputs are predicted values in the target's original units.
``mc_dropout``
    ``inputs [N, *input_shape]``, ``samples`` (int32 scalar, T >= 1), ``seed`` (int64 scalar)
    -> ``outputs [T, N, *output_shape]``: T Monte-Carlo dropout samples in one call, with only
    the dropout layers stochastic and every other layer in inference mode; no variable changes.
    The same inputs, T and seed give bit-identical samples in any process. Sample ``t`` is one
    draw of the network, shared by all instances of the call (see ``training.mc_dropout``).
``mc_dropout_segments`` (written beside ``mc_dropout`` since issue 18; a server serves artifacts
    without it through ``mc_dropout`` as before)
    Several ``mc_dropout`` calls in one, so a server can batch concurrent MC requests without
    changing any answer. ``inputs [N, *input_shape]``, ``segments [N]`` (int32: the segment, i.e.
    the request, each row belongs to), ``seeds [R]`` (int64), ``first [R]`` and ``samples [R]``
    (int32 >= 0): segment ``r`` gets samples ``first[r] .. first[r] + samples[r] - 1`` of the seed
    ``seeds[r]``. -> ``outputs [T, N, *output_shape]`` with T the largest ``samples`` of a segment
    that has rows (at least one must ask for a sample): ``outputs[k, i]`` is sample ``first[r] + k``
    of row ``i`` (``r = segments[i]``) for ``k < samples[r]``, 0 beyond. Sample ``t`` of a segment is
    bit-identical to sample ``t`` of ``mc_dropout`` called on the segment's rows alone with its seed
    (T > t): the masks depend only on (seed, layer, t), one per sample shared by the segment's rows,
    and the network computes each row on its own. So a request may also take its samples in
    stretches (``first``) over several calls and get exactly the draws of one call. A
    heteroscedastic model adds ``variance`` (same shape); there is no ``predictive``: a calibrated
    client computes ``softmax(log(mean_t p_t) / predictive_temperature)`` itself over all of a
    request's samples (``training.signatures.calibrated_predictive``).

Preprocessing (feature scaling, target de-standardization) is part of both signatures, so
clients send raw features.

Regression likelihoods (``likelihood`` in the metadata):

``homoscedastic`` (the default; the MC-dropout paper's model)
    One noise level for every input: ``tau`` is the model precision, the aleatoric standard
    deviation of a prediction is ``1 / sqrt(tau)`` in the target's units. The signatures return
    ``outputs`` only, as above.
``heteroscedastic`` (Kendall & Gal 2017)
    The network predicts a mean and a variance per instance. Both signatures return ``outputs``
    (the predicted mean, shapes as above) and ``variance`` (the predicted aleatoric variance, in
    squared target units, the same shape as ``outputs``): ``serving_default`` gives
    ``variance [N, *output_shape]``, ``mc_dropout`` gives ``variance [T, N, *output_shape]``, the
    variance of sample ``t``'s network. ``tau`` is None. A client that reads only ``outputs`` gets
    the means, so it works unchanged.

Calibrated classifiers: ``temperature`` and ``predictive_temperature`` (None = not calibrated) were
fitted on validation rows by NLL and are applied inside the signatures. ``serving_default`` returns
``softmax(log p / temperature)``. ``mc_dropout`` still returns the raw samples as ``outputs`` (each
one draw of the network, uncalibrated) and adds ``predictive [N, *output_shape]``, the calibrated MC
predictive ``softmax(log(mean_t p_t) / predictive_temperature)`` over the call's T samples; a
client that reads only ``outputs`` gets the uncalibrated samples. The raw inference-mode
probabilities are ``softmax(temperature * log outputs)``.

Conformal calibration (``conformal`` in the metadata, None for models exported without calibration
rows, which then serve no prediction sets, conformal intervals or abstention): what a server needs
to answer any coverage level ``1 - alpha`` and any risk, computed through this version's own
``mc_dropout`` signature on rows nothing was fitted on (``training.conformity``):

- ``score`` and ``scores``: which conformity score, and the calibration rows' scores, sorted ascending.
  Classification: ``lac`` (``1 - p`` of the true class) or, in versions exported before it,
  ``aps-randomized`` (randomized APS, ``u`` from ``training.conformal.tie_breaks(instance, seed)``
  with the seed of the request), on the MC predictive as served (``predictive`` if calibrated, else the
  mean of the samples); ``training.conformal.sets`` answers either. Regression:
  ``max_d |y_d - μ_d| / sigma_d`` with μ and sigma the MC predictive's mean and total standard deviation
  (``training.uncertainty.summarize_regression``). A server answers level ``1 - alpha`` with
  ``training.conformal.quantile(scores, alpha)``.
- classifiers also store, per calibration row, its ``uncertainties`` (the abstention score named by
  ``uncertainty``: ``1 - probability`` of the served predictive's label, plus the samples' mutual
  information in versions exported since issue 19's second round; ``training.conformal.uncertainty``)
  and whether that label was ``correct``, the ``default_risk`` and the
  confidence ``1 - delta`` of the abstention rule (``training.conformal.abstention_threshold``).
- ``samples``, ``seed``, ``predictive_temperature`` and ``tau``: the MC predictive the scores were
  computed from. The coverage guarantee is for that predictive; ``mismatch`` says when the version's
  metadata no longer matches it (then the scores must be rebuilt), and a server should say when a
  request's T differs from ``samples``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr

SERVING_SIGNATURE = "serving_default"
MC_SIGNATURE = "mc_dropout"
MC_SEGMENTS_SIGNATURE = "mc_dropout_segments"
SEGMENTS_KEY = "segments"
SEEDS_KEY = "seeds"
FIRST_KEY = "first"
INPUTS_KEY = "inputs"
SAMPLES_KEY = "samples"
SEED_KEY = "seed"
OUTPUTS_KEY = "outputs"
VARIANCE_KEY = "variance"
PREDICTIVE_KEY = "predictive"
METADATA_FILE = "metadata.json"

Task = Literal["classification", "regression"]
Likelihood = Literal["homoscedastic", "heteroscedastic"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DropoutLayer(BaseModel):
    name: str
    type: str
    rate: float


class Preprocessing(BaseModel):
    """What the graph does to raw inputs and outputs, recorded for people, applied in-graph."""

    inputs: str = Field(description="e.g. 'x / 16' or 'standardized with training mean and std'")
    outputs: str = "none"
    input_shift: list[float] | None = None
    input_scale: list[float] | None = None
    target_shift: list[float] | None = None
    target_scale: list[float] | None = None


class ConformalCalibration(BaseModel):
    """Conformity scores of held-out calibration rows and how they were computed (see the module docstring)."""

    rows: int = Field(description="calibration rows")
    source: str = Field(description="which rows, e.g. 'held out: 25 % of the training rows, seed 0'")
    score: Literal["aps-randomized", "lac", "normalized-residual"]
    scores: list[float] = Field(description="sorted ascending")
    samples: int = Field(description="MC samples T of the predictive the scores come from")
    seed: int = Field(description="mc_dropout seed of that predictive (and of the APS tie-breaks)")
    predictive_temperature: float | None = None
    tau: float | None = None
    uncertainty: (
        Literal["1 - probability", "1 - probability + mutual information", "1 - probability + 3 * mutual information"]
        | None
    ) = None
    uncertainties: list[float] | None = Field(None, description="classifiers: per calibration row, row order")
    correct: list[bool] | None = Field(None, description="classifiers: per calibration row, row order")
    default_risk: float | None = Field(None, description="classifiers: abstention risk when a request names none")
    delta: float | None = Field(None, description="classifiers: the risk bound holds with probability 1 - delta")
    _thresholds: dict[float, float] = PrivateAttr(default_factory=dict)
    """Abstention thresholds already computed, by risk (``training.conformity``); not stored."""


def conformal_mismatch(meta: ModelMetadata) -> str | None:
    """Why ``meta.conformal`` cannot be used as stored (None: it can, or there is none)."""
    calibration = meta.conformal
    if calibration is None:
        return None
    for field in ("predictive_temperature", "tau"):
        built, now = getattr(calibration, field), getattr(meta, field)
        if built != now:
            return f"conformal scores were computed with {field} {built}, the model now has {now}: rebuild them"
    return None


class ModelMetadata(BaseModel):
    """Everything about a version that the SavedModel's signatures do not say themselves."""

    format_version: int = 1
    name: str
    version: int
    task: Task
    input_shape: list[int] = Field(description="shape of one instance, batch axis excluded")
    input_dtype: str = "float32"
    output_shape: list[int]
    output_meaning: str
    class_labels: list[str] | None = None
    feature_names: list[str] | None = None
    target_names: list[str] | None = None
    dropout_layers: list[DropoutLayer]
    tau: float | None = Field(None, description="regression model precision, 1/variance")
    likelihood: Likelihood = Field(
        "homoscedastic", description="regression noise model; heteroscedastic signatures also return 'variance'"
    )
    temperature: float | None = Field(None, description="classifier temperature applied in serving_default")
    predictive_temperature: float | None = Field(
        None, description="classifier temperature of the MC predictive, mc_dropout's 'predictive'"
    )
    preprocessing: Preprocessing | None = None
    conformal: ConformalCalibration | None = Field(
        None, description="conformity scores of held-out calibration rows; None: no sets, intervals or abstention"
    )
    mc_rows_per_pass: int = Field(description="rows per forward pass inside mc_dropout")
    training: dict[str, object] = Field(default_factory=dict, description="training settings")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    history: dict[str, list[float]] = Field(default_factory=dict, description="per-epoch training curves")
    tensorflow_version: str
    keras_version: str
    created_at: datetime


def validate_name(name: str) -> str:
    """Model names are single path components; refuse anything else before touching disk."""
    if not _NAME.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (at most 64), "
            "starting with a letter or digit"
        )
    return name


def versions(model_dir: Path) -> list[int]:
    """The published versions of one model, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def model_names(repository: Path) -> list[str]:
    """Models in the repository that have at least one published version."""
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if _NAME.match(p.name) and versions(p))


def read_metadata(version_dir: Path) -> ModelMetadata | None:
    """The version's metadata, or None for a plain SavedModel written by something else."""
    path = version_dir / METADATA_FILE
    if not path.exists():
        return None
    return ModelMetadata.model_validate_json(path.read_text())


@contextlib.contextmanager
def staging_dir(repository: Path, name: str) -> Iterator[Path]:
    """A scratch folder beside the versions (same filesystem, so publishing is a rename).

    It is removed whatever happens, so a failed export leaves nothing behind.
    """
    model_dir = repository / validate_name(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    path.chmod(0o755)  # mkdtemp makes it private; a published version must be readable by the server's user
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, metadata: ModelMetadata) -> Path:
    """Write ``metadata`` into ``staged`` and rename it to the next free version number.

    If another writer takes the number first, the rename fails and the next one is tried.
    Returns the published version folder; ``metadata.version`` is set to its number.
    """
    model_dir = staged.parent
    while True:
        metadata.version = max(versions(model_dir), default=0) + 1
        (staged / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
        target = model_dir / str(metadata.version)
        try:
            os.rename(staged, target)
        except OSError:
            if not target.exists():
                raise
            continue
        return target
