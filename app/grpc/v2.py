"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService``, as Triton and KServe serve it.

The messages and servicer base are the ones ``tritonclient[grpc]`` generates and ships. The door
answers as the REST v2 door (``app.protocols.v2``) does: one input named by the model's input key,
inference answering its output key (FP32), Monte-Carlo dropout through the request
``parameters`` (``mc_dropout``, ``samples``, ``seed``, read by the same ``v2_parameters``) answering
the summaries (FP64) with T and the seed in the response parameters; the repository extension's
index, load and unload. Outputs always come back in ``raw_output_contents``, as from Triton.
ModelConfig, statistics, streaming and shared memory are not served (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio

from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.dataplane import DataPlane, InferRequest
from app.errors import ApiError
from app.grpc import tensors
from app.grpc.server import Server, current_record
from app.protocols.v2 import EXTENSIONS, PLATFORM, REPOSITORY_STATES
from app.protocols.v2_parameters import answer, input_name, mc_parameters

SERVICE = "inference.GRPCInferenceService"


def _version(text: str) -> int | None:
    """``model_version`` is a string; empty means the latest serving version."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ApiError(400, f"model_version must be a positive integer or empty, got {text!r}")
    return int(text)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, version: str) -> None:
        self.plane = plane
        self.version = version

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="dropout-serve", version=self.version, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Ready or not for a known model; NOT_FOUND for an unknown one, as the REST door's 404."""
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, _version(request.version)))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        model = self.plane.model(request.name, _version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(self.plane.versions(model.name))],
            platform=PLATFORM,
            inputs=[tensor(name=model.input_key, datatype="FP32", shape=[-1, *model.input_shape])],
            outputs=[tensor(name=model.output_key, datatype="FP32", shape=[-1, *model.output_shape])],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        inputs = tensors.v2_inputs(request)
        if len(inputs) != 1:
            got = ", ".join(repr(t.name) for t in inputs)
            raise ApiError(400, f"model {request.model_name!r} takes one input; got {got}")
        for index, output in enumerate(request.outputs):
            if "classification" in output.parameters:
                raise ApiError(400, f"outputs[{index}].parameters.classification: the extension is not supported")
        tensor = inputs[0]
        asked = [output.name for output in request.outputs] or None
        parameters = tensors.v2_parameters(request.parameters)
        result = await self.plane.infer(
            InferRequest(
                tensor.array,
                request.model_name,
                _version(request.model_version),
                mc=mc_parameters(parameters),
                where=f"input {tensor.name!r}",
                input_name=input_name(parameters, tensor.name),
                outputs=asked,
                record=current_record(),
            )
        )
        model = result.model
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        named, parameters, names = answer(result)
        tensors.set_v2_parameters(response.parameters, parameters)
        return tensors.v2_outputs(response, [(name, named[name]) for name in asked or names])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        """Every model of the repository: each version the registry tracks, or the model alone when untracked."""
        response = pb.RepositoryIndexResponse()
        for entry in self.plane.index(request.ready):
            version = "" if entry.version is None else str(entry.version)
            state = REPOSITORY_STATES.get(entry.state, "UNAVAILABLE")
            response.models.add(name=entry.name, version=version, state=state, reason=entry.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            names = ", ".join(request.parameters)
            raise ApiError(400, f"load parameters ({names}) are not supported; the repository is the config")
        await asyncio.to_thread(self.plane.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        unknown = sorted(set(request.parameters) - {"unload_dependents"})
        if unknown:
            raise ApiError(400, f"parameters.{unknown[0]}: unknown unload parameter; known: unload_dependents")
        self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def register(server: Server, plane: DataPlane, version: str) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(plane, version), server)
