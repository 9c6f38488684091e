"""The gRPC port through real clients: tritonclient.grpc, tensorflow_serving.apis' stubs, grpc.health.v1.

One real uvicorn process serves REST and gRPC from a tiny trained classifier, with API keys, so
every gRPC answer is compared with the REST door that must agree with it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from conftest import Server, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
METADATA = (("x-api-key", KEY),)


@pytest.fixture(scope="module")
def repository(tiny_classifier_dir, tmp_path_factory):
    """The tiny classifier as model 'tiny' version 1, labelled 'stable'."""
    root = tmp_path_factory.mktemp("grpc") / "models"
    shutil.copytree(tiny_classifier_dir, root / "tiny" / "1")
    (root.parent / "models.yaml").write_text("models:\n  tiny:\n    labels: {stable: 1}\n")
    return root


@pytest.fixture(scope="module")
def server(repository):
    port = free_port()
    server = Server(repository, grpc_port=port, api_keys=KEY, model_config=repository.parent / "models.yaml")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rest(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def triton(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def rows(digit_rows) -> np.ndarray:
    return digit_rows[:3].astype(np.float32)


def triton_input(rows: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("inputs", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # raw_input_contents, tritonclient's way
    return tensor


def status_of(error: InferenceServerException) -> str:
    return error.status().removeprefix("StatusCode.")


# -- Open Inference Protocol v2 ----------------------------------------------------------------------


def test_model_infer_equals_rest_predict(triton, rest, rows):
    result = triton.infer("tiny", [triton_input(rows)], headers=AUTH)
    native = rest.post("/predict", json={"instances": rows.tolist(), "model": "tiny"})
    assert native.status_code == 200, native.text
    expected = np.array([p["probabilities"] for p in native.json()["predictions"]], np.float32)
    probabilities = result.as_numpy("outputs")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 10)
    np.testing.assert_array_equal(probabilities, expected)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("tiny", "1")


def test_model_infer_typed_contents_equal_raw(channel, rows):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    typed = service_pb2.ModelInferRequest(model_name="tiny", model_version="1", id="typed")
    typed.inputs.add(name="inputs", datatype="FP64", shape=rows.shape).contents.fp64_contents.extend(rows.ravel())
    raw = service_pb2.ModelInferRequest(model_name="tiny")
    raw.inputs.add(name="inputs", datatype="FP32", shape=rows.shape)
    raw.raw_input_contents.append(rows.tobytes())
    answers = [stub.ModelInfer(request, metadata=METADATA) for request in (typed, raw)]
    assert answers[0].id == "typed" and [o.name for o in answers[0].outputs] == ["outputs"]
    assert answers[0].raw_output_contents == answers[1].raw_output_contents


def test_peers_parameters_are_ignored_or_honoured(channel, rows):
    """MLServer's codecs send content_type (request "np": one tensor, whatever its name), Triton priority."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    plain = service_pb2.ModelInferRequest(model_name="tiny")
    plain.inputs.add(name="inputs", datatype="FP32", shape=rows.shape).contents.fp32_contents.extend(rows.ravel())
    mlserver = service_pb2.ModelInferRequest(model_name="tiny")
    mlserver.parameters["content_type"].string_param = "np"
    mlserver.parameters["priority"].int64_param = 1
    tensor = mlserver.inputs.add(name="input-1", datatype="FP32", shape=rows.shape)
    tensor.parameters["content_type"].string_param = "np"
    tensor.contents.fp32_contents.extend(rows.ravel())
    answers = [stub.ModelInfer(request, metadata=METADATA) for request in (plain, mlserver)]
    assert answers[0].raw_output_contents == answers[1].raw_output_contents
    named = service_pb2.ModelInferRequest(model_name="tiny")
    named.inputs.add(name="input-1", datatype="FP32", shape=rows.shape).contents.fp32_contents.extend(rows.ravel())
    with pytest.raises(grpc.RpcError) as caught:  # without content_type "np", the input's name must be the model's
        stub.ModelInfer(named, metadata=METADATA)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'inputs'" in caught.value.details()


def test_mc_parameters_equal_native_mc_dropout(triton, rest, rows):
    parameters = {"mc_dropout": True, "samples": 30, "seed": 11}
    result = triton.infer("tiny", [triton_input(rows)], headers=AUTH, parameters=parameters)
    native = rest.post("/predict/mc-dropout", json={"instances": rows.tolist(), "samples": 30, "seed": 11})
    assert native.status_code == 200, native.text
    predictions = native.json()["predictions"]
    for output, field in [
        ("probabilities", "probabilities"),
        ("std", "std"),
        ("predictive_entropy", "predictive_entropy"),
        ("mutual_information", "mutual_information"),
        ("variation_ratio", "variation_ratio"),
    ]:
        np.testing.assert_array_equal(result.as_numpy(output), np.array([p[field] for p in predictions]))
    answered = result.get_response().parameters
    assert answered["mc_dropout"].bool_param and answered["samples"].int64_param == 30
    assert answered["seed"].int64_param == 11


