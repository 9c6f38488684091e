"""The servers the benchmark compares, each one process of its own, started and stopped by us.

Every server gets the same requests in its own wire format: the same digit rows, as JSON. Each
``Server`` knows how to start its process, when it is ready (the first workload answers 200),
and how to read the probabilities out of its answers, so the benchmark can check that all of
them serve the same model before it times anything.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MLSERVER_VENV = BENCH / ".venv-mlserver"
_TF = "tensorflow-cpu" if sys.platform == "linux" and platform.machine() == "x86_64" else "tensorflow"
# httptools: uvicorn's fast HTTP parser, which the project's uvicorn[standard] has too, so that
# MLServer is not slowed by the pure-Python h11 parser its plain `uvicorn` dependency falls back to.
MLSERVER_REQUIREMENTS = ["mlserver==1.7.*", f"{_TF}==2.21.*", "httptools"]


@dataclass(frozen=True)
class Workload:
    """One kind of request: ``rows`` digit instances, plain prediction or MC dropout with ``samples``; with
    ``stream``, the rows are cut into requests of ``per_request`` rows each, sent in turn."""

    name: str
    rows: list[list[float]]
    samples: int | str | None = None
    stream: bool = False
    per_request: int = 1


@dataclass
class Server:
    """A server process and the (path, JSON body) it is sent for each workload it takes part in."""

    name: str
    description: str
    command: list[str]
    env: dict[str, str]
    port: int
    requests: dict[str, tuple[str, str | list[str]]]
    read: Callable[[dict], np.ndarray | None]  # an answer -> probabilities [rows, classes], or None
    cwd: Path = ROOT
    grpc_port: int | None = None
    grpc_calls: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """Workloads sent to the gRPC port: (full method name, serialized ModelInferRequest)."""
    process: subprocess.Popen | None = field(default=None, repr=False)
    cleanup: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path, timeout: float = 300) -> None:
        """Start the process (its own session, so ``stop`` reaches its children) and wait until it answers."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        path, body = next(iter(self.requests.values()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {log.read_text()[-3000:]}")
            try:
                if self.post(path, body).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer 200 within {timeout:.0f} s: {log.read_text()[-3000:]}")

    def post(self, path: str, body: str | list[str]) -> httpx.Response:
        """One request (of a stream: the first)."""
        content = body if isinstance(body, str) else body[0]
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)

    def answer(self, workload: str) -> np.ndarray | None:
        """One request of ``workload``; its probabilities (None where the server returns none)."""
        if workload in self.grpc_calls:
            return grpc_answer(self.grpc_port, *self.grpc_calls[workload])
        response = self.post(*self.requests[workload])
        if response.status_code != 200:
            raise RuntimeError(f"{self.name} {workload}: {response.status_code} {response.text[:500]}")
        return self.read(response.json())

    def stop(self) -> None:
        if self.cleanup is not None:
            self.cleanup()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without any DROPOUT_SERVE_* setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_SERVE_")}, **extra}


def _uvicorn(app: str, port: int) -> list[str]:
    # No access log for any server: logging a line per request would cost all of them the same.
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]


def _native(workload: Workload) -> str | list[str]:
    extra = {} if workload.samples is None else {"samples": workload.samples}
    if workload.stream:
        rows, size = workload.rows, workload.per_request
        return [json.dumps({"instances": rows[i : i + size], **extra}) for i in range(0, len(rows), size)]
    return json.dumps({"instances": workload.rows, **extra})


def floor(port: int, workloads: list[Workload]) -> Server:
    """The bare FastAPI endpoint, sent the same bytes as ``/predict`` with one instance."""
    (one_row,) = (w for w in workloads if w.samples is None and len(w.rows) == 1)
    return Server(
        name="floor",
        description="bare FastAPI endpoint (returns a constant)",
        command=_uvicorn("bench.floor_app:app", port),
        env=_env(),
        port=port,
        requests={one_row.name: ("/predict", _native(one_row))},
        read=lambda answer: None,
    )


