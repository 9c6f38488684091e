"""OpenAPI documentation of the v2 routes: response models, and the request body's JSON schema.

Requests are parsed by ``app.protocols.v2_codec`` (the binary extension puts raw bytes after the
JSON, which no JSON schema describes), so these models only document; they are not used to
validate at request time.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.protocols.v2_codec import DATATYPES
from app.schemas import DIGIT_ZERO, ProtocolError


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="binary_tensor_data, model_repository, mc_dropout (this server's)")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch axis")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions that serve now")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata] = Field(description="the inference-mode output; MC outputs are listed in parameters")
    parameters: dict[str, Any] = Field(
        description="task, mc_dropout (whether the version has the MC signature), mc_dropout_outputs (comma-separated)"
    )


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ResponseTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="row-major, flat; absent when sent as binary")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the tensor follows as binary")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it has one")
    parameters: dict[str, Any] | None = Field(None, description="with mc_dropout: the samples and seed used")
    outputs: list[ResponseTensor]


class RepositoryModel(BaseModel):
    name: str
    version: str | None = Field(None, description="absent for a model the registry does not track (unloaded)")
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str = Field(description="why a version is not ready, e.g. its load error")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolError, "description": "malformed request, named in 'error'"},
    404: {"model": ProtocolError, "description": "unknown model or version"},
}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    415: {"model": ProtocolError, "description": "a Content-Encoding other than gzip or deflate"},
}

_PARAMETERS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
_INPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "description": "the model's input name (GET /v2/models/{name}), e.g. 'inputs'"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "data": {"type": "array", "description": "row-major values, flat or nested; absent if binary"},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "description": "bytes after the JSON header"}},
        },
    },
}
_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
    },
}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the response"},
        "parameters": {
            **_PARAMETERS,
            "properties": {
                "mc_dropout": {"type": "boolean", "description": "Monte-Carlo dropout summaries instead of outputs"},
                "samples": {"type": "integer", "minimum": 1, "description": "T (default: the service's)"},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "description": "default: fresh"},
                "binary_data_output": {"type": "boolean", "description": "all outputs as binary data"},
            },
        },
        "inputs": {"type": "array", "minItems": 1, "items": _INPUT},
        "outputs": {"type": "array", "items": _OUTPUT},
    },
}
INFER_OPENAPI = {
    "responses": {
        "200": {
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "when an output asks for binary_data: the JSON header (its length in the "
                    "Inference-Header-Content-Length header), then each binary output's bytes",
                }
            }
        }
    },
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": INFER_REQUEST,
                "examples": {
                    "inference": {
                        "value": {
                            "inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]
                        }
                    },
                    "mc_dropout": {
                        "value": {
                            "id": "zero-1",
                            "parameters": {"mc_dropout": True, "samples": 100, "seed": 42},
                            "inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}],
                        }
                    },
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: the JSON header (its length in the "
                "Inference-Header-Content-Length header), then each binary input's bytes",
            },
        },
    },
}
