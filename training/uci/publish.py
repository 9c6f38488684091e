"""A split's final network published with the project's export path, and its test scores from the SavedModel.

Why a SavedModel and not the in-memory weights: the benchmark is of what the service serves, so the
network is rebuilt with ``build_network`` (the same Keras network ``python -m training`` makes, with
``ConcreteDropout`` layers for learned rates), published with ``export_model``, loaded back, and the
test rows are scored through its ``mc_dropout`` and ``serving_default`` signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import artifact, metrics, signatures
from training.artifact import Likelihood
from training.concrete import concrete_regularizers
from training.uci.data import Standardization, UciDataset
from training.uci.report import variant
from training.uci.trainer import Weights


@dataclass
class Job:
    """One network to train: its rows (standardized by ``scaling``), hyper-parameters and key."""

    split: int
    rate: float
    """The fixed dropout rate, or where a concrete network's learned rates start."""
    tau: float | None
    """None: heteroscedastic (the network predicts its noise)."""
    x: np.ndarray
    y: np.ndarray
    scaling: Standardization
    decay: tuple[float, float]
    """L2 factors of the two kernels (concrete: the ``ConcreteL2`` factors, λ ΣW² / (1 - p))."""
    key: np.ndarray
    concrete_scale: float | None = None
    """Concrete networks: both regularizers' factor (``s l² / N`` and ``s 2 / N``; homoscedastic:
    ``s / (τ y_std²)``); None: fixed rates."""

    @property
    def dropout_regularizer(self) -> float | None:
        """The factor of the rates' negative entropy (``s 2 / N``), None for fixed rates."""
        return None if self.concrete_scale is None else self.concrete_scale * concrete_regularizers(len(self.y))[1]

    @property
    def likelihood(self) -> Likelihood:
        return "homoscedastic" if self.tau is not None else "heteroscedastic"


def score_through_saved_model(
    data: UciDataset, job: Job, weights: Weights, repository: Path, samples: int, seed: int, validation: dict
) -> dict:
    """Export the final network with the project's code, load it back, score the test rows with it."""
    import keras

    from training import export_model
    from training.artifact import Preprocessing
    from training.model import ModelConfig, build_network, with_preprocessing

    concrete = job.concrete_scale is not None
    config = ModelConfig(
        hidden=(data.n_hidden,),
        dropout=job.rate,
        input_dropout=job.rate,
        weight_decay=0.0 if concrete else job.decay,
        concrete=concrete,
        concrete_rows=len(job.y),
    )
    network = build_network(config, (data.x.shape[1],), 1, "regression", job.likelihood)
    kinds = [type(layer).__name__ for layer in network.layers]
    drop = "ConcreteDropout" if concrete else "Dropout"
    if (
        kinds != ["InputLayer", *([drop] if job.rate else []), "Dense", drop, "Dense"]
        or network.layers[-3].activation is not keras.activations.relu
    ):
        raise RuntimeError(f"build_network no longer makes the paper's network: {kinds}")
    network.set_weights(weights.keras(0))
    s = job.scaling
    served = with_preprocessing(network, s.x_mean, s.x_std, np.array([s.y_mean]), np.array([s.y_std]), job.likelihood)
    learned = {"learned_rates": weights.rates()[0].tolist(), "concrete_scale": job.concrete_scale} if concrete else {}
    path = export_model(
        served,
        repository,
        f"{data.name}{variant(job.likelihood, 'concrete' if concrete else 'grid')}-split{job.split}",
        task="regression",
        tau=job.tau,
        likelihood=job.likelihood,
        preprocessing=Preprocessing(
            inputs="standardized per feature (training split mean, std)",
            outputs="network predicts the standardized target; the graph restores its units",
            input_shift=s.x_mean.tolist(),
            input_scale=s.x_std.tolist(),
            target_shift=[s.y_mean],
            target_scale=[s.y_std],
        ),
        metrics={"validation_mc": validation},
        training={
            "protocol": "Gal & Ghahramani UCI",
            "split": job.split,
            "dropout": "concrete" if concrete else job.rate,
            **learned,
            "tau": job.tau,
            "likelihood": job.likelihood,
        },
    )
    loaded = tf.saved_model.load(str(path))
    test = data.splits[job.split][1]
    targets = data.y[test][:, None]
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], data.x[test], samples, seed)
    mc, variance = draws.outputs, draws.variance
    deterministic = signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], data.x[test])
    if variance is None:
        ll = metrics.mc_log_likelihood(targets, mc, job.tau)
    else:
        ll = metrics.gaussian_mixture_log_likelihood(targets, mc, variance)
    return {
        "rmse_mc": metrics.rmse(mc.mean(axis=0), targets),
        "rmse_deterministic": metrics.rmse(deterministic, targets),
        "ll": ll,
        "mc_seed": seed,
        "artifact": str(path),
        **learned,
    }
