#!/usr/bin/env bash
# Builds the Docker image with podman and checks it really serves: predictions and MC dropout
# through the stripped TensorFlow, no training-only packages, at most 1.2 GB, docs without the
# internet, non-root user, healthcheck, a mounted model repository and a graceful, quick stop.
# Run from anywhere:
#   bash tests/container/test_container.sh
# Needs the shared container set-up (see <shared>/container/README.md), found through
# $DS_SHARED_DIR, then <repo>/../shared.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=dropout-serve:test
MAX_IMAGE_MB=1200
ZERO='[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]'

fail() { echo "FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

setup=
for dir in ${DS_SHARED_DIR:+"$DS_SHARED_DIR"} "$REPO/../shared"; do
    if [[ -f $dir/container/setup.sh ]]; then setup=$dir/container/setup.sh; break; fi
done
[[ -n $setup ]] || fail "container/setup.sh not found in \$DS_SHARED_DIR or $REPO/../shared"
# shellcheck source=/dev/null
source "$setup"

WORK=$(mktemp -d)
SERVED=ds-test-$$      # the image as built
MOUNTED=ds-mounted-$$  # with a model repository mounted from the host
KEYED=ds-keyed-$$      # with API keys, JSON logs and metrics configured by -e
CONTEXT=ds-context-$$  # built from a context whose artifacts/ holds a digits version
cleanup() {
    podman rm -f -t 0 "$SERVED" "$MOUNTED" "$KEYED" "$CONTEXT" >/dev/null 2>&1 || true
    podman rmi -f "$IMAGE-context" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Starts container $1 from $IMAGE with the remaining options; prints its host port.
# podman's complaints that it cannot (un)schedule healthchecks without systemd are harmless: hidden.
start() {
    local name=$1 port
    shift
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    podman run -d --name "$name" -p "127.0.0.1:$port:8000" "$@" "$IMAGE" >"$WORK/$name.run" 2>&1 || {
        cat "$WORK/$name.run" >&2
        return 1
    }
    echo "$port"
}

wait_ready() {
    local name=$1 port=$2 deadline=$((SECONDS + 120))
    until curl -fsS -o /dev/null "http://127.0.0.1:$port/health/ready" 2>/dev/null; do
        if [[ $(podman inspect -f '{{.State.Running}}' "$name") != true ]]; then
            podman logs "$name" >&2
            fail "$name exited before it was ready"
        fi
        ((SECONDS < deadline)) || { podman logs "$name" >&2; fail "$name not ready after 120 s"; }
        sleep 0.5
    done
}

post() { curl -fsS "http://127.0.0.1:$1$2" -H 'content-type: application/json' -d "$3"; }

# Checks a JSON answer with a Python expression over `r`.
check() {
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert eval(sys.argv[2]), sys.argv[1][:500]' "$1" "$2" \
        || fail "$3"
}

cd "$REPO"
echo "== build"
t0=$(now)
# --format docker keeps HEALTHCHECK (podman's default OCI format drops it), as `docker build` does.
podman build --format docker --network host -t "$IMAGE" . >"$WORK/build.log" 2>&1 || {
    tail -50 "$WORK/build.log" >&2
    fail "podman build"
}
build_time=$(since "$t0")
size_mb=$(($(podman image inspect "$IMAGE" --format '{{.Size}}') / 1000000))
echo "built $IMAGE in $build_time s, $size_mb MB"
((size_mb <= MAX_IMAGE_MB)) || fail "the image is $size_mb MB, over $MAX_IMAGE_MB MB"

echo "== what the runtime image holds"
# Training's packages and libclang stay in the build stages; TensorFlow's libraries are stripped.
podman run -i --rm "$IMAGE" python - <<'PY' || fail "the runtime image holds what serving does not need"
import importlib.util, pathlib, struct, subprocess, sys


def sections(path):
    """Section names of a 64-bit little-endian ELF file, from its section header table."""
    with open(path, "rb") as f:
        header = f.read(64)
        shoff, = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        entries = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        f.seek(entries[shstrndx][4])
        names = f.read(entries[shstrndx][5])
    return {names[e[0]:names.index(b"\0", e[0])].decode() for e in entries}


absent = [m for m in ("sklearn", "scipy", "matplotlib", "clang") if importlib.util.find_spec(m)]
assert not absent, f"training-only packages in the runtime image: {absent}"
tf = pathlib.Path(importlib.util.find_spec("tensorflow").origin).parent
assert not (tf / "include").exists(), "TensorFlow's C++ headers ship"
for library in ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2"):
    names = sections(tf / library)
    assert ".dynsym" in names and ".symtab" not in names, f"{library} is not stripped: {sorted(names)}"
help_text = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, check=True).stdout
assert "--grpc-port" in help_text
print("no scikit-learn, SciPy, matplotlib or libclang; no TensorFlow headers; its libraries stripped; --help works")
PY

echo "== run"
t0=$(now)
port=$(start "$SERVED")
wait_ready "$SERVED" "$port"
ready_time=$(since "$t0")
echo "ready $ready_time s after podman run"

answer=$(post "$port" /predict "{\"instances\": [$ZERO]}")
check "$answer" 'r["model"] == "digits" and r["predictions"][0]["label"] == "0"' "/predict: not a zero"
mc='{"instances": ['"$ZERO"'], "samples": 100, "seed": 42}'
answer=$(post "$port" /predict/mc-dropout "$mc")
check "$answer" 'r["samples"] == 100 and r["seed"] == 42 and r["predictions"][0]["label"] == "0"' \
    "/predict/mc-dropout: wrong answer"
[[ $(post "$port" /predict/mc-dropout "$mc") == "$answer" ]] || fail "seeded MC request is not reproducible"
echo "predict and mc-dropout answer 0; a seeded MC request repeats byte for byte"
# Both signatures of the stripped build through the other doors: serving_default over TF Serving's
# REST, mc_dropout over the Open Inference Protocol.
answer=$(post "$port" /v1/models/digits:predict "{\"instances\": [$ZERO]}")
check "$answer" 'max(r["predictions"][0]) == r["predictions"][0][0]' "TF Serving REST :predict: not a zero"
v2='{"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": '"$ZERO"'}],
     "parameters": {"mc_dropout": true, "samples": 50, "seed": 7}}'