def minimal(port: int, version_dir: Path, workloads: list[Workload]) -> Server:
    return Server(
        name="minimal",
        description="minimal FastAPI route calling serving_default",
        command=_uvicorn("bench.minimal_app:app", port),
        env=_env(BENCH_SAVEDMODEL=str(version_dir)),
        port=port,
        requests={w.name: ("/predict", _native(w)) for w in workloads if w.samples is None},
        read=lambda answer: np.asarray(answer["probabilities"]),
    )


def ours(ports: tuple[int, int], model_dir: Path, model: str, workloads: list[Workload], batched: bool) -> Server:
    """``uvicorn app.main:app``, one process; unbatched is ``DROPOUT_SERVE_MAX_BATCH_SIZE=1``, batched the default.

    Batched, it also takes the one-row workload through the Open Inference Protocol: REST
    ``/v2/models/{m}/infer`` (``v2-1``, JSON) and gRPC ``ModelInfer`` on ``ports[1]`` (``grpc-v2-1``,
    raw FP32 contents as tritonclient sends them).
    """
    port, grpc_port = ports
    # No per-request log line, like every other server here (uvicorn --no-access-log, MLServer without debug).
    settings = {
        "DROPOUT_SERVE_MODEL_DIR": str(model_dir),
        "DROPOUT_SERVE_DEFAULT_MODEL": model,
        "DROPOUT_SERVE_ACCESS_LOG": "false",
        "DROPOUT_SERVE_GRPC_PORT": str(grpc_port),
    }
    if not batched:
        settings["DROPOUT_SERVE_MAX_BATCH_SIZE"] = "1"
    requests = {w.name: ("/predict/mc-dropout" if w.samples else "/predict", _native(w)) for w in workloads}
    (one_row,) = (w for w in workloads if w.samples is None and len(w.rows) == 1 and not w.stream)
    if batched:  # the default configuration, which the protocol comparison is about
        requests["v2-1"] = (f"/v2/models/{model}/infer", _v2_json(one_row))
    return Server(
        name="ours-batched" if batched else "ours-unbatched",
        description="dropout-serve, " + ("batched (default settings)" if batched else "MAX_BATCH_SIZE=1"),
        command=_uvicorn("app.main:app", port),
        env=_env(**settings),
        port=port,
        requests=requests,
        read=_read_probabilities,
        grpc_port=grpc_port,
        grpc_calls=_grpc_calls(model, one_row) if batched else {},
    )


def before(port: int, model_dir: Path, model: str, workloads: list[Workload], source: str, scratch: Path) -> Server:
    """This server as it was before a change (default settings), on the workloads that code knows (fixed T, and
    ``samples: "auto"`` once it has ``training/adaptive.py``): ``source`` is a source tree, or a commit served from
    a ``git worktree`` of it."""
    checkout = Path(source)
    if not checkout.is_dir():
        checkout = scratch / f"before-{source}"
        if not checkout.exists():
            command = ["git", "worktree", "add", "--detach", str(checkout), source]
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    settings = {"DROPOUT_SERVE_MODEL_DIR": str(model_dir), "DROPOUT_SERVE_DEFAULT_MODEL": model}
    settings["DROPOUT_SERVE_ACCESS_LOG"] = "false"

    knows_auto = (checkout / "training" / "adaptive.py").exists()

    def remove() -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, capture_output=True)

    return Server(
        name="ours-before",
        description=f"dropout-serve at {source} (before this session's changes), batched",
        command=_uvicorn("app.main:app", port),
        env=_env(**settings),
        port=port,
        requests={
            w.name: ("/predict/mc-dropout" if w.samples else "/predict", _native(w))
            for w in workloads
            if knows_auto or not isinstance(w.samples, str)
        },
        read=_read_probabilities,
        cwd=checkout,
        cleanup=None if checkout == Path(source) else remove,
    )


def _read_probabilities(answer: dict) -> np.ndarray:
    if "outputs" in answer:  # the v2 door
        (output,) = answer["outputs"]
        return np.asarray(output["data"]).reshape(output["shape"])
    return np.asarray([p["probabilities"] for p in answer["predictions"]])


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"


