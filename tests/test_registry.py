"""The live registry in-process: version policy, labels, failed loads, draining, vanished folders.

Each scan is driven by hand (``poll_seconds=0``), so every step is deterministic; the HTTP
tests in test_live_repository.py cover the background watcher under load.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import weakref

import numpy as np
import pytest
from conftest import publish_versions

from app.errors import ApiError
from app.registry import Registry
from app.settings import Settings


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Versions 1-3 of model "m", each answering its own version number."""
    root = tmp_path_factory.mktemp("source")
    publish_versions(root, "m", 3)
    return root / "m"


def repository_with(tmp_path, source, versions: list[int]):
    for version in versions:
        shutil.copytree(source / str(version), tmp_path / "m" / str(version))
    return tmp_path


def registry_for(repository, **settings) -> Registry:
    registry = Registry(Settings(model_dir=repository, poll_seconds=0, **settings))
    registry.sync()
    return registry


def answer(registry: Registry, **which) -> float:
    with registry.lease("m", **which) as model:
        return float(model.predict(np.zeros((1, 4), np.float32))[0, 0])


def states(registry: Registry) -> dict[int, str]:
    return {s.version: s.state for s in registry.status("m")}


def test_latest_version_serves_and_a_new_one_replaces_it(tmp_path, source):
    repository = repository_with(tmp_path, source, [1])
    registry = registry_for(repository)
    assert answer(registry) == 1.0 and states(registry) == {1: "AVAILABLE"}
    shutil.copytree(source / "2", repository / "m" / "2")
    registry.sync()
    assert answer(registry) == 2.0
    assert states(registry) == {1: "END", 2: "AVAILABLE"}
    with pytest.raises(ApiError, match="no loaded version 1; loaded: 2"):
        answer(registry, version=1)


def test_policies_from_the_config_file_and_labels(tmp_path, source):
    repository = repository_with(tmp_path, source, [1, 2, 3])
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  m:\n    version_policy: {specific: [1, 3]}\n    labels: {stable: 1, canary: 3}\n")
    registry = registry_for(repository, models_config=config)
    assert states(registry) == {1: "AVAILABLE", 3: "AVAILABLE"}
    assert (
        answer(registry) == 3.0 and answer(registry, label="stable") == 1.0 and answer(registry, label="canary") == 3.0
    )
    with pytest.raises(ApiError, match="no version label 'beta'"):
        answer(registry, label="beta")

    config.write_text(json.dumps({"models": {"m": {"version_policy": {"latest": 2}}}}))
    config.rename(config := tmp_path / "models.json")
    registry = registry_for(repository, models_config=config)
    assert states(registry) == {2: "AVAILABLE", 3: "AVAILABLE"}
    assert registry_for(repository, load_all_versions=True).versions("m").keys() == {1, 2, 3}


@pytest.mark.parametrize(
    "bad_config",
    [
        "models:\n  m:\n    version_policy: {latest: 1, all: true}\n",
        "models:\n  m:\n    version_polcy: {latest: 1}\n",
        "models: [",
    ],
)
def test_a_broken_config_file_is_refused_with_its_name(tmp_path, source, bad_config):
    config = tmp_path / "models.yaml"
    config.write_text(bad_config)
    with pytest.raises(ValueError, match=r"models\.yaml"):
        registry_for(repository_with(tmp_path, source, [1]), models_config=config)


def test_a_broken_version_keeps_its_error_and_is_retried_only_when_its_files_change(tmp_path, source, caplog):
    repository = repository_with(tmp_path, source, [1])
    registry = registry_for(repository)
    broken = repository / "m" / "2"
    shutil.copytree(source / "2", broken)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    with caplog.at_level(logging.ERROR, logger="dropout_serve"):
        for _ in range(3):
            registry.sync()
    assert answer(registry) == 1.0
    status = {s.version: s for s in registry.status("m")}
    assert status[1].state == "AVAILABLE"
    assert status[2].state == "END" and status[2].error
    assert len([r for r in caplog.records if "version 2" in r.getMessage()]) == 1

    shutil.copy(source / "2" / "saved_model.pb", broken / "saved_model.pb")
    registry.sync()
    assert answer(registry) == 2.0 and states(registry)[2] == "AVAILABLE"


