"""``python -m training import``: users' own Keras models, published with one command and served with MC dropout.

Each model is built and fit for a few epochs here, as a user would, saved as .keras, imported, then served
by a real uvicorn server; its MC samples must be the draws ``training.mc_dropout.sample`` takes on the
in-memory model with the same seed.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import httpx
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Server, run_training
from sklearn.datasets import load_diabetes

from training import artifact, conformity, metrics
from training.__main__ import main
from training.data import digits
from training.mc_dropout import sample

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, loss: str | keras.losses.Loss) -> keras.Model:
    keras.utils.set_random_seed(0)
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    return model


def _dense_head(x, dropout: float = 0.5):
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.layers.Dense(10, activation="softmax")(x)


def _digits_models() -> dict[str, keras.Model]:
    """One of each kind a user brings: raw digits (0-16) in, probabilities (or logits) out."""
    layers = keras.layers
    models: dict[str, keras.Model] = {
        "sequential": keras.Sequential(
            [
                keras.Input((64,)),
                layers.Rescaling(1 / 16),
                layers.Dense(32, activation="relu"),
                layers.Dropout(0.5),
                layers.Dense(10, activation="softmax"),
            ]
        ),
        "conv": keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                layers.Rescaling(1 / 16),
                layers.Conv2D(8, 3, activation="relu"),
                layers.SpatialDropout2D(0.3),
                layers.Flatten(),
                layers.Dense(10, activation="softmax"),
            ]
        ),
        "logits": keras.Sequential(
            [
                keras.Input((64,)),
                layers.Rescaling(1 / 16),
                layers.Dense(32, activation="relu"),
                layers.Dropout(0.5),
                layers.Dense(10),
            ]
        ),
        "plain": keras.Sequential([keras.Input((64,)), layers.Dense(10, activation="softmax")]),
    }
    inputs = keras.Input((64,))
    models["functional"] = keras.Model(inputs, _dense_head(keras.layers.Rescaling(1 / 16)(inputs)))
    trunk = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.3)], name="trunk"
    )
    inputs = keras.Input((64,))
    models["nested"] = keras.Model(inputs, _dense_head(trunk(keras.layers.Rescaling(1 / 16)(inputs)), dropout=0.2))
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32)(keras.layers.Rescaling(1 / 16)(inputs))
    hidden = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(hidden))
    models["batchnorm"] = keras.Model(inputs, _dense_head(hidden))
    return models


def _user_models(data, images, diabetes) -> dict[str, keras.Model]:
    """Every user model, fit briefly on the first 1,200 digits (or 300 diabetes rows)."""
    models = _digits_models()
    for name, model in models.items():
        x = images.x if name == "conv" else data.x
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=name == "logits")
        _fit(model, x[:1200], data.y[:1200], loss)
    inputs = keras.Input((10,))
    hidden = keras.layers.Dropout(0.1)(keras.layers.Dense(32, activation="relu")(inputs))
    regression = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    models["regression"] = _fit(regression, diabetes.data[:300], diabetes.target[:300], "mse")
    return models


DROPOUT = {
    "sequential": [("Dropout", 0.5)],
    "functional": [("Dropout", 0.5)],
    "nested": [("Dropout", 0.3), ("Dropout", 0.2)],
    "batchnorm": [("Dropout", 0.5)],
    "conv": [("SpatialDropout2D", 0.3)],
    "logits": [("Dropout", 0.5)],
}
"""Each classifier's dropout-family layers, as the metadata must list them."""


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every user model saved as .keras and imported into one repository (the first by the CLI subprocess)."""
    folder = tmp_path_factory.mktemp("import")
    data, images = digits(), digits(images=True)
    diabetes = load_diabetes()
    models = _user_models(data, images, diabetes)
    cal = slice(1200, 1600)  # calibration rows: not fitted on
    with (folder / "digits.csv").open("w") as f:  # text labels, named by --class-labels
        f.write(",".join([*(f"p{i}" for i in range(64)), "digit"]) + "\n")
        for row, label in zip(data.x[cal], data.y[cal], strict=True):
            f.write(",".join([*(f"{v:g}" for v in row), WORDS[label]]) + "\n")
    np.savez(folder / "digits.npz", x=data.x[cal], y=data.y[cal])
    np.savez(folder / "images.npz", x=images.x[cal], y=images.y[cal])
    np.savez(folder / "diabetes.npz", x=diabetes.data[300:], y=diabetes.target[300:])
    for name, model in models.items():
        model.save(folder / f"{name}.keras")
    repository = folder / "artifacts"
    result = run_training(
        "import",
        folder / "sequential.keras",
        "--artifacts",
        repository,
        "--calibration-data",
        folder / "digits.csv",
        "--target",
        "digit",
        "--class-labels",
        *WORDS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "temperature" in result.stdout and "published" in result.stdout
    calibration = {"conv": "images.npz", "regression": "diabetes.npz", "plain": None, "logits": "digits.npz"}
    for name in ("functional", "nested", "batchnorm", "conv", "logits", "plain", "regression"):
        args = ["import", str(folder / f"{name}.keras"), "--artifacts", str(repository)]
        if calibration.get(name, "digits.npz"):
            args += ["--calibration-data", str(folder / calibration.get(name, "digits.npz"))]
        args += {"logits": ["--logits"], "regression": ["--task", "regression"]}.get(name, [])
        assert main(args) == 0, name
    return repository, models, data, diabetes


@pytest.fixture(scope="module")
def server(imported):
    running = Server(imported[0])
    yield running
    running.stop()


def _mc(server: Server, model: str, rows: np.ndarray, samples: int = 40, seed: int = 7) -> dict:
    body = {"model": model, "instances": rows.tolist(), "samples": samples, "seed": seed, "return_samples": True}
    response = httpx.post(f"{server.url}/predict/mc-dropout", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _rows(data, name: str, rows: slice) -> np.ndarray:
    return data.x[rows].reshape(-1, 8, 8, 1) if name == "conv" else data.x[rows]


@pytest.mark.parametrize("name", DROPOUT)
def test_served_mc_samples_are_the_local_monte_carlo_draws(name, imported, server):
    repository, models, data, _ = imported
    rows = _rows(data, name, slice(1600, 1606))
    answer = _mc(server, name, rows)
    served = np.array([p["samples"] for p in answer["predictions"]]).transpose(1, 0, 2)  # [T, N, K]
    local = sample(models[name], rows, 40, 7)
    if name == "logits":  # the import applies softmax inside the signature: every draw is a probability vector
        local = tf.nn.softmax(local, axis=-1).numpy()
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served.sum(axis=-1), 1.0, atol=1e-5)

    meta = artifact.read_metadata(repository / name / "1")
    assert [(d.type, d.rate) for d in meta.dropout_layers] == DROPOUT[name]
    assert meta.temperature is not None and meta.predictive_temperature is not None
    mean = np.array([p["probabilities"] for p in answer["predictions"]])
    np.testing.assert_allclose(mean, metrics.temper(served.mean(axis=0), meta.predictive_temperature), atol=1e-5)
    assert meta.class_labels == (WORDS if name == "sequential" else [str(d) for d in range(10)])


@pytest.mark.parametrize("name", ["sequential", "batchnorm", "conv"])
def test_masks_are_really_on(name, imported, server):
    """Statistical: MC samples spread, and their mean is not the inference-mode answer."""
    _, models, data, _ = imported
    rows = _rows(data, name, slice(1600, 1632))
    served = np.array([p["samples"] for p in _mc(server, name, rows, samples=100)["predictions"]])  # [N, T, K]
    deterministic = models[name](rows, training=False).numpy()
    assert served.std(axis=1).mean() > 1e-3
    assert np.abs(served.mean(axis=1) - deterministic).mean() > 1e-3


def test_batch_normalization_stays_in_inference_mode(imported, server):
    """In training mode BN would normalise by the request's batch: a row alone would get other draws."""
    _, _, data, _ = imported
    rows = data.x[1600:1632]
    batch = np.array([p["samples"] for p in _mc(server, "batchnorm", rows)["predictions"]])
    alone = np.array([p["samples"] for p in _mc(server, "batchnorm", rows[3:4])["predictions"]])
    np.testing.assert_allclose(alone[0], batch[3], rtol=1e-5, atol=1e-6)


