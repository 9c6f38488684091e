"""Our HTTP/2 server (app/grpc/http2.py, app/grpc/calls.py) against real clients and a raw HTTP/2 peer:
flow control, compression, server streaming, and the gRPC spec's answers to what is not a good call."""

from __future__ import annotations

import shutil
import socket
import struct
import urllib.parse
import zlib

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hpack import Decoder, Encoder
from test_grpc import triton_input
from tritonclient.grpc import service_pb2

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def server(tiny_classifier_dir, tmp_path_factory):
    repository = tmp_path_factory.mktemp("http2") / "models"
    shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
    server = Server(repository, grpc_port=free_port(), default_model="tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rows(digit_rows) -> np.ndarray:
    return np.concatenate([digit_rows] * 3).astype(np.float32)  # 48 rows: an answer of 1,920 bytes


def infer_request(rows: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="inputs", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request.SerializeToString()


class RawPeer:
    """An HTTP/2 client written out frame by frame, to send what grpcio's client never would."""

    def __init__(self, port: int, window: int = 65_535) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder, self.decoder, self.buffer = Encoder(), Decoder(), b""
        settings = struct.pack(">HI", 0x4, window)  # SETTINGS_INITIAL_WINDOW_SIZE: what the server may send ahead
        self.socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.frame(4, 0, 0, settings))

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload

    @staticmethod
    def fields(path: str, content_type: str = "application/grpc") -> list[tuple[str, str]]:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost")]
        return [*headers, ("content-type", content_type), ("te", "trailers")]

    def call(self, stream: int, path: str, message: bytes, content_type: str = "application/grpc") -> None:
        self.send(stream, self.encoder.encode(self.fields(path, content_type)), message)

    def send(self, stream: int, block: bytes, message: bytes) -> None:
        body = b"\0" + struct.pack(">I", len(message)) + message
        self.socket.sendall(self.frame(1, 0x4, stream, block) + self.frame(0, 0x1, stream, body))

    def read_frame(self) -> tuple[int, int, int, bytes]:
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            chunk = self.socket.recv(65_536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3], "big")
        kind, flags, stream = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9], "big")
        payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
        return kind, flags, stream, payload

    def answer(self, stream: int) -> tuple[list[dict], list[bytes]]:
        """The header blocks and DATA payloads of ``stream`` until it ends, granting window as DATA arrives."""
        blocks, data = [], []
        while True:
            kind, flags, on, payload = self.read_frame()
            if kind == 1 and on == stream:
                blocks.append(dict((k.decode(), v.decode()) for k, v in self.decoder.decode(payload, raw=True)))
            elif kind == 0 and on == stream:
                data.append(payload)
                grant = struct.pack(">I", len(payload))
                self.socket.sendall(self.frame(8, 0, stream, grant) + self.frame(8, 0, 0, grant))
            if on == stream and flags & 0x1:
                return blocks, data


def test_answers_larger_than_the_peers_window_wait_for_its_window_updates(server, rows):
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    expected = triton.infer("tiny", [triton_input(rows)]).as_numpy("outputs")
    triton.close()
    assert expected.shape == (48, 10)
    peer = RawPeer(server.grpc_port, window=100)  # the answer takes 20 windows
    peer.call(1, MODEL_INFER, infer_request(rows))
    blocks, data = peer.answer(1)
    assert [block.get(":status") for block in blocks] == ["200", None]
    assert blocks[0]["content-type"] == "application/grpc" and blocks[1]["grpc-status"] == "0"
    assert len(data) > 16 and max(len(chunk) for chunk in data) <= 100
    body = b"".join(data)
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    response = service_pb2.ModelInferResponse.FromString(body[5:])
    answer = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(answer, expected)


def test_what_is_not_a_grpc_call_gets_the_specs_answer(server, rows):
    peer = RawPeer(server.grpc_port)
    peer.call(1, MODEL_INFER, infer_request(rows), content_type="application/json")
    blocks, _ = peer.answer(1)
    assert blocks == [{":status": "415"}]
    peer.call(3, "/no.Such/Method", b"")  # the connection goes on serving
    blocks, data = peer.answer(3)
    assert data == [] and blocks[0][":status"] == "200" and blocks[0]["grpc-status"] == "12"  # UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as garbage:
            channel.unary_unary(MODEL_INFER)(b"\xff\xff\xff\xff", timeout=10)
        assert garbage.value.code() == grpc.StatusCode.INTERNAL and "could not be parsed" in garbage.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/inference.GRPCInferenceService/Nope")(b"", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_gzip_requests_answer_as_plain_ones(server, rows):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString)
        plain = call(infer_request(rows), timeout=30)
        packed = call(infer_request(rows), timeout=30, compression=grpc.Compression.Gzip)
    assert plain.raw_output_contents and plain.raw_output_contents == packed.raw_output_contents


def test_health_watch_streams_and_a_client_deadline_ends_the_call(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="live"), timeout=2)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)  # nothing changes: the stream stays open until the client's deadline
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        live = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="live"), timeout=10)
        assert live.status == health_pb2.HealthCheckResponse.SERVING


