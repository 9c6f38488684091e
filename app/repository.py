"""What the model repository on disk asks to be served: version folders, version policy, labels.

The registry calls :func:`scan` on every poll. A scan only reads the file system; it never
loads a model. Which folders are ready to load, and which versions a model wants, is decided
here, so the registry only has to make memory match the answer.

The model config file (``DROPOUT_SERVE_MODEL_CONFIG``, JSON or YAML) follows TF Serving's
``model_version_policy`` and ``version_labels``::

    models:
      digits:
        version_policy: {latest: 2}        # or {all: true}, or {specific: [1, 3]}
        labels: {stable: 1, canary: 2}
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training import artifact

log = logging.getLogger("dropout_serve")

REQUIRED_FILES = ("saved_model.pb", "variables/variables.index")
"""A SavedModel folder without these is still being written (or is not a SavedModel)."""


class VersionPolicy(BaseModel):
    """Exactly one of ``latest``, ``all`` or ``specific``, as TF Serving's ``model_version_policy``."""

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(None, ge=1, description="serve the N highest loadable versions")
    all: bool = False
    specific: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_choice(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.all, self.specific is not None]
        if sum(chosen) != 1:
            raise ValueError("version_policy takes exactly one of latest, all, specific")
        return self

    def select(self, loadable: list[int]) -> list[int]:
        """The versions to serve, out of the ones that can be loaded (ascending)."""
        if self.all:
            return loadable
        if self.specific is not None:
            return [v for v in loadable if v in self.specific]
        return loadable[-self.latest :]


class ModelPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version_policy: VersionPolicy | None = None
    labels: dict[str, int] = Field(default_factory=dict)


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelPolicy] = Field(default_factory=dict)


def read_config(path: Path | None) -> ModelsConfig:
    """The model config file, or an empty one. A broken file raises ValueError naming it."""
    if path is None:
        return ModelsConfig()
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return ModelsConfig.model_validate(data or {})
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"model config {path}: {error}") from error


Fingerprint = tuple[tuple[str, int, int], ...]
"""(relative path, size, mtime in ns) of every file in a version folder."""


def fingerprint(version_dir: Path) -> Fingerprint | None:
    """What the folder holds now; None if it is gone or unreadable."""
    entries = []
    try:
        for root, _, files in os.walk(version_dir, onerror=_raise):
            for name in files:
                stat = os.stat(os.path.join(root, name))
                entries.append((os.path.relpath(os.path.join(root, name), version_dir), stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(entries))


def _raise(error: OSError) -> None:
    raise error


def looks_complete(prints: Fingerprint) -> bool:
    names = {entry[0] for entry in prints}
    return all(name in names for name in REQUIRED_FILES)


@dataclass
class ScannedModel:
    name: str
    folders: dict[int, Fingerprint] = field(default_factory=dict)
    """Every version folder present, with what it holds."""
    policy: VersionPolicy = field(default_factory=lambda: VersionPolicy(latest=1))
    labels: dict[str, int] = field(default_factory=dict)


def scan(repository: Path, config: ModelsConfig, default_policy: VersionPolicy) -> dict[str, ScannedModel]:
    """Every model folder of the repository with its version folders' fingerprints."""
    found: dict[str, ScannedModel] = {}
    try:
        names = artifact.model_names(repository)
    except OSError as error:
        _unreadable(str(repository), str(error))
        return found
    for name in names:
        policy = config.models.get(name, ModelPolicy())
        model = ScannedModel(name, policy=policy.version_policy or default_policy, labels=dict(policy.labels))
        for version in _versions(repository / name):
            prints = fingerprint(repository / name / str(version))
            if prints is not None:
                model.folders[version] = prints
        found[name] = model
    return found


@cache
def _unreadable(repository: str, error: str) -> None:
    """Said once per repository and error, not at every rescan."""
    log.error("cannot read the model repository %s (%s); serving what is loaded, rescanning", repository, error)


def _versions(model_dir: Path) -> list[int]:
    try:
        return artifact.versions(model_dir)
    except OSError:
        return []
