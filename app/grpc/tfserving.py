"""TensorFlow Serving's gRPC API: ``PredictionService`` (Predict, GetModelMetadata) and ``ModelService``
(GetModelStatus), so ``tensorflow_serving.apis`` clients point at this port as at TF Serving's 8500.

Messages and servicer bases are those ``tensorflow-serving-api`` ships. ``model_spec`` picks the
version (``version``) or a label (``version_label``), else the latest. Predict runs
``serving_default`` (one input, named by the model's input key) or, with ``signature_name:
"mc_dropout"``, the artifact's MC signature with its ``inputs``, ``samples`` and ``seed`` tensors,
answering its raw samples ``[T, N, ...]`` (with ``variance`` and a calibrated classifier's
``predictive``), as the REST door and TF Serving itself answer that SavedModel. Classify, Regress
and MultiInference take ``tf.Example`` protos, which these models do not read: UNIMPLEMENTED.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from app.dataplane import DataPlane, InferRequest, InferResult, monte_carlo
from app.errors import ApiError
from app.grpc import tensors
from app.grpc.server import Server, current_record
from app.loading import ServedModel
from training import artifact

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
_OK, _UNKNOWN = 0, 2  # tensorflow.error.Code
_MC_INPUTS = (artifact.INPUTS_KEY, artifact.SAMPLES_KEY, artifact.SEED_KEY)


def _spec(spec: Any) -> tuple[str, int | None, str | None]:
    """Model name, and version or label (one ``oneof``) of a ``ModelSpec``; neither means the latest."""
    if not spec.name:
        raise ApiError(400, "model_spec.name is required")
    version = spec.version.value if spec.HasField("version") else None
    return spec.name, version, spec.version_label or None


@cache
def _signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SavedModel's SignatureDefs, as TF Serving lists them (without internal ``__`` ones)."""
    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    return {key: defs[key] for key in defs if not key.startswith("__")}


def _scalar(proto: Any, name: str) -> Any:
    """An integer tensor of one value as an int; anything else as a short description for the error."""
    array = tensors.from_tensor_proto(proto, f"inputs[{name!r}]")
    if array.size == 1 and array.dtype.kind in "iu":
        return int(array.reshape(-1)[0])
    return f"a {array.dtype} tensor of shape {list(array.shape)}"


def _draws(result: InferResult) -> dict[str, Any]:
    """The mc_dropout signature's outputs as TensorProtos, built in the MC worker thread."""
    draws = result.draws
    named = {
        artifact.OUTPUTS_KEY: draws.outputs,
        artifact.VARIANCE_KEY: draws.variance,
        artifact.PREDICTIVE_KEY: draws.predictive,
    }
    return {key: tensors.to_tensor_proto(value) for key, value in named.items() if value is not None}


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        name, version, label = _spec(request.model_spec)
        signature = request.model_spec.signature_name or artifact.SERVING_SIGNATURE
        call = InferRequest([], name, version, label, record=current_record())
        if signature == artifact.SERVING_SIGNATURE:
            if len(request.inputs) != 1:
                raise ApiError(400, f"signature 'serving_default' takes one input; got {sorted(request.inputs)}")
            ((key, proto),) = request.inputs.items()
            call.where, call.input_name = f"inputs[{key!r}]", key
            call.rows = tensors.from_tensor_proto(proto, call.where)
            result = await self.plane.infer(call)
            outputs = {result.model.output_key: tensors.to_tensor_proto(result.outputs)}
        elif signature == artifact.MC_SIGNATURE:
            if set(request.inputs) != set(_MC_INPUTS):
                raise ApiError(
                    400, f"signature 'mc_dropout' takes the inputs {list(_MC_INPUTS)}; got {sorted(request.inputs)}"
                )
            rows, samples, seed = (request.inputs[key] for key in _MC_INPUTS)
            call.where = "inputs['inputs']"
            call.rows = tensors.from_tensor_proto(rows, call.where)
            names = ("inputs['samples']", "inputs['seed']")
            call.mc = monte_carlo(_scalar(samples, "samples"), _scalar(seed, "seed"), return_samples=True, names=names)
            call.encode = _draws
            result = await self.plane.infer(call)
            outputs = result.encoded
        else:
            known = [artifact.SERVING_SIGNATURE, artifact.MC_SIGNATURE]
            raise ApiError(400, f"serving signature name {signature!r} not found; signatures served here: {known}")
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, result.model, signature)
        wanted = list(request.output_filter) or list(outputs)
        for key in wanted:
            if key not in outputs:
                raise ApiError(400, f"output_filter: {key!r} is not an output of {signature!r}; it has {list(outputs)}")
            response.outputs[key].CopyFrom(outputs[key])
        return response

    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        name, version, label = _spec(request.model_spec)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise ApiError(400, f"metadata_field must be ['signature_def'] (the only one served), got {fields}")
        model = self.plane.model(name, version, label)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, definition in _signature_defs(model.path).items():
            signatures.signature_def[key].CopyFrom(definition)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_spec(response.model_spec, model, "")
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every tracked version (that version's, or the label's): START to END, errors as UNKNOWN."""
        name, version, label = _spec(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for status in self.plane.status(name, version, label):
            entry = response.model_version_status.add(version=status.version, state=states.Value(status.state))
            entry.status.error_code = _UNKNOWN if status.error else _OK
            entry.status.error_message = status.error or ""
        return response


def _fill_spec(spec: Any, model: ServedModel, signature: str) -> None:
    spec.name = model.name
    spec.version.value = model.version
    spec.signature_name = signature


def register(server: Server, plane: DataPlane) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(plane), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(plane), server)
