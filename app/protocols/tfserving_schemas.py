"""The TF Serving REST door's documented shapes: its answers and errors for the OpenAPI document.

The routes read and write bodies themselves (the lean path); these models only describe them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.schemas import DIGIT_ZERO, ProtocolError

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolError, "description": "invalid argument (TF Serving's INVALID_ARGUMENT), named in 'error'"},
    404: {"model": ProtocolError, "description": "unknown model, version or label"},
}

PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    413: {"model": ProtocolError, "description": "the body is larger than DROPOUT_SERVE_MAX_BODY_BYTES"},
}


class VersionStatus(BaseModel):
    version: str
    state: str = Field(description="LOADING, AVAILABLE, UNLOADING or END")
    status: dict[str, str] = Field(description="error_code (OK, or UNKNOWN for a failed load) and error_message")


class ModelStatus(BaseModel):
    model_version_status: list[VersionStatus]


class ModelMetadata(BaseModel):
    model_spec: dict[str, str] = Field(description="name, signature_name, version")
    metadata: dict[str, Any] = Field(description="signature_def: the SavedModel's SignatureDefs")


class Prediction(BaseModel):
    predictions: list[Any] | None = Field(None, description="row format: one entry per instance")
    outputs: Any = Field(None, description="columnar format (and mc_dropout): the output tensor")


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "signature_name": {"type": "string", "enum": ["serving_default", "mc_dropout"]},
                        "instances": {"type": "array", "minItems": 1, "items": {}},
                        "inputs": {},
                    },
                    "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
                },
                "example": {"instances": [DIGIT_ZERO]},
            }
        },
    }
}
