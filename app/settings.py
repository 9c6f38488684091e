"""Service configuration, read from ``DROPOUT_SERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DROPOUT_SERVE_")

    model_dir: Path = Field(Path("artifacts"), description="model repository (training/artifact.py layout)")
    default_model: str | None = Field(None, description="model used when a request names none")
    load_all_versions: bool = Field(False, description="serve every version, not only the latest")
    host: str = "0.0.0.0"
    port: int = 8000
    max_instances: int = Field(1024, ge=1, description="instances per request")
    max_samples: int = Field(10_000, ge=1, description="MC samples T per request")
    default_samples: int = Field(100, ge=1)
    max_mc_rows: int = Field(200_000, ge=1, description="T x instances per MC request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request body size")