def test_auto_outputs_equal_rest_v2(triton, rest, rows):
    parameters = {"mc_dropout": True, "samples": "auto", "seed": 5}
    result = triton.infer("tiny", [triton_input(rows)], headers=AUTH, parameters=parameters)
    tensor = {"name": "inputs", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    answer = rest.post("/v2/models/tiny/infer", json={"inputs": [tensor], "parameters": parameters})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}
    assert {"samples_used", "probabilities", "mutual_information"} <= outputs.keys()
    for name, expected in outputs.items():
        np.testing.assert_array_equal(result.as_numpy(name), expected, err_msg=name)
    answered = result.get_response().parameters
    assert answered["tolerance"].double_param == answer.json()["parameters"]["tolerance"] == 0.05


def test_metadata_and_readiness(triton):
    assert triton.is_server_live(headers=AUTH) and triton.is_server_ready(headers=AUTH)
    assert triton.is_model_ready("tiny", headers=AUTH) and triton.is_model_ready("tiny", "1", headers=AUTH)
    assert not triton.is_model_ready("tiny", "2", headers=AUTH)
    server = triton.get_server_metadata(headers=AUTH)
    assert server.name == "dropout-serve" and "mc_dropout" in server.extensions
    model = triton.get_model_metadata("tiny", headers=AUTH, as_json=True)
    assert model["versions"] == ["1"] and model["platform"] == "tensorflow_savedmodel"
    assert model["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert model["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": ["-1", "10"]}]
    with pytest.raises(InferenceServerException) as unknown:
        triton.is_model_ready("nope", headers=AUTH)
    assert status_of(unknown.value) == "NOT_FOUND" and "nope" in unknown.value.message()
    with pytest.raises(InferenceServerException) as unserved:
        triton.get_model_config("tiny", headers=AUTH)
    assert status_of(unserved.value) == "UNIMPLEMENTED"


def test_repository_index(triton):
    index = triton.get_model_repository_index(headers=AUTH, as_json=True)
    assert index["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]


def test_v2_errors(triton, rows):
    cases = [
        (dict(model_name="nope"), "NOT_FOUND", "nope"),
        (dict(model_name="tiny", model_version="9"), "NOT_FOUND", "9"),
        (dict(model_name="tiny", inputs=[triton_input(rows[:, :10])]), "INVALID_ARGUMENT", "shape [3, 10]"),
        (dict(model_name="tiny", parameters={"seed": 3}), "INVALID_ARGUMENT", "mc_dropout: true"),
        (dict(model_name="tiny", parameters={"mc_dropout": True, "samples": 10**6}), "INVALID_ARGUMENT", "samples"),
    ]
    for arguments, code, named in cases:
        arguments = {"inputs": [triton_input(rows)], **arguments}
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(headers=AUTH, **arguments)
        assert status_of(caught.value) == code and named in caught.value.message(), (arguments, caught.value)


# -- TF Serving ---------------------------------------------------------------------------------------


def predict_request(rows: np.ndarray, signature: str = "", name: str = "tiny", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    choose(request.model_spec, **spec)
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(rows))
    return request


def choose(spec, version: int | None = None, label: str | None = None) -> None:
    """A version or a label (one ``oneof`` of ModelSpec: setting one clears the other)."""
    if version is not None:
        spec.version.value = version
    if label is not None:
        spec.version_label = label


def test_predict_serving_default_equals_rest(channel, rest, rows):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    expected = rest.post("/v1/models/tiny:predict", json={"instances": rows.tolist()})
    assert expected.status_code == 200, expected.text
    for spec in [{}, {"version": 1}, {"label": "stable"}]:
        response = stub.Predict(predict_request(rows, **spec), metadata=METADATA)
        outputs = tf.make_ndarray(response.outputs["outputs"])
        np.testing.assert_array_equal(outputs, np.array(expected.json()["predictions"], np.float32))
        assert (response.model_spec.name, response.model_spec.version.value) == ("tiny", 1)
        assert response.model_spec.signature_name == "serving_default"


def test_predict_mc_dropout_equals_rest_samples(channel, rest, rows):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_request(rows, "mc_dropout")
    request.inputs["samples"].CopyFrom(tf.make_tensor_proto(25, tf.int32))
    request.inputs["seed"].CopyFrom(tf.make_tensor_proto(5, tf.int64))
    response = stub.Predict(request, metadata=METADATA)
    body = {"signature_name": "mc_dropout", "inputs": {"inputs": rows.tolist(), "samples": 25, "seed": 5}}
    expected = rest.post("/v1/models/tiny:predict", json=body)
    assert expected.status_code == 200, expected.text
    outputs = expected.json()["outputs"]
    samples = outputs["outputs"] if isinstance(outputs, dict) else outputs
    assert tf.make_ndarray(response.outputs["outputs"]).shape == (25, 3, 10)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["outputs"]), np.array(samples, np.float32))
    if isinstance(outputs, dict):  # a calibrated classifier also answers its MC predictive
        np.testing.assert_array_equal(
            tf.make_ndarray(response.outputs["predictive"]), np.array(outputs["predictive"], np.float32)
        )


