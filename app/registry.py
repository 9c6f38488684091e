"""Loaded models: every model in the repository, read through the artifact contract.

Only ``tf.saved_model.load`` is used, never Keras: any SavedModel whose ``serving_default``
takes one tensor serves on ``/predict``; ``mc_dropout`` is used when the artifact has it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from app.errors import ApiError
from training import artifact, signatures

log = logging.getLogger("dropout_serve")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: int
    path: Path
    task: artifact.Task | None
    """None for a SavedModel without metadata: outputs are returned as they are."""
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    metadata: artifact.ModelMetadata | None
    serving: tf.types.experimental.ConcreteFunction
    mc_dropout: tf.types.experimental.ConcreteFunction | None
    input_key: str
    output_key: str
    saved_model: object = field(repr=False)
    """The loaded SavedModel; the signatures' variables live as long as it does."""

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return signatures.infer(self.serving, inputs, self.input_key, self.output_key)

    def sample(self, inputs: np.ndarray, samples: int, seed: int) -> signatures.Samples:
        return signatures.mc_draws(self.mc_dropout, inputs, samples, seed)

    @property
    def tau(self) -> float | None:
        return self.metadata.tau if self.metadata else None

    @property
    def class_labels(self) -> list[str] | None:
        if self.metadata and self.metadata.class_labels:
            return self.metadata.class_labels
        if self.task == "classification":
            return [str(i) for i in range(self.output_shape[-1])]
        return None


def load_version(name: str, path: Path) -> ServedModel:
    """Load one version folder and run each signature once, so the first request is not slow."""
    loaded = tf.saved_model.load(str(path))
    if artifact.SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"{path} has no {artifact.SERVING_SIGNATURE!r} signature")
    serving = loaded.signatures[artifact.SERVING_SIGNATURE]
    inputs = serving.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{path}: serving_default takes {len(inputs)} inputs; only one is supported")
    input_key, spec = next(iter(inputs.items()))
    outputs = serving.structured_outputs
    output_key = artifact.OUTPUTS_KEY if artifact.OUTPUTS_KEY in outputs else next(iter(outputs))
    if spec.shape.rank is None or not spec.shape[1:].is_fully_defined() or spec.dtype != tf.float32:
        raise ValueError(f"{path}: input must be float32 [batch, fixed dims...], got {spec}")
    metadata = artifact.read_metadata(path)
    mc = loaded.signatures.get(artifact.MC_SIGNATURE)
    model = ServedModel(
        name=name,
        version=int(path.name),
        path=path,
        task=metadata.task if metadata else None,
        input_shape=tuple(spec.shape[1:].as_list()),
        output_shape=tuple(outputs[output_key].shape[1:].as_list()),
        metadata=metadata,
        serving=serving,
        mc_dropout=mc,
        input_key=input_key,
        output_key=output_key,
        saved_model=loaded,
    )
    warm = np.zeros((1, *model.input_shape), np.float32)
    model.predict(warm)
    if mc is not None:
        model.sample(warm, 2, 0)
    return model


class Registry:
    """Models by name and version; the latest version answers requests that name none."""

    def __init__(self, models: list[ServedModel], default: str | None) -> None:
        self._models: dict[str, dict[int, ServedModel]] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model
        self.default = default if default in self._models else (min(self._models) if self._models else None)

    @classmethod
    def load(cls, repository: Path, default: str | None = None, all_versions: bool = False) -> Registry:
        models = []
        for name in artifact.model_names(repository):
            found = artifact.versions(repository / name)
            for version in found if all_versions else found[-1:]:
                try:
                    models.append(load_version(name, repository / name / str(version)))
                    log.info("loaded %s version %d", name, version)
                except Exception:
                    log.exception("could not load %s version %d; skipping it", name, version)
        return cls(models, default)

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> dict[int, ServedModel]:
        if name not in self._models:
            known = ", ".join(self.names()) or "none"
            raise ApiError(404, f"unknown model {name!r}; loaded models: {known}")
        return self._models[name]

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        if name is None:
            if self.default is None:
                raise ApiError(404, "no models are loaded")
            name = self.default
        versions = self.versions(name)
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            loaded = ", ".join(str(v) for v in sorted(versions))
            raise ApiError(404, f"model {name!r} has no loaded version {version}; loaded: {loaded}")
        return versions[version]
