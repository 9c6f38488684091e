"""Heteroscedastic regression (Kendall & Gal 2017): the loss, the uncertainty split, the artifact, the endpoint."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import Server

from training import artifact, export_model, metrics, signatures, uci
from training.data import Dataset
from training.model import gaussian_nll
from training.train import TrainConfig, train
from training.uncertainty import summarize_regression


def test_gaussian_nll_is_the_hand_computed_value():
    # y = 1, mean 0, log-variance log 4: ½ · (1/4) · 1 + ½ log 4; the second row is exact (residual 0, s = 0).
    y, mean, log_variance = np.array([[1.0], [2.0]]), np.array([[0.0], [2.0]]), np.array([[math.log(4.0)], [0.0]])
    got = np.asarray(gaussian_nll(y, mean, log_variance))
    np.testing.assert_allclose(got, [0.125 + 0.5 * math.log(4.0), 0.0], rtol=1e-12)


def test_stacked_trainer_loss_is_the_gaussian_nll_with_weight_decay():
    # Two heteroscedastic networks (two outputs each), dropout masks from the noise, λ per kernel.
    rng = np.random.default_rng(3)
    g, b, d, h = 2, 5, 3, 4
    keys = np.stack([uci.network_key(2, 0, 0, i) for i in range(g)])
    w = uci.Weights.glorot(keys, d, h, outputs=2)
    w.b2[:] = rng.normal(size=w.b2.shape)
    x, y, noise = rng.normal(size=(g, b, d)), rng.normal(size=(g, b, 1)), rng.uniform(size=(g, b, d + h))
    rates, decays = np.array([0.1, 0.4]), np.array([[1e-2, 2e-3], [0.0, 0.3]])
    got = uci.training_loss(
        [tf.constant(a) for a in (w.w1, w.b1, w.w2, w.b2)],
        *(tf.constant(a, tf.float32) for a in (x, y, noise, rates, decays)),
    ).numpy()
    for i, p in enumerate(rates):
        hidden = np.maximum((x[i] * (noise[i, :, :d] >= p) / (1 - p)) @ w.w1[i] + w.b1[i], 0)
        out = (hidden * (noise[i, :, d:] >= p) / (1 - p)) @ w.w2[i] + w.b2[i]
        mean, s = out[:, :1], out[:, 1:]
        nll = np.mean(0.5 * np.exp(-s) * (y[i] - mean) ** 2 + 0.5 * s)
        assert got[i] == pytest.approx(nll + decays[i, 0] * np.sum(w.w1[i] ** 2) + decays[i, 1] * np.sum(w.w2[i] ** 2))


def test_aleatoric_epistemic_split_and_log_likelihood_by_hand():
    # One instance, T = 2: means 1 and 3, variances 1 and 3. Epistemic std = 1 (spread of the means),
    # aleatoric = sqrt(mean variance) = sqrt(2), total = sqrt(1 + 2).
    means, variances = np.array([[[1.0]], [[3.0]]]), np.array([[[1.0]], [[3.0]]])
    s = summarize_regression(means, None, variances)
    assert s.mean[0, 0] == 2.0 and s.epistemic_std[0, 0] == 1.0
    assert s.aleatoric_std[0, 0] == pytest.approx(math.sqrt(2.0)) and s.total_std[0, 0] == pytest.approx(math.sqrt(3))
    assert s.answer(0)["aleatoric_std"] == pytest.approx(math.sqrt(2.0))
    # y = 2: the mixture ½ N(2; 1, 1) + ½ N(2; 3, 3).
    expected = math.log(0.5 * math.exp(-0.5) / math.sqrt(2 * math.pi) + 0.5 * math.exp(-1 / 6) / math.sqrt(6 * math.pi))
    assert metrics.gaussian_mixture_log_likelihood(np.array([[2.0]]), means, variances) == pytest.approx(expected)
    # A homoscedastic summary keeps one aleatoric number for all instances, as before.
    assert summarize_regression(means, 4.0).aleatoric_std == 0.5


@pytest.fixture(scope="module")
def heteroscedastic_model(tmp_path_factory):
    """y = x + noise whose std grows from 0.1 (x = -1) to 2 (x = 1): trained in seconds, then exported."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(600, 1)).astype(np.float32)
    noise_std = 0.1 + 1.9 * (x + 1) / 2
    y = (3 * x + noise_std * rng.normal(size=x.shape)).astype(np.float32)
    data = Dataset("noisy", x, y, "regression")
    from training.model import ModelConfig

    settings = TrainConfig(epochs=60, batch_size=32, likelihood="heteroscedastic", mc_samples=50)
    trained = train(data, ModelConfig(hidden=(32,), dropout=0.05, input_dropout=0.0), settings)
    repository = tmp_path_factory.mktemp("hetero") / "models"
    path = export_model(trained.model, repository, "noisy", task="regression", likelihood="heteroscedastic")
    return repository, path, trained