def test_a_repeated_header_block_means_what_the_connections_table_says_now(server):
    """The connection remembers decoded blocks, but only while the HPACK table they refer to is unchanged."""
    peer = RawPeer(server.grpc_port)
    live, metadata = "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerMetadata"
    blocks = [peer.encoder.encode(peer.fields(live)) for _ in range(2)]
    assert all(byte & 0x80 for byte in blocks[1])  # the second: only references to the table
    blocks.append(peer.encoder.encode(peer.fields(metadata)))  # a new entry: every reference moves by one
    blocks.append(blocks[1])  # the second block's bytes, which now name ServerMetadata's path
    answers = []
    for number, block in enumerate(blocks):
        peer.send(2 * number + 1, block, b"")
        headers, data = peer.answer(2 * number + 1)
        assert headers[-1]["grpc-status"] == "0", headers
        answers.append(b"".join(data)[5:])
    assert answers[0] == answers[1] == service_pb2.ServerLiveResponse(live=True).SerializeToString()
    assert service_pb2.ServerMetadataResponse.FromString(answers[2]).name == "dropout-serve"
    assert answers[3] == answers[2]


def test_limits_are_announced_and_a_frame_past_them_ends_the_connection(server):
    peer = RawPeer(server.grpc_port)
    kind, _, _, payload = peer.read_frame()
    assert kind == 4  # the server's SETTINGS come first
    settings = dict(struct.iter_unpack(">HI", payload))
    assert settings[0x3] == 1000 and settings[0x4] == 1 << 24  # MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE
    peer.socket.sendall((100_000).to_bytes(3, "big") + bytes((0, 0)) + (1).to_bytes(4, "big"))  # a DATA frame's head
    frames = []
    while (frames[-1][0] if frames else None) != 7:  # until GOAWAY
        frames.append(peer.read_frame())
    assert struct.unpack(">II", frames[-1][3][:8])[1] == 6  # FRAME_SIZE_ERROR: no frame over 16 KiB was allowed
    assert peer.socket.recv(1) == b""  # and the connection is closed


def test_half_sent_requests_past_the_connections_budget_are_refused_and_the_rest_are_served(
    tiny_classifier_dir, rows, tmp_path
):
    """A connection holds at most 16 body limits of unfinished requests; the stream that would go past is refused."""
    repository = tmp_path / "models"
    shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
    small = Server(repository, grpc_port=free_port(), default_model="tiny", max_body_bytes=4096)
    try:
        message = infer_request(rows[:15])  # 15 rows: ~3.9 kB, under the 4,096-byte limit
        body = b"\0" + struct.pack(">I", len(message)) + message
        assert 3_800 < len(body) < 4_096
        peer = RawPeer(small.grpc_port)
        block = peer.encoder.encode(peer.fields(MODEL_INFER))
        for stream in range(1, 35, 2):  # 17 streams, each all but its last 10 bytes: 16 fit in 16 x (4,096 + 5)
            peer.socket.sendall(peer.frame(1, 0x4, stream, block) + peer.frame(0, 0, stream, body[:-10]))
        kind, _, stream, payload = peer.read_frame()
        while kind != 3:  # SETTINGS, its ACK, until the RST_STREAM
            kind, _, stream, payload = peer.read_frame()
        assert (stream, struct.unpack(">I", payload)[0]) == (33, 7)  # the 17th: REFUSED_STREAM
        for stream in (1, 35):  # a started call frees its share: a new stream fits again
            if stream == 35:
                peer.socket.sendall(peer.frame(1, 0x4, stream, block) + peer.frame(0, 0, stream, body[:-10]))
            peer.socket.sendall(peer.frame(0, 0x1, stream, body[-10:]))
            headers, data = peer.answer(stream)
            assert headers[-1]["grpc-status"] == "0", headers
            response = service_pb2.ModelInferResponse.FromString(b"".join(data)[5:])
            assert list(response.outputs[0].shape) == [15, 10]
    finally:
        small.stop()


def test_a_gzip_bomb_is_refused_without_inflating_it(server):
    """A 1 GiB message of zeros, ~1 MB gzip-compressed: RESOURCE_EXHAUSTED, and the server's peak memory stays put."""
    packer = zlib.compressobj(wbits=31)
    zeros = bytes(1 << 20)
    message = b"".join([*(packer.compress(zeros) for _ in range(1024)), packer.flush()])
    assert len(message) < 4 << 20  # under the body limit: only its inflated size is too large
    peak_before = peak_memory(server.process.pid)
    peer = RawPeer(server.grpc_port)
    block = peer.encoder.encode([*peer.fields(MODEL_INFER), ("grpc-encoding", "gzip")])
    body = b"\1" + struct.pack(">I", len(message)) + message
    peer.socket.sendall(peer.frame(1, 0x4, 1, block))
    for start in range(0, len(body), 16_384):  # frames of at most 16 KiB
        end_stream = 0x1 if start + 16_384 >= len(body) else 0
        peer.socket.sendall(peer.frame(0, end_stream, 1, body[start : start + 16_384]))
    headers, data = peer.answer(1)
    assert data == [] and headers[-1]["grpc-status"] == "8", headers  # RESOURCE_EXHAUSTED
    assert "larger than" in urllib.parse.unquote(headers[-1]["grpc-message"])
    assert peak_memory(server.process.pid) - peak_before < 256 << 20
    junk = b"not gzip"
    peer.socket.sendall(
        peer.frame(1, 0x4, 3, block) + peer.frame(0, 0x1, 3, b"\1" + struct.pack(">I", len(junk)) + junk)
    )
    headers, data = peer.answer(3)
    assert data == [] and headers[-1]["grpc-status"] == "13", headers  # INTERNAL, saying why
    assert "not valid gzip" in urllib.parse.unquote(headers[-1]["grpc-message"])


def peak_memory(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