def _grpc_calls(model: str, one_row: Workload) -> dict[str, tuple[str, bytes]]:
    """ModelInfer of one row (``grpc-v2-1``: N calls on one connection, as one channel sends them;
    ``grpc-v2-1-conns``: on N connections, wrk's shape), and ServerLive: a gRPC call through the same
    server and checks that does nothing, the floor of what a call costs."""
    infer = (MODEL_INFER, model_infer_request(model, one_row))
    return {"grpc-v2-1": infer, "grpc-v2-1-conns": infer, "grpc-live": (SERVER_LIVE, b"")}


def _v2_json(workload: Workload) -> str:
    rows = np.asarray(workload.rows, np.float32)
    tensor = {"name": "inputs", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    return json.dumps({"inputs": [tensor]})


def model_infer_request(model: str, workload: Workload) -> bytes:
    """A serialized gRPC ``ModelInferRequest`` of the workload's rows, as tritonclient sends them (raw FP32)."""
    from tritonclient.grpc import service_pb2

    rows = np.asarray(workload.rows, np.float32)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="inputs", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request.SerializeToString()


def grpc_answer(port: int, method: str, payload: bytes) -> np.ndarray | None:
    """The first output of one ``ModelInfer`` call, read with the generated message class (None for
    another method, whose call only has to succeed)."""
    import grpc
    from tritonclient.grpc import service_pb2

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = channel.unary_unary(method)(payload, timeout=30)
    if method != MODEL_INFER:
        return None
    response = service_pb2.ModelInferResponse.FromString(answer)
    output = response.outputs[0]
    if output.datatype != "FP32":
        raise RuntimeError(f"ModelInfer answered {output.datatype}, expected FP32")
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))


def ensure_mlserver_venv(venv: Path = MLSERVER_VENV) -> Path:
    """The ``mlserver`` executable of ``venv``, creating or updating the environment first if needed.

    The first time takes a few minutes (TensorFlow). ``venv/bench-requirements.txt`` records what
    was installed, so a changed :data:`MLSERVER_REQUIREMENTS` is installed on the next run.
    """
    marker = venv / "bench-requirements.txt"
    wanted = "\n".join(MLSERVER_REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return venv / "bin" / "mlserver"
    print(f"setting up {venv} for MLServer: pip install {' '.join(MLSERVER_REQUIREMENTS)}", flush=True)
    log = BENCH / "results" / "logs" / "mlserver-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps += [
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", *MLSERVER_REQUIREMENTS],
    ]
    with log.open("w") as out:
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(
                    f"MLServer could not be installed: `{' '.join(step)}` failed: {log.read_text()[-2000:]}"
                )
    marker.write_text(wanted)
    return venv / "bin" / "mlserver"


def mlserver_version(executable: Path) -> str:
    python = executable.parent / "python"
    command = [str(python), "-c", "import mlserver, tensorflow; print(mlserver.__version__, tensorflow.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def mlserver(
    ports: tuple[int, int, int], version_dir: Path, model: str, workloads: list[Workload], scratch: Path
) -> Server:
    """MLServer with adaptive batching (32 rows, 2 ms), one process, serving ``version_dir`` via our runtime.

    ``scratch`` becomes MLServer's model folder (settings and runtime); MLServer warns unless it is
    named like the model.
    """
    http_port, grpc_port, metrics_port = ports
    executable = ensure_mlserver_venv()
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(BENCH / "mlserver_runtime.py", scratch)  # MLServer imports runtimes from the model folder
    settings = {
        "debug": False,  # debug would log every request
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,  # inference in the server process itself: one process, like the others
    }
    model_settings = {
        "name": model,
        "implementation": "mlserver_runtime.SavedModelRuntime",
        "parameters": {"uri": str(version_dir)},
        "max_batch_size": 32,
        "max_batch_time": 0.002,
    }
    (scratch / "settings.json").write_text(json.dumps(settings, indent=2))
    (scratch / "model-settings.json").write_text(json.dumps(model_settings, indent=2))

    return Server(
        name="mlserver",
        description="MLServer 1.7, adaptive batching (32 rows, 2 ms)",
        command=[str(executable), "start", str(scratch)],
        env=_env(),
        port=http_port,
        requests={w.name: (f"/v2/models/{model}/infer", _v2_json(w)) for w in workloads if w.samples is None},
        read=_read_probabilities,
        cwd=scratch,  # MLServer writes its metrics and environments folders into the working directory
    )