def test_artifact_records_the_likelihood_and_both_signatures_return_mean_and_variance(heteroscedastic_model):
    _, path, trained = heteroscedastic_model
    meta = artifact.read_metadata(path)
    assert meta.likelihood == "heteroscedastic" and meta.tau is None and meta.output_shape == [1]
    assert trained.metrics["test_mc"]["log_likelihood"] > -3
    loaded = tf.saved_model.load(str(path))
    x = np.array([[-0.9], [0.0], [0.9]], np.float32)
    serving = loaded.signatures[artifact.SERVING_SIGNATURE]
    mean, variance = signatures.infer(serving, x), signatures.infer_variance(serving, x)
    assert mean.shape == variance.shape == (3, 1)
    assert variance[0, 0] < variance[1, 0] < variance[2, 0]  # it learned the noise grows with x
    assert np.sqrt(variance[2, 0]) / np.sqrt(variance[0, 0]) > 3
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], x, 40, 7)
    assert draws.outputs.shape == draws.variance.shape == (40, 3, 1) and (draws.variance > 0).all()
    assert draws.outputs.std(axis=0).min() > 0  # dropout is on


def test_mc_endpoint_answers_per_instance_aleatoric_std(heteroscedastic_model):
    repository, path, _ = heteroscedastic_model
    server = Server(repository)
    try:
        body = {"instances": [[-0.9], [0.9]], "samples": 200, "seed": 5}
        answer = httpx.post(f"{server.url}/predict/mc-dropout", json=body, timeout=60)
        plain = httpx.post(f"{server.url}/predict", json={"instances": [[-0.9], [0.9]]}, timeout=60)
        tf_mc = {"signature_name": "mc_dropout", "inputs": {"inputs": [[-0.9], [0.9]], "samples": 200, "seed": 5}}
        tf_serving = httpx.post(f"{server.url}/v1/models/{path.parent.name}:predict", json=tf_mc, timeout=60)
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    low, high = answer.json()["predictions"]
    assert high["aleatoric_std"] > 3 * low["aleatoric_std"] > 0
    loaded = tf.saved_model.load(str(path))
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], np.array([[-0.9], [0.9]]), 200, 5)
    expected = np.sqrt(draws.variance.astype(np.float64).mean(axis=0))[:, 0]
    assert [low["aleatoric_std"], high["aleatoric_std"]] == pytest.approx(expected, rel=1e-6)
    # TF Serving's door answers both signature outputs by name, as TF Serving does for two outputs
    assert tf_serving.status_code == 200, tf_serving.text
    named = tf_serving.json()["outputs"]
    np.testing.assert_array_equal(np.float32(named["outputs"]), draws.outputs)
    np.testing.assert_array_equal(np.float32(named["variance"]), draws.variance)
    for p in (low, high):
        assert p["total_std"] == pytest.approx(math.hypot(p["epistemic_std"], p["aleatoric_std"]))
        assert p["interval_95"][0] < p["mean"] < p["interval_95"][1]
    assert plain.status_code == 200 and isinstance(plain.json()["predictions"][0]["value"], float)