answer=$(post "$port" /v2/models/digits/infer "$v2")
check "$answer" 'r["parameters"]["samples"] == 50 and {o["name"] for o in r["outputs"]} >= {"probabilities", "mutual_information"}' \
    "v2 infer with mc_dropout: wrong answer"
echo "stripped TensorFlow runs serving_default (TF Serving :predict) and mc_dropout (v2 infer)"
# The log is read whole first: `podman logs | grep -q` fails under pipefail whenever grep stops at its
# match before podman has written the rest (podman then dies of SIGPIPE).
log=$(podman logs "$SERVED" 2>&1)
grep -q "ready: http://localhost:8000/docs" <<<"$log" || fail "no ready line in the log"
! grep -q "rebuild TensorFlow" <<<"$log" || fail "TensorFlow's CPU-instruction note is shown"

# /docs and /redoc name only the service's own URLs, and each answers: they work offline.
for page in /docs /redoc; do
    html=$(curl -fsS "http://127.0.0.1:$port$page")
    urls=$(grep -oE "(src|href|spec-url)=[\"'][^\"']+|url: '[^']+" <<<"$html" | sed -E "s/^[a-z-]+(=[\"']|: ')//")
    [[ -n $urls ]] || fail "$page names no asset"
    for url in $urls; do
        [[ $url == /* && $url != //* ]] || fail "$page loads $url from outside the service"
        curl -fsS -o /dev/null "http://127.0.0.1:$port$url" || fail "$page: $url does not answer"
    done
done
echo "/docs and /redoc load only local assets, each answering 200"

uid=$(podman exec "$SERVED" id -u)
[[ $uid == 10001 ]] || fail "the service runs as uid $uid, not the image's user 10001"
echo "runs as uid $uid ($(podman top "$SERVED" user | tail -1 | tr -d ' '))"
podman healthcheck run "$SERVED" >/dev/null 2>&1 || fail "HEALTHCHECK fails on a ready container"
echo "healthcheck passes"

echo "== mounted model repository"
models=$WORK/models
mkdir "$models"
podman cp "$SERVED":/srv/dropout-serve/artifacts/digits "$models/digits-mounted"
# mktemp -d makes 0700 folders; the container's user 10001 must read the mount.
chmod -R a+rX "$models"
mounted=(-e DROPOUT_SERVE_MODEL_DIR=/models)
port2=$(start "$MOUNTED" -v "$models:/models:ro,Z" "${mounted[@]}" 2>/dev/null) \
    || port2=$(start "$MOUNTED" -v "$models:/models:ro" "${mounted[@]}")
wait_ready "$MOUNTED" "$port2"
answer=$(curl -fsS "http://127.0.0.1:$port2/models")
check "$answer" '[m["name"] for m in r] == ["digits-mounted"]' "GET /models does not list only digits-mounted"
answer=$(post "$port2" /predict "{\"model\": \"digits-mounted\", \"instances\": [$ZERO]}")
check "$answer" 'r["model"] == "digits-mounted" and r["predictions"][0]["label"] == "0"' \
    "/predict on the mounted model: wrong answer"
echo "serves digits-mounted from the mounted folder"

# A new version published into the mounted repository (staged, then renamed, as the artifact
# contract does) is picked up without a restart.
cp -r "$models/digits-mounted/1" "$models/digits-mounted/.staging-2"
chmod -R a+rX "$models"
mv "$models/digits-mounted/.staging-2" "$models/digits-mounted/2"
deadline=$((SECONDS + 60))
until curl -fsS "http://127.0.0.1:$port2/v1/models/digits-mounted" 2>/dev/null | grep -q '"version":"2","state":"AVAILABLE"'; do
    ((SECONDS < deadline)) || { podman logs "$MOUNTED" | tail -20 >&2; fail "version 2 not loaded within 60 s"; }
    sleep 0.5
done
answer=$(post "$port2" /predict "{\"model\": \"digits-mounted\", \"instances\": [$ZERO]}")
check "$answer" 'r["version"] == 2 and r["predictions"][0]["label"] == "0"' "version 2 does not serve"
answer=$(post "$port2" /v1/models/digits-mounted:predict "{\"instances\": [$ZERO]}")
check "$answer" 'max(r["predictions"][0]) == r["predictions"][0][0]' "TF Serving REST :predict: not a zero"
echo "hot reload: version 2 published into the mount serves without a restart; TF Serving REST answers"

echo "== keys, JSON logs and metrics configured with -e"
port3=$(start "$KEYED" -e DROPOUT_SERVE_API_KEYS=s3cret-key -e DROPOUT_SERVE_LOG_FORMAT=json)
wait_ready "$KEYED" "$port3"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port3/predict" -H 'content-type: application/json' \
    -d "{\"instances\": [$ZERO]}")
[[ $code == 401 ]] || fail "/predict without a key answered $code, not 401"
answer=$(curl -fsS "http://127.0.0.1:$port3/predict" -H 'content-type: application/json' \
    -H 'Authorization: Bearer s3cret-key' -H 'X-Request-ID: container-check-1' -d "{\"instances\": [$ZERO]}")
check "$answer" 'r["predictions"][0]["label"] == "0"' "/predict with the key: wrong answer"
metrics=$(curl -fsS "http://127.0.0.1:$port3/metrics")
grep -q '^dropout_serve_requests_total{.*route="/predict".*status="200"' <<<"$metrics" \
    || fail "/metrics has no dropout_serve_requests_total for /predict"
podman logs "$KEYED" >"$WORK/keyed.log" 2>&1
grep -q '"request_id": *"container-check-1"' "$WORK/keyed.log" || fail "no JSON log line with the request id"
! grep -q "s3cret-key" "$WORK/keyed.log" || fail "the API key appears in the logs"
! grep -q "s3cret-key" <<<"$metrics" || fail "the API key appears in /metrics"
echo "keys (401 without, 200 with), JSON logs with the request id, /metrics; the key is in neither"

echo "== a build context with artifacts/digits/<n> replaces the baked-in model"
context=$WORK/context
mkdir -p "$context"
cp -r Dockerfile .dockerignore pyproject.toml README.md LICENSE app training "$context/"
mkdir -p "$context/artifacts/digits"
podman cp "$SERVED":/srv/dropout-serve/artifacts/digits/1 "$context/artifacts/digits/7"
python3 - "$context/artifacts/digits/7/metadata.json" <<'PY'
import json, sys
path = sys.argv[1]
metadata = json.load(open(path))
metadata["version"], metadata["training"]["context_marker"] = 7, "from the build context"
json.dump(metadata, open(path, "w"))
PY
podman build --format docker --network host -t "$IMAGE-context" "$context" >"$WORK/build-context.log" 2>&1 || {
    tail -30 "$WORK/build-context.log" >&2
    fail "podman build with artifacts in the context"
}
# The image's contents, not the build log: a cached layer prints nothing.
baked=$(podman run --rm "$IMAGE-context" ls /srv/dropout-serve/artifacts/digits)
[[ $baked == 7 ]] || fail "the image has digits versions '$baked', not just the context's 7"
port4=$(IMAGE=$IMAGE-context start "$CONTEXT")
wait_ready "$CONTEXT" "$port4"
answer=$(curl -fsS "http://127.0.0.1:$port4/models/digits")
check "$answer" '[v["version"] for v in r["versions"]] == [7]' "the image does not serve the context's digits version 7"
answer=$(post "$port4" /predict "{\"instances\": [$ZERO]}")
check "$answer" 'r["version"] == 7 and r["predictions"][0]["label"] == "0"' "version 7 from the context does not serve"
echo "the build context's artifacts/digits/7 is served instead of training a model"

echo "== stop"
t0=$(now)
podman stop -t 10 "$SERVED" >"$WORK/stop.log" 2>&1 || { cat "$WORK/stop.log" >&2; fail "podman stop"; }
stop_time=$(since "$t0")
code=$(podman inspect -f '{{.State.ExitCode}}' "$SERVED")
podman logs "$SERVED" >"$WORK/served.log" 2>&1
python3 -c 'import sys; sys.exit(float(sys.argv[1]) > 8)' "$stop_time" || fail "podman stop took $stop_time s"
[[ $code == 0 ]] || { tail -20 "$WORK/served.log" >&2; fail "exit code $code after podman stop"; }
grep -q "Finished server process" "$WORK/served.log" || fail "uvicorn did not shut down gracefully"
echo "stopped in $stop_time s, exit code 0, uvicorn shut down gracefully"

echo
echo "PASS: build $build_time s, image $size_mb MB, run to ready $ready_time s, stop $stop_time s"
