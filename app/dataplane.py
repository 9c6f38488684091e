"""The one data plane every door calls: a request in, a result out, the same meaning everywhere.

A door (native, TF Serving REST, v2 REST, the gRPC doors) decodes its wire format into an
``InferRequest``, awaits ``DataPlane.infer`` and encodes the ``InferResult``; it never touches the
registry, the limits or the runner. ``infer`` owns, in this order: the MC switch (a server-wide
policy, so a 403 before the model is looked up, from every door), the registry lease, the rows
(``app.rows``: count, shape, finite numbers), the MC limits and seed, the run, the summary and
the request's record for logs and metrics. Errors are ``ApiError`` with HTTP statuses as the one
meaning (``app.errors.GRPC_STATUS`` maps them for gRPC).

The MC path is two steps, easy to extend: ``_sample`` runs the draws, then (in the MC worker thread)
``Summarizer`` summarizes them and answers their conformal sets, abstention or intervals (batched MC requests
together), and ``_answer`` builds each request's result.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from app import rows as row_checks
from app.context import RequestRecord
from app.errors import ApiError
from app.loading import ServedModel
from app.metrics import observe_mc
from app.monte_carlo import AUTO, MonteCarlo, monte_carlo
from app.registry import Registry, VersionStatus
from app.schemas import SEED_MAX
from app.settings import Settings
from app.summaries import (
    Answered,
    ConformalAnswer,
    Settled,
    Settler,
    Summarizer,
    Summary,
    conformal_answer,
    merge,
    output_names,
    summarize,
)
from training import adaptive, artifact, signatures
from training.draws import Segment

__all__ = ["SEED_MAX", "DataPlane", "InferRequest", "InferResult", "MonteCarlo", "RepositoryEntry", "monte_carlo"]


@dataclass(slots=True)
class InferRequest:
    rows: np.ndarray | list
    """A numeric array ``[N, *input_shape]`` (typed tensors) or the JSON list of instances."""
    model: str | None = None
    """None: the default model."""
    version: int | None = None
    label: str | None = None
    """A version label (TF Serving's ``labels/{l}``, ``version_label``)."""
    mc: MonteCarlo | None = None
    """None: inference mode (dropout off)."""
    where: str = "instances"
    """How error messages name the rows: ``instances``, ``input 'inputs'``."""
    request_id: str | None = None
    """For doors outside the HTTP middleware (gRPC)."""
    input_name: str | None = None
    """The input a tensor request names; checked against the model's. None: the door has no names."""
    outputs: list[str] | None = None
    """Output tensors asked for (by ``summaries.output_names``); None: all."""
    booleans: bool = True
    """Whether JSON rows may hold true/false (NumPy would read them as numbers); False skips a check."""
    record: RequestRecord | None = None
    """The HTTP request's record (``app.context``): filled with model, version, instances and T."""
    encode: Callable[[InferResult], Any] | None = None
    """An MC answer's encoder, run in the MC worker thread beside the summary (its value: ``encoded``)."""


@dataclass(slots=True)
class InferResult:
    model: ServedModel
    outputs: np.ndarray | None = None
    """Inference mode: ``[N, *output_shape]``."""
    summary: Summary | None = None
    """MC: the per-instance summaries."""
    samples: int | None = None
    seed: int | None = None
    draws: signatures.Samples | None = None
    """MC with ``return_samples``: the raw draws."""
    conformal: ConformalAnswer | None = None
    """MC of a version with a usable conformal calibration: sets and abstention, or intervals."""
    encoded: Any = None
    """What the request's ``encode`` made of this result, if it had one."""
    samples_used: np.ndarray | None = None
    """MC with ``samples: "auto"``: each instance's T (``samples`` is then the largest)."""
    tolerance: float | None = None
    """MC with ``samples: "auto"``: the tolerance that settled the answers."""


@dataclass(slots=True, frozen=True)
class RepositoryEntry:
    name: str
    version: int | None
    state: str
    """The registry's state (START, LOADING, AVAILABLE, UNLOADING, END), or UNAVAILABLE when not tracked."""
    reason: str


class DataPlane:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self._registry = registry

    async def infer(self, request: InferRequest) -> InferResult:
        settings, mc, record = self.settings, request.mc, request.record
        if mc is not None and not settings.mc_dropout_enabled:
            raise ApiError(
                403,
                "Monte-Carlo dropout is switched off on this server (DROPOUT_SERVE_MC_DROPOUT_ENABLED=false); "
                "use inference-mode prediction",
            )
        with self._registry.lease(request.model, request.version, request.label) as model:
            if record is not None:
                record.model, record.version = model.name, model.version
            if request.input_name is not None and request.input_name != model.input_key:
                raise ApiError(
                    422,
                    f"model {model.name!r} version {model.version} takes one input, {model.input_key!r}; "
                    f"got {request.input_name!r}",
                )
            batch = row_checks.to_batch(
                request.rows,
                model.input_shape,
                settings.max_instances,
                request.where,
                request.booleans,
                f"model {model.name!r} version {model.version}",
            )
            if record is not None:
                record.instances = len(batch)
            if request.outputs is not None:
                auto = mc is not None and mc.samples == AUTO
                _check_outputs(request.outputs, output_names(model, mc is not None, auto), mc is not None)
            if mc is None:
                return InferResult(model, await model.runner.predict(batch))
            samples = self._check_mc(model, len(batch), mc)
            seed = secrets.randbits(63) if mc.seed is None else mc.seed
            if mc.samples == AUTO:
                tolerance = settings.auto_tolerance if mc.tolerance is None else mc.tolerance
                result = await _sample_auto(model, batch, samples, seed, tolerance, mc, request.encode)
            else:
                result = await self._sample(model, batch, samples, seed, mc, request.encode)
            if record is not None:
                record.samples = result.samples
            return result

    def _check_mc(self, model: ServedModel, count: int, mc: MonteCarlo) -> int:
        """T for an MC request of ``count`` instances (with "auto": the most it may take), or a 422 saying
        which limit it breaks."""
        settings = self.settings
        if mc.samples == AUTO:
            if mc.return_samples:
                raise ApiError(422, 'return_samples: not with samples "auto" (each instance stops at its own T)')
            if model.task is None and model.mc_dropout is not None:
                raise ApiError(
                    422,
                    f'samples: "auto" needs a classification or regression model; {model.name!r} version '
                    f"{model.version} has no task in its metadata",
                )
            limit = max(settings.max_mc_rows // max(count, 1), 1)
            samples = min(settings.auto_max_samples, settings.max_samples, limit)
        else:
            samples = mc.samples or settings.default_samples
        if samples > settings.max_samples:
            raise ApiError(422, f"samples: {samples} asked, at most {settings.max_samples} (DROPOUT_SERVE_MAX_SAMPLES)")
        if samples * count > settings.max_mc_rows:
            raise ApiError(
                422,
                f"samples x instances = {samples * count}, at most {settings.max_mc_rows} per request "
                "(DROPOUT_SERVE_MAX_MC_ROWS); send fewer instances or samples",
            )
        if model.mc_dropout is None:
            raise ApiError(
                422,
                f"model {model.name!r} version {model.version} has no mc_dropout signature "
                "(it was not exported with dropout layers); use inference-mode prediction",
            )
        if mc.return_samples:
            outputs = math.prod(model.output_shape)
            values = samples * count * outputs
            if values > settings.max_return_values:
                raise ApiError(
                    422,
                    f"return_samples: samples x instances x outputs = {samples} x {count} x {outputs} "
                    f"= {values} values, at most {settings.max_return_values} (DROPOUT_SERVE_MAX_RETURN_VALUES); "
                    "ask for fewer samples or instances, or leave return_samples off",
                )
        return samples

    @staticmethod
    async def _sample(
        model: ServedModel, batch: np.ndarray, samples: int, seed: int, mc: MonteCarlo, encode: Callable | None
    ) -> InferResult:
        answer = partial(_answer, model, samples, seed, mc, encode)
        segment, summarizer = Segment(batch, seed, 0, samples), Summarizer(model, mc.alpha, mc.risk)
        if model.runner.batches_mc and not mc.return_samples:  # (return_samples: mc_dropout's own outputs)
            return await model.runner.draw(segment, answer, summarizer)

        def alone(draws: signatures.Samples) -> InferResult:
            return answer(summarizer([segment], [draws])[0], draws)

        return await model.runner.sample(batch, samples, seed, alone)

    # -- metadata and control: each door only encodes these -----------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Whether the default model serves."""
        return self._registry.ready()

    @property
    def default(self) -> str | None:
        return self._registry.default

    def names(self) -> list[str]:
        """Models with a version that serves."""
        return self._registry.names()

    def loaded(self) -> int:
        """Versions that serve, over every model."""
        return len(self._registry)

    def model(self, name: str | None, version: int | None = None, label: str | None = None) -> ServedModel:
        """A serving version's facts (not for running it: ``infer`` does that); 404 if none."""
        name, version = self._registry.resolve(name, version, label)
        return self._registry.versions(name)[version]

    def versions(self, name: str) -> dict[int, ServedModel]:
        """The serving versions of ``name``; 404 if none."""
        return self._registry.versions(name)

    def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether ``name`` (that version, if given) serves; 404 if the model is unknown."""
        serving = [s.version for s in self._registry.status(name) if s.state == "AVAILABLE"]
        return version in serving if version is not None else bool(serving)

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """Every tracked version's state (that version's, or the label's); 404 if unknown."""
        statuses = self._registry.status(name)
        if label is not None:
            _, version = self._registry.resolve(name, label=label)
        if version is not None:
            statuses = [s for s in statuses if s.version == version]
            if not statuses:
                raise ApiError(404, f"model {name!r} has no version {version}")
        return statuses

    def labels(self, name: str) -> dict[str, int]:
        return self._registry.labels(name)

    def index(self, ready_only: bool) -> list[RepositoryEntry]:
        """Every model of the repository; one entry per tracked version, or one without a version."""
        tracked = self._registry.known()
        entries = []
        for name in sorted(set(tracked) | set(artifact.model_names(self.settings.model_dir))):
            if name not in tracked:
                if not ready_only:
                    entries.append(RepositoryEntry(name, None, "UNAVAILABLE", "not loaded"))
                continue
            for status in self._registry.status(name):
                if not ready_only or status.state == "AVAILABLE":
                    entries.append(RepositoryEntry(name, status.version, status.state, status.error or ""))
        return entries

    def load(self, name: str) -> None:
        """Serve ``name`` again and load it now (blocking: call off the event loop); 400 if no version loads."""
        self._check_model_control("load")
        self._registry.load_model(name)
        statuses = self._registry.status(name)
        if not any(s.state == "AVAILABLE" for s in statuses):
            errors = "; ".join(f"version {s.version}: {s.error}" for s in statuses if s.error) or "no loadable version"
            raise ApiError(400, f"failed to load {name!r}: {errors}")

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (in-flight requests finish) until it is loaded again."""
        self._check_model_control("unload")
        self._registry.unload_model(name)

    def _check_model_control(self, action: str) -> None:
        if self.settings.model_control != "explicit":
            raise ApiError(
                403,
                f"model control is off: clients cannot {action} models on this server "
                "(DROPOUT_SERVE_MODEL_CONTROL=explicit allows it); the repository decides what serves",
            )


def _check_outputs(asked: list[str], names: list[str], mc: bool) -> None:
    for name in asked:
        if name not in names:
            kind = "an MC-dropout" if mc else "an inference"
            raise ApiError(422, f"unknown output {name!r}; {kind} request has: {', '.join(names)}")


def _answer(
    model: ServedModel,
    samples: int,
    seed: int,
    mc: MonteCarlo,
    encode: Callable[[InferResult], Any] | None,
    answered: Answered,
    draws: signatures.Samples | None = None,
) -> InferResult:
    """The result of a fixed-T request from its summary and conformal answer (``Summarizer``)."""
    summary, conformal = answered
    result = InferResult(model, None, summary, samples, seed, draws if mc.return_samples else None, conformal)
    if encode is not None:
        result.encoded = encode(result)
    return result


async def _sample_auto(
    model: ServedModel,
    batch: np.ndarray,
    maximum: int,
    seed: int,
    tolerance: float,
    mc: MonteCarlo,
    encode: Callable | None,
) -> InferResult:
    """``samples: "auto"``: rounds of stretches (``training.adaptive``) until every instance is settled or at
    ``maximum``, each round's stretches batched with other requests'. Every stretch's errors and summary are
    computed beside the other requests' in its call (``Settler``, on the draws so far: a stretch comes back
    after its ``earlier`` ones) and what they decide is worked out in the MC worker thread; so is the answer,
    by the request's last stretch, or after the last round if it had several."""
    error = adaptive.error_function(model.task, model.tau, model.predictive_temperature)
    sampler = adaptive.Adaptive(batch, seed, error, tolerance, maximum)
    answer = partial(_finish_auto, model, batch, seed, tolerance, mc, sampler, encode)
    settler = Settler(model, mc.alpha, mc.risk)
    while stretches := sampler.pending():
        alone = len(stretches) == 1
        rounds = [partial(_auto_round, sampler, i, alone, answer) for i in range(len(stretches))]
        if alone:  # the common case: awaited as is, without the task and future gather adds (~7 µs a round)
            steps = [await model.runner.draw(stretches[0], rounds[0], settler)]
        else:
            steps = await asyncio.gather(*map(model.runner.draw, stretches, rounds, [settler] * len(stretches)))
        if isinstance(steps[0], InferResult):
            return steps[0]
        sampler.advance(steps)
    return await model.runner.in_mc_pool(answer)


def _auto_round(
    sampler: adaptive.Adaptive,
    index: int,
    alone: bool,
    answer: Callable[..., InferResult],
    settled: Settled,
) -> adaptive.Step | InferResult:
    """In the worker thread: the stretch's step; the whole answer if this was the request's last stretch (with
    the stretch's summary and conformal answer when its instances are all of them, stopping together)."""
    drawn, summary, errors, conformal = settled
    step = sampler.step(index, drawn, errors)
    if not alone or step.active:
        return step
    sampler.advance([step])
    return answer((summary, conformal) if len(sampler.finished) == 1 else None)


def _finish_auto(
    model: ServedModel,
    batch: np.ndarray,
    seed: int,
    tolerance: float,
    mc: MonteCarlo,
    sampler: adaptive.Adaptive,
    encode: Callable[[InferResult], Any] | None,
    answered: Answered | None = None,
) -> InferResult:
    """The answer; ``answered``: the summary and conformal answer of every instance, already made (``Settler``)
    when they all stopped at once."""
    count = len(batch)
    used = np.empty(count, np.int64)
    for rows, draws in sampler.finished:
        used[rows] = draws.outputs.shape[0]
    samples = int(used.max())
    if answered is None:
        summary = merge([(rows, summarize(model, draws)) for rows, draws in sampler.finished], count)
        conformal = conformal_answer(model, summary, batch, seed, samples, mc.alpha, mc.risk)
    else:
        summary, conformal = answered
        observe_mc(model.name, model.version, model.task, summary)
    result = InferResult(model, None, summary, samples, seed, None, conformal, samples_used=used, tolerance=tolerance)
    if encode is not None:
        result.encoded = encode(result)
    return result
