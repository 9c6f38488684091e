"""Concrete Dropout: learned rates, exported as hard Bernoulli masks through the stateless MC path."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from training import artifact, export_model, signatures
from training.concrete import ConcreteDropout
from training.model import ModelConfig, build_network


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