def test_missing_variables_and_a_wrong_signature_fail_the_version_alone(tmp_path, source):
    repository = repository_with(tmp_path, source, [1])
    no_variables = repository / "m" / "2"
    shutil.copytree(source / "2", no_variables)
    (no_variables / "variables" / "variables.data-00000-of-00001").unlink()
    registry = registry_for(repository)
    status = {s.version: s for s in registry.status("m")}
    assert status[2].state == "END" and status[2].error
    assert answer(registry) == 1.0

    import tensorflow as tf

    class TwoInputs(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, a, b):
            return {"outputs": a + b}

    module = TwoInputs()
    tf.saved_model.save(module, str(repository / "m" / "3"), signatures={"serving_default": module.serve})
    registry.sync()
    status = {s.version: s for s in registry.status("m")}
    assert status[3].state == "END" and "takes 2 inputs" in status[3].error
    assert answer(registry) == 1.0


def test_a_retired_version_drains_its_requests_before_it_unloads(tmp_path, source):
    repository = repository_with(tmp_path, source, [1])
    registry = registry_for(repository)
    with registry.lease("m") as in_flight:
        shutil.copytree(source / "2", repository / "m" / "2")
        registry.sync()
        assert states(registry) == {1: "UNLOADING", 2: "AVAILABLE"}
        assert answer(registry) == 2.0
        assert float(in_flight.predict(np.zeros((1, 4), np.float32))[0, 0]) == 1.0
    assert states(registry) == {1: "END", 2: "AVAILABLE"}


def test_a_deleted_version_falls_back_and_a_deleted_model_stops(tmp_path, source):
    repository = repository_with(tmp_path, source, [1, 2])
    registry = registry_for(repository)
    assert answer(registry) == 2.0
    shutil.rmtree(repository / "m" / "2")
    registry.sync()
    assert answer(registry) == 1.0
    assert registry.ready()
    shutil.rmtree(repository / "m")
    registry.sync()
    assert registry.names() == [] and not registry.ready()
    with pytest.raises(ApiError, match="no models are loaded"):
        registry.resolve(None)


def test_a_folder_without_a_complete_saved_model_is_not_loaded(tmp_path, source):
    repository = repository_with(tmp_path, source, [1])
    partial = repository / "m" / "2"
    partial.mkdir()
    shutil.copy(source / "2" / "saved_model.pb", partial)
    registry = registry_for(repository)
    assert states(registry) == {1: "AVAILABLE"}
    shutil.copytree(source / "2" / "variables", partial / "variables")
    shutil.copy(source / "2" / "metadata.json", partial)
    registry.sync()
    assert answer(registry) == 2.0


def test_unload_and_load_a_whole_model(tmp_path, source):
    registry = registry_for(repository_with(tmp_path, source, [1]))
    registry.unload_model("m")
    assert registry.names() == []
    registry.sync()
    assert registry.names() == []
    registry.load_model("m")
    assert answer(registry) == 1.0
    with pytest.raises(ApiError, match="no model 'other'"):
        registry.load_model("other")


def test_loaded_models_are_frozen_out_of_collection_and_a_retired_one_is_freed(tmp_path, source):
    repository = repository_with(tmp_path, source, [1])
    gc.unfreeze()
    registry = registry_for(repository)
    assert gc.get_freeze_count() > 10_000  # the model's TensorFlow objects, no longer scanned by collections
    retired = weakref.ref(registry.get("m").saved_model)
    shutil.copytree(source / "2", repository / "m" / "2")
    registry.sync()  # version 2 replaces 1; the refreeze first collects version 1's reference cycles
    assert answer(registry) == 2.0
    assert retired() is None
    assert gc.get_freeze_count() > 10_000


def test_the_service_collects_the_young_generation_less_often(tmp_path, source):
    from fastapi.testclient import TestClient

    from app import memory
    from app.main import create_app

    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])  # CPython's default, whatever an earlier test left
    try:
        app = create_app(Settings(model_dir=repository_with(tmp_path, source, [1]), poll_seconds=0))
        with TestClient(app) as client:
            assert client.get("/health/ready").status_code == 200
            assert gc.get_threshold() == (memory.YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