def test_logits_classifier_answers_probabilities(imported, server):
    repository, models, data, _ = imported
    rows = data.x[1600:1610]
    response = httpx.post(f"{server.url}/predict", json={"model": "logits", "instances": rows.tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    probabilities = np.array([p["probabilities"] for p in response.json()["predictions"]])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities.min() >= 0
    meta = artifact.read_metadata(repository / "logits" / "1")
    raw = tf.nn.softmax(models["logits"](rows, training=False)).numpy()
    np.testing.assert_allclose(probabilities, metrics.temper(raw, meta.temperature), atol=1e-5)
    assert "softmax of the imported model's logits" in meta.output_meaning and meta.training["logits"] is True


def test_logits_classifier_is_refused_without_the_flag(imported, tmp_path, capsys):
    folder = imported[0].parent
    for extra in ([], ["--task", "classification"]):
        code = main(["import", str(folder / "logits.keras"), "--artifacts", str(tmp_path), *extra])
        error = capsys.readouterr().err
        assert code == 2 and "--logits" in error, error
    assert not artifact.model_names(tmp_path)  # nothing published
    code = main(["import", str(folder / "sequential.keras"), "--artifacts", str(tmp_path), "--logits"])
    assert code == 2 and "already outputs probabilities" in capsys.readouterr().err


def test_regression_model_gets_tau_and_serves_mc(imported, server):
    repository, models, _, diabetes = imported
    meta = artifact.read_metadata(repository / "regression" / "1")
    assert meta.task == "regression" and meta.tau > 0 and meta.output_shape == [1]
    rows = diabetes.data[400:405]
    answer = _mc(server, "regression", rows)
    served = np.array([p["samples"] for p in answer["predictions"]]).reshape(5, 40).T
    np.testing.assert_allclose(served, sample(models["regression"], rows, 40, 7)[..., 0], rtol=1e-5, atol=1e-6)
    assert answer["predictions"][0]["aleatoric_std"] == pytest.approx(1 / np.sqrt(meta.tau))


def test_imported_models_keep_half_their_calibration_rows_for_conformal_scores(imported, server):
    # 400 digit rows: 200 fit the temperatures, the other 200 (nothing fitted on them) give the conformal scores.
    repository = imported[0]
    meta = artifact.read_metadata(repository / "sequential" / "1")
    assert meta.conformal.rows == 200 and "skip" in meta.conformal.source
    assert meta.conformal.score == conformity.SET_SCORE
    assert meta.conformal.predictive_temperature == meta.predictive_temperature
    regression = artifact.read_metadata(repository / "regression" / "1")  # 142 diabetes rows: tau on 71
    assert regression.conformal.rows == 71 and regression.conformal.tau == regression.tau
    assert artifact.read_metadata(repository / "plain" / "1").conformal is None  # no --calibration-data
    rows = imported[2].x[1600:1602].tolist()
    response = httpx.post(f"{server.url}/predict/mc-dropout", json={"model": "sequential", "instances": rows})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["alpha"] == 0.1 and isinstance(answer["predictions"][0]["prediction_set"], list)


def test_model_without_dropout_is_published_for_inference_only(imported, server):
    repository, _, data, _ = imported
    meta = artifact.read_metadata(repository / "plain" / "1")
    assert meta.dropout_layers == [] and "inference only" in meta.training["notes"][0]
    assert set(tf.saved_model.load(str(repository / "plain" / "1")).signatures) == {"serving_default"}
    predict = httpx.post(f"{server.url}/predict", json={"model": "plain", "instances": data.x[:2].tolist()})
    assert predict.status_code == 200
    mc = httpx.post(f"{server.url}/predict/mc-dropout", json={"model": "plain", "instances": data.x[:2].tolist()})
    assert 400 <= mc.status_code < 500 and "mc_dropout" in mc.text


def test_custom_layers_need_their_module(tmp_path, capsys):
    layers = _user_module(
        tmp_path / "user_layers_for_import.py",
        """
        import keras

        class Doubling(keras.layers.Layer):
            def call(self, inputs):
                return 2.0 * inputs
        """,
    )
    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.5)(layers.Doubling()(inputs))
    keras.Model(inputs, keras.layers.Dense(1)(hidden)).save(tmp_path / "custom.keras")
    args = ["import", str(tmp_path / "custom.keras"), "--artifacts", str(tmp_path / "repo"), "--task", "regression"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "Doubling" in error and "--custom-objects" in error
    source = tmp_path / "user_layers_for_import.py"
    assert main([*args, "--custom-objects", str(source)]) == 0
    meta = artifact.read_metadata(tmp_path / "repo" / "custom" / "1")
    assert [d.type for d in meta.dropout_layers] == ["Dropout"] and meta.training["custom_objects"] == str(source)


def _refusal(model: keras.Model, tmp_path: Path, capsys) -> str:
    model.save(tmp_path / "model.keras")
    assert main(["import", str(tmp_path / "model.keras"), "--artifacts", str(tmp_path / "repo")]) == 2
    assert not artifact.model_names(tmp_path / "repo")
    return capsys.readouterr().err


def test_multi_input_model_is_refused(tmp_path, capsys):
    a, b = keras.Input((3,)), keras.Input((2,))
    joined = keras.layers.Dropout(0.5)(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(2, activation="softmax")(joined))
    assert "2 inputs" in _refusal(model, tmp_path, capsys)


def test_integer_input_is_refused(tmp_path, capsys):
    inputs = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    assert "int32" in _refusal(model, tmp_path, capsys)


def test_savedmodel_directory_and_other_files_are_refused(tmp_path, capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    model.export(tmp_path / "exported", verbose=False)
    for path, expected in ((tmp_path / "exported", "model.save('model.keras')"), (tmp_path / "x.onnx", "no such")):
        assert main(["import", str(path), "--artifacts", str(tmp_path / "repo"), "--task", "regression"]) == 2
        assert expected in capsys.readouterr().err


def _user_module(path: Path, source: str):
    """A user's layers module, loaded from its file as Keras' saving finds it: not importable by name."""
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_always_on_dropout_is_refused_then_loaded_as_plain_dropout(tmp_path, capsys):
    """The usual hand-made MC dropout layer is random in inference mode too: served as is, /predict would be."""
    layers = _user_module(
        tmp_path / "user_mc_layers.py",
        """
        import keras

        class MCDropout(keras.layers.Dropout):
            def call(self, inputs, training=None):
                return super().call(inputs, training=True)
        """,
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), layers.MCDropout(0.5), keras.layers.Dense(1)])
    model.save(tmp_path / "always_on.keras")
    args = ["import", str(tmp_path / "always_on.keras"), "--artifacts", str(tmp_path / "repo"), "--task", "regression"]
    assert main([*args, "--custom-objects", str(tmp_path / "user_mc_layers.py")]) == 2
    assert "random in inference mode" in capsys.readouterr().err
    (tmp_path / "as_dropout.py").write_text("import keras\n\nCUSTOM_OBJECTS = {'MCDropout': keras.layers.Dropout}\n")
    assert main([*args, "--custom-objects", str(tmp_path / "as_dropout.py")]) == 0
    version = tmp_path / "repo" / "always_on" / "1"
    assert [(d.type, d.rate) for d in artifact.read_metadata(version).dropout_layers] == [("Dropout", 0.5)]
    serving = tf.saved_model.load(str(version)).signatures["serving_default"]
    x = tf.constant(np.ones((3, 4)), tf.float32)
    np.testing.assert_array_equal(serving(inputs=x)["outputs"], serving(inputs=x)["outputs"])


def test_one_sigmoid_unit_is_served_as_two_class_probabilities(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dropout(0.2)(keras.layers.Dense(8, activation="relu")(inputs))
    model = _fit(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden)), x, y, "binary_crossentropy")
    model.save(tmp_path / "binary.keras")
    np.savez(tmp_path / "cal.npz", x=x[:100], y=y[:100])
    args = ["import", str(tmp_path / "binary.keras"), "--artifacts", str(tmp_path / "repo")]
    assert main(args) == 2 and "--task" in capsys.readouterr().err  # one sigmoid unit could be a regression
    assert main([*args, "--task", "classification", "--class-labels", "no", "yes"]) == 0
    version = tmp_path / "repo" / "binary" / "1"
    meta = artifact.read_metadata(version)
    assert meta.output_shape == [2] and meta.class_labels == ["no", "yes"] and "[1 - p, p]" in meta.output_meaning
    served = tf.saved_model.load(str(version)).signatures["serving_default"](inputs=tf.constant(x[:5]))["outputs"]
    p = model(x[:5], training=False).numpy()
    np.testing.assert_allclose(served.numpy(), np.hstack([1 - p, p]), atol=1e-6)


def test_lambda_layers_load_only_when_the_file_is_trusted(tmp_path, capsys):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.5)(keras.layers.Lambda(lambda x: 2.0 * x)(inputs))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden)).save(tmp_path / "lambda.keras")
    args = ["import", str(tmp_path / "lambda.keras"), "--artifacts", str(tmp_path / "repo")]
    assert main(args) == 2
    assert "enable_unsafe_deserialization" in capsys.readouterr().err
    trust = tmp_path / "trust.py"
    trust.write_text("import keras\n\nkeras.config.enable_unsafe_deserialization()\n")
    result = run_training(*args, "--custom-objects", trust)  # its own process: the setting is process-wide
    assert result.returncode == 0, result.stderr[-2000:]
    assert artifact.read_metadata(tmp_path / "repo" / "lambda" / "1").dropout_layers[0].rate == 0.5
