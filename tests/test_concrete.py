"""Concrete Dropout: learned rates, exported as hard Bernoulli masks through the stateless MC path."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import artifact, export_model, signatures
from training.concrete import ConcreteDropout, ConcreteL2, concrete_regularizers
from training.data import Dataset, digits
from training.model import ModelConfig, build_network
from training.train import TrainConfig, split_rows, train


def test_exported_mc_samples_follow_the_learned_rate(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1))).astype(np.float32)
    config = ModelConfig(hidden=(16,), dropout=0.3, input_dropout=0.3, concrete=True, concrete_rows=256)
    keras.utils.set_random_seed(0)
    network = build_network(config, (8,), 1, "regression")
    layers = [layer for layer in network.layers if isinstance(layer, ConcreteDropout)]
    assert len(layers) == 2
    network.fit(x, y, epochs=30, batch_size=32, verbose=0)
    rates = [layer.rate for layer in layers]
    assert all(abs(rate - 0.3) > 0.01 for rate in rates)  # the rates were learned

    path = export_model(network, tmp_path, "concrete", task="regression", tau=1.0)
    meta = artifact.read_metadata(path)
    learned = [(d.type, round(d.rate, 6)) for d in meta.dropout_layers]
    assert learned == [("ConcreteDropout", round(r, 6)) for r in rates]

    # A probe that outputs the first layer's mask applied to ones: zeros where dropped, 1/(1-p) where kept.
    inputs = keras.Input((8,))
    probe = keras.Model(inputs, layers[0](inputs))
    probe_dir = export_model(probe, tmp_path, "probe", task="regression")
    loaded = tf.saved_model.load(str(probe_dir))
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], np.ones((4, 8), np.float32), 2000, 3).outputs
    p = rates[0]
    dropped = draws == 0
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / dropped.size)  # Bernoulli at the learned rate
    np.testing.assert_allclose(draws[~dropped], 1 / (1 - p), rtol=1e-5)  # hard masks, inverted scaling
    assert (dropped[:, 0] == dropped[:, 1]).all()  # one network draw per sample, shared by the instances
    assert np.array_equal(probe(np.ones((4, 8), np.float32), training=False).numpy(), np.ones((4, 8)))


def _factors(served: keras.Model) -> tuple[list[float], list[float]]:
    """Weight factors of the ConcreteL2 kernels and rate factors of the ConcreteDropout layers a trained model has."""
    (network,) = [layer for layer in served.layers if isinstance(layer, keras.Model)]
    kernels = [layer.kernel_regularizer for layer in network.layers if isinstance(layer, keras.layers.Dense)]
    weights = [regularizer.factor for regularizer in kernels if isinstance(regularizer, ConcreteL2)]
    rates = [layer.dropout_regularizer for layer in network.layers if isinstance(layer, ConcreteDropout)]
    assert len(weights) == len(rates) == 2
    return weights, rates


@pytest.mark.parametrize(
    ("task", "likelihood", "tau"),
    [
        ("regression", "homoscedastic", 0.01),
        ("regression", "homoscedastic", None),
        ("regression", "heteroscedastic", None),
        ("classification", "homoscedastic", None),
    ],
)
def test_trained_concrete_regularizers_are_divided_by_the_homoscedastic_precision(task, likelihood, tau):
    """``train`` divides both concrete factors by τ·y_std² (the prior precision in standardized target units).

    Only for a homoscedastic regression network given ``tau``: without it the prior is 1 in those units, and
    classifiers and heteroscedastic networks (losses that are the whole NLL) keep ``l² / N`` and ``2 / N``.
    """
    if task == "classification":
        data = digits().subset(np.arange(120))
    else:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(120, 4)).astype(np.float32)
        data = Dataset("toy", x, (x @ rng.normal(size=(4, 1)) * 20 + 3).astype(np.float32), "regression")
    settings = TrainConfig(epochs=1, mc_samples=2, tau=tau, likelihood=likelihood)
    fit_rows = split_rows(data, settings.__dict__).fit
    weight, rate = concrete_regularizers(len(fit_rows.y))

    trained = train(data, ModelConfig(hidden=(8,), dropout=0.1, input_dropout=0.1, concrete=True), settings)
    weights, rates = _factors(trained.model)
    if tau is None:
        assert weights == [weight] * 2 and rates == [rate] * 2  # exactly the unscaled factors
    else:
        precision = tau * float(np.mean(fit_rows.y.std(axis=0) ** 2))
        assert precision > 10  # a real change: the factors shrink more than 10x
        assert weights == pytest.approx([weight / precision] * 2, rel=1e-12, abs=0)
        assert rates == pytest.approx([rate / precision] * 2, rel=1e-12, abs=0)