def test_model_metadata_lists_both_signatures(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tiny"
    response = stub.GetModelMetadata(request, metadata=METADATA)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {"serving_default", "mc_dropout", "mc_dropout_segments"}
    assert set(signatures.signature_def["mc_dropout"].inputs) == {"inputs", "samples", "seed"}
    assert response.model_spec.version.value == 1


def test_model_status_available(channel):
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    for spec in [{}, {"version": 1}, {"label": "stable"}]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "tiny"
        choose(request.model_spec, **spec)
        (status,) = stub.GetModelStatus(request, metadata=METADATA).model_version_status
        assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status.status.error_code == 0 and status.status.error_message == ""


def test_tf_serving_errors(channel, rows):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    cases = [
        (predict_request(rows, name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (predict_request(rows, version=4), grpc.StatusCode.NOT_FOUND, "4"),
        (predict_request(rows, label="canary"), grpc.StatusCode.NOT_FOUND, "canary"),
        (predict_request(rows[:, :7]), grpc.StatusCode.INVALID_ARGUMENT, "inputs['inputs']: shape [3, 7]"),
        (predict_request(rows, "classify"), grpc.StatusCode.INVALID_ARGUMENT, "'classify' not found"),
        (predict_request(rows, "mc_dropout"), grpc.StatusCode.INVALID_ARGUMENT, "'samples', 'seed'"),
    ]
    nan = predict_request(rows.copy())
    nan.inputs["inputs"].CopyFrom(tf.make_tensor_proto(np.where(rows > 8, np.nan, rows).astype(np.float32)))
    cases.append((nan, grpc.StatusCode.INVALID_ARGUMENT, "NaN"))
    for request, code, named in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, metadata=METADATA)
        assert caught.value.code() == code and named in caught.value.details(), (request.model_spec, caught.value)
    with pytest.raises(grpc.RpcError) as unserved:
        stub.Classify(classification_pb2.ClassificationRequest(model_spec=request.model_spec), metadata=METADATA)
    assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- operations: keys, request id, metrics, access log, health ------------------------------------------


def test_keys_are_enforced_and_health_is_open(server, channel, rows):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for metadata, message in [((), "an API key is required"), ((("authorization", "Bearer wrong"),), "not valid")]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(predict_request(rows), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in caught.value.details()
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as refused:
        triton.infer("tiny", [triton_input(rows)])
    assert status_of(refused.value) == "UNAUTHENTICATED"
    triton.close()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "live", "ready", "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_request_id_metrics_and_access_log(server, channel, rest, rows):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    _, call = stub.Predict.with_call(predict_request(rows), metadata=(*METADATA, ("x-request-id", "trace-42")))
    assert ("x-request-id", "trace-42") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(predict_request(rows, name="nope"), metadata=METADATA)
    generated = dict(caught.value.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "trace-42"
    families = {f.name: f for f in text_string_to_metric_families(rest.get("/metrics").text)}
    counted = {
        (s.labels["route"], s.labels["status"], s.labels["model"]): s.value
        for s in families["dropout_serve_requests"].samples
        if s.labels.get("method") == "GRPC"
    }
    assert counted[("/tensorflow.serving.PredictionService/Predict", "200", "tiny")] >= 1
    assert counted[("/tensorflow.serving.PredictionService/Predict", "404", "")] >= 1
    deadline = time.monotonic() + 5
    log = ""
    while "trace-42" not in log and time.monotonic() < deadline:
        time.sleep(0.1)
        log = Path(server.log.name).read_text()
    line = next(line for line in log.splitlines() if "[trace-42]" in line)
    assert "GRPC /tensorflow.serving.PredictionService/Predict 200" in line and "model=tiny version=1" in line
