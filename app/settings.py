"""Service configuration, read from ``DROPOUT_SERVE_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.adaptive import DEFAULT_MAXIMUM, DEFAULT_TOLERANCE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DROPOUT_SERVE_")

    model_dir: Path = Field(Path("artifacts"), description="model repository (training/artifact.py layout)")
    default_model: str | None = Field(None, description="model used when a request names none")
    load_all_versions: bool = Field(False, description="serve every version (version policy 'all' for every model)")
    latest_versions: int = Field(1, ge=1, description="default version policy: serve the latest N versions")
    models_config: Path | None = Field(
        None,
        validation_alias=AliasChoices("DROPOUT_SERVE_MODEL_CONFIG", "models_config"),
        description="optional JSON or YAML file: per-model version policy and labels (app/repository.py)",
    )
    poll_seconds: float = Field(2.0, ge=0, description="how often the repository is rescanned; 0 = never")
    host: str = Field("0.0.0.0", description="address the HTTP server listens on (python -m app)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (python -m app); 0 = any free port")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port (Open Inference Protocol v2, TF Serving, grpc.health.v1); 0 = off"
    )
    workers: int = Field(1, ge=1, description="server processes on one port (python -m app)")
    tf_threads: int = Field(
        1,
        ge=0,
        description="TensorFlow intra- and inter-op threads per call; 0 = TensorFlow's choice (all cores). "
        "One thread per call and several calls at once beat one call on every core (bench/mc_threads.py)",
    )
    max_batch_size: int = Field(32, ge=1, description="rows per batched inference call; 1 = no batching")
    batch_timeout_ms: float = Field(0.0, ge=0, description="extra wait for a batch to fill; 0 = adaptive only")
    mc_threads: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2), ge=1, description="concurrent MC-dropout calls per process"
    )
    max_instances: int = Field(1024, ge=1, description="instances per request")
    max_samples: int = Field(10_000, ge=1, description="MC samples T per request")
    default_samples: int = Field(100, ge=1, description="MC samples T when a request gives none")
    max_mc_rows: int = Field(200_000, ge=1, description="T x instances per MC request")
    mc_batch_rows: int = Field(
        4096,
        ge=1,
        description="instances x samples per MC call shared by concurrent requests (artifacts with "
        "mc_dropout_segments; a larger request runs alone)",
    )
    auto_tolerance: float = Field(
        DEFAULT_TOLERANCE, gt=0, le=1, description="samples 'auto': the Monte-Carlo standard error that settles it"
    )
    auto_max_samples: int = Field(
        DEFAULT_MAXIMUM, ge=1, description="samples 'auto': most samples per instance (and max_samples, max_mc_rows)"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request body size")
    log_format: Literal["text", "json"] = Field("text", description="one line per request, as text or JSON")
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys; when set, every route but health (and docs) needs one"
    )
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too (when keys are set)")
    mc_dropout_enabled: bool = Field(True, description="false answers the MC-dropout endpoint with 403")
    model_control: Literal["none", "explicit"] = Field(
        "none", description="explicit: clients may load and unload models (v2 repository API); none: 403, as Triton"
    )
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' for any); empty: CORS off")
    max_in_flight: int = Field(
        256, ge=1, description="requests in progress at once per worker; beyond it 503 + Retry-After"
    )
    request_timeout: float = Field(30.0, ge=0, description="seconds a request may take before a 504; 0: no limit")
    max_return_values: int = Field(
        100_000, ge=1, description="T x instances x outputs returned when return_samples is true"
    )
    access_log: bool = Field(True, description="one log line per request (off: e.g. benchmarks that compare servers)")
    keep_alive_seconds: float = Field(
        75.0, gt=0, description="idle connections are closed after this (python -m app); above any proxy's idle timeout"
    )

    def api_key_list(self) -> list[str]:
        """The configured keys; empty when access is open."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [key.strip() for key in raw.split(",") if key.strip()]

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
