"""The live model registry: memory made to match the repository, one version at a time.

TF Serving's servable lifecycle is the model. A background thread rescans the repository
(``app.repository``) every ``poll_seconds``; a new version is loaded and warmed up while the
old ones keep serving, then swapped in under a lock. A version that leaves the version policy
is retired: new requests stop reaching it at once, and it is unloaded (state ``END``) when its
last in-flight request, which holds a :meth:`Registry.lease`, ends.

Rules that keep traffic flowing:

- a version folder is loaded only when it holds a SavedModel and its files have not changed
  for ``SETTLE_SECONDS`` (a folder still being copied in is left alone until it settles);
- a version that fails to load keeps its error in :meth:`Registry.status`, is logged once and is
  retried only when its files change; the policy then picks from the versions that do load;
- the versions that serve are replaced only once a replacement is available (availability
  first), except when the model's folder is gone, which stops the model.

After a scan that loaded or dropped a model, the survivors are frozen out of garbage collection
(``app.memory``), so the collector's full passes do not walk the models while requests wait.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app import memory, metrics, repository
from app.errors import ApiError
from app.loading import ServedModel, load_version
from app.runner import Runtime
from app.settings import Settings
from training import artifact

log = logging.getLogger("dropout_serve")

State = Literal["START", "LOADING", "AVAILABLE", "UNLOADING", "END"]
SETTLE_SECONDS = 2.0
"""A version folder is loaded once its files have not changed for this long."""


@dataclass
class VersionStatus:
    version: int
    state: State
    error: str | None = None


@dataclass(eq=False)
class _Version:
    version: int
    state: State
    model: ServedModel | None = None
    error: str | None = None
    failed_prints: repository.Fingerprint | None = None
    leases: int = 0


class Registry:
    """Models by name and version; answers requests from the versions that are AVAILABLE."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self._settings = settings
        self._owns_runtime = runtime is None
        self._runtime = runtime or Runtime(settings)
        """Gives every version its runner as it loads (``app.runner``); closed here if made here."""
        self._default_policy = repository.VersionPolicy(
            **({"all": True} if settings.load_all_versions else {"latest": settings.latest_versions})
        )
        self._lock = threading.RLock()  # reentrant: lease() resolves under it
        self._models: dict[str, dict[int, _Version]] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._serving: dict[str, dict[int, _Version]] = {}
        """The AVAILABLE versions by model: what requests resolve against, rebuilt on every change."""
        self._default_name: str | None = settings.default_model
        """The default model, fixed once: the configured one, else the first by name at start-up (or,
        with none at start-up, the first to load). It never moves when other models come and go."""
        self._default: str | None = None
        """``_default_name`` while it serves, else None (readiness 503)."""
        self._seen: dict[tuple[str, int], tuple[repository.Fingerprint, float]] = {}
        """Each version folder's contents at the last scan, and since when they have been so."""
        self._unloaded: set[str] = set()
        self._first_scan = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        self._changes = 0
        """Counts models loaded, failed or dropped; ``sync`` refreezes memory when it moved."""
        self._frozen_at = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load what the repository holds now, then keep watching it in the background."""
        self.sync()
        if self._settings.poll_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="model-repository", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._owns_runtime:
            self._runtime.close()

    def _watch(self) -> None:
        while not self._stop.wait(self._settings.poll_seconds):
            try:
                self.sync()
            except Exception:  # the watcher must outlive any surprise in one scan
                log.exception("model repository scan failed; retrying at the next poll")

    def sync(self) -> None:
        """One pass: scan the repository, load what the policy wants, retire what it no longer does."""
        with self._sync_lock:
            config = repository.read_config(self._settings.models_config)
            scanned = repository.scan(self._settings.model_dir, config, self._default_policy)
            for name in set(self._models) - set(scanned):
                self._retire_model(name, "its folder is gone")
            for name, found in sorted(scanned.items()):
                if name in self._unloaded:
                    continue
                self._sync_model(found)
            if self._default_name is None and self._serving:
                with self._lock:
                    self._default_name = min(self._serving)
                    self._refresh()
                log.info("default model: %s (the first by name when it was chosen; it stays)", self._default_name)
            elif self._first_scan and self._default_name not in self._serving and self._default_name is not None:
                log.warning(
                    "the default model %r (DROPOUT_SERVE_DEFAULT_MODEL) does not serve; readiness answers 503 "
                    "until it does",
                    self._default_name,
                )
            self._first_scan = False
            if self._changes != self._frozen_at:
                self._frozen_at = self._changes
                log.debug("froze the loaded models out of garbage collection in %.2f s", memory.freeze_survivors())

    def _stable(self, name: str, version: int, prints: repository.Fingerprint) -> bool:
        """Complete, and unchanged for SETTLE_SECONDS: a folder being copied in changes meanwhile."""
        now = time.time()
        previous, since = self._seen.get((name, version), (None, now))
        if previous != prints:
            since = now
            if self._first_scan:  # files already this old when the server started count as settled
                since = min(now, max((entry[2] for entry in prints), default=0) / 1e9)
        self._seen[(name, version)] = (prints, since)
        if not repository.looks_complete(prints):
            return False
        return self._settings.poll_seconds == 0 or now - since >= SETTLE_SECONDS

    def _sync_model(self, found: repository.ScannedModel) -> None:
        name = found.name
        with self._lock:
            versions = self._models.setdefault(name, {})
            self._labels[name] = found.labels
        loadable = []
        for version, prints in sorted(found.folders.items()):
            entry = versions.get(version)
            if (entry is not None and entry.state == "AVAILABLE") or (
                self._stable(name, version, prints) and (entry is None or entry.failed_prints != prints)
            ):
                loadable.append(version)
        pending = True
        while pending:  # a version that fails to load makes room for the next one the policy picks
            pending = False
            for version in found.policy.select(loadable):
                entry = versions.get(version)
                idle = entry is None or entry.state not in ("AVAILABLE", "LOADING")
                if idle and not self._load(name, version, found.folders[version]):
                    loadable.remove(version)
                    pending = True
        serving = [v for v, e in versions.items() if e.state == "AVAILABLE"]
        wanted = set(found.policy.select([v for v in loadable if v in serving]))
        if wanted:
            for version in serving:
                if version not in wanted:
                    self._retire(name, version, "left the version policy")
        for version in list(versions):
            if version not in found.folders and versions[version].state != "AVAILABLE":
                self._forget_if_done(name, version)

    def _load(self, name: str, version: int, prints: repository.Fingerprint) -> bool:
        entry = _Version(version, "LOADING")
        with self._lock:
            self._models[name][version] = entry
        started = time.monotonic()
        try:
            model = load_version(name, self._settings.model_dir / name / str(version), self._runtime)
        except Exception as error:  # any failure of a SavedModel load is the version's status, not ours
            with self._lock:  # lease() counts changes from request threads
                self._changes += 1
            entry.state, entry.error, entry.failed_prints = "END", _describe(error), prints
            log.error("could not load %s version %d: %s", name, version, entry.error)
            metrics.model_load_failed(name, version)
            return False
        with self._lock:
            entry.model, entry.state = model, "AVAILABLE"
            self._refresh()
            self._changes += 1
        log.info("loaded %s version %d in %.1f s", name, version, time.monotonic() - started)
        metrics.model_loaded(name, version, time.monotonic() - started)
        return True

    def _retire(self, name: str, version: int, why: str) -> None:
        with self._lock:
            entry = self._models[name][version]
            entry.state = "UNLOADING"
            self._refresh()
            done = entry.leases == 0
            if done:
                entry.state, entry.model = "END", None
                self._changes += 1
        log.info("retiring %s version %d (%s)%s", name, version, why, "" if done else "; draining")
        metrics.model_unloaded(name, version)

    def _retire_model(self, name: str, why: str) -> None:
        for version, entry in list(self._models.get(name, {}).items()):
            if entry.state == "AVAILABLE":
                self._retire(name, version, why)
        with self._lock:
            if all(e.state == "END" for e in self._models.get(name, {}).values()):
                self._models.pop(name, None)
                self._labels.pop(name, None)

    def _refresh(self) -> None:
        """Rebuild what requests resolve against; called under the lock when a version starts or stops."""
        serving = {name: {v: e for v, e in vs.items() if e.state == "AVAILABLE"} for name, vs in self._models.items()}
        self._serving = {name: vs for name, vs in serving.items() if vs}
        was, self._default = self._default, self._default_name if self._default_name in self._serving else None
        if was is None and self._default is not None and not self._first_scan:
            log.info("the default model %r serves; ready", self._default)
        elif was is not None and self._default is None:
            log.warning("the default model %r no longer serves; readiness answers 503", was)

    def _forget_if_done(self, name: str, version: int) -> None:
        with self._lock:
            entry = self._models[name].get(version)
            if entry is not None and entry.state == "END" and entry.leases == 0:
                del self._models[name][version]
                self._seen.pop((name, version), None)

    # -- repository extension (explicit load / unload of a whole model) -------------------------

    def unload_model(self, name: str) -> None:
        self.versions(name)
        with self._sync_lock:
            self._unloaded.add(name)
            self._retire_model(name, "unloaded on request")

    def load_model(self, name: str) -> None:
        """Serve ``name`` again (after :meth:`unload_model`) and load it now."""
        if name not in artifact.model_names(self._settings.model_dir):
            raise ApiError(404, f"no model {name!r} in the repository")
        with self._sync_lock:
            self._unloaded.discard(name)
        self.sync()

    # -- reading -----------------------------------------------------------------------------

    @property
    def default(self) -> str | None:
        """The default model's name, whether it serves now or not."""
        return self._default_name

    def names(self) -> list[str]:
        """Models with at least one AVAILABLE version."""
        return sorted(self._serving)

    def known(self) -> list[str]:
        """Every model the registry tracks, serving or not."""
        with self._lock:
            return sorted(self._models)

    def __len__(self) -> int:
        with self._lock:
            return sum(e.state == "AVAILABLE" for vs in self._models.values() for e in vs.values())

    def ready(self) -> bool:
        """Whether the default model serves."""
        return self._default is not None

    def versions(self, name: str) -> dict[int, ServedModel]:
        """The AVAILABLE versions of ``name``; 404 if it has none."""
        served = self._serving.get(name)
        if not served:
            raise ApiError(404, f"unknown model {name!r}; loaded models: {', '.join(self.names()) or 'none'}")
        return {v: e.model for v, e in served.items()}

    def status(self, name: str) -> list[VersionStatus]:
        with self._lock:
            entries = list(self._models.get(name, {}).values())
        if not entries:
            raise ApiError(404, f"unknown model {name!r}; loaded models: {', '.join(self.names()) or 'none'}")
        return [VersionStatus(e.version, e.state, e.error) for e in sorted(entries, key=lambda e: e.version)]

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._labels.get(name, {}))

    def resolve(self, name: str | None, version: int | None = None, label: str | None = None) -> tuple[str, int]:
        """The (model, version) a request means; 404 with a message naming what is missing."""
        if name is None:
            name = self._default_name
            if name is None or not self._serving:
                raise ApiError(404, "no models are loaded")
        served = self._serving.get(name)
        if not served:
            raise ApiError(404, f"unknown model {name!r}; loaded models: {', '.join(self.names()) or 'none'}")
        if label is not None:
            labels = self._labels.get(name, {})
            if label not in labels:
                raise ApiError(404, f"model {name!r} has no version label {label!r}; labels: {sorted(labels)}")
            version = labels[label]
            if version not in served:
                raise ApiError(404, f"label {label!r} of model {name!r} names version {version}, which is not loaded")
        if version is None:
            return name, max(served)
        if version not in served:
            loaded = ", ".join(str(v) for v in sorted(served))
            raise ApiError(404, f"model {name!r} has no loaded version {version}; loaded: {loaded}")
        return name, version

    def lease(self, name: str | None, version: int | None = None, label: str | None = None) -> _Lease:
        """The model a request means (``with registry.lease(...) as model``), held until the request
        ends so it is not unloaded under it."""
        with self._lock:  # resolving and counting in one step, so a swap cannot slip in between
            name, version = self.resolve(name, version, label)
            entry = self._serving[name][version]
            entry.leases += 1
            return _Lease(self, name, entry, entry.model)

    def _release(self, name: str, entry: _Version) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.state == "UNLOADING" and entry.leases == 0:
                entry.state, entry.model = "END", None
                self._changes += 1
                log.info("unloaded %s version %d", name, entry.version)

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """The model without a lease: for reading metadata, not for running it."""
        name, version = self.resolve(name, version)
        return self.versions(name)[version]


class _Lease:
    """One request's hold on a version (a class, not ``@contextmanager``: every request takes one)."""

    __slots__ = ("_entry", "_model", "_name", "_registry")

    def __init__(self, registry: Registry, name: str, entry: _Version, model: ServedModel) -> None:
        self._registry, self._name, self._entry, self._model = registry, name, entry, model

    def __enter__(self) -> ServedModel:
        return self._model

    def __exit__(self, *exc_info: object) -> None:
        self._registry._release(self._name, self._entry)


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = next((line for line in text if line.strip()), type(error).__name__)
    return f"{type(error).__name__}: {first[:500]}"


def start_registry(settings: Settings, runtime: Runtime) -> Registry:
    registry = Registry(settings, runtime)
    registry.start()
    if not len(registry):
        log.warning("no loadable model in %s; /health/ready answers 503", Path(settings.model_dir).resolve())
    return registry
