#!/usr/bin/env bash
# The long contract run: schemathesis, all checks, against `python -m app` on a free loopback port.
#
#   bash bench/schemathesis_run.sh [MODEL_DIR] [MAX_EXAMPLES]     (defaults: artifacts, 500)
#
# tests/test_contract.py runs the same with 50 examples per operation. Reports (JUnit, NDJSON)
# land in schemathesis-report/; the exit status is schemathesis's (0: no failure of any kind).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-artifacts}
MAX_EXAMPLES=${2:-500}
PY=${PYTHON:-.venv/bin/python}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp)
DROPOUT_SERVE_MODEL_DIR=$MODEL_DIR DROPOUT_SERVE_HOST=127.0.0.1 DROPOUT_SERVE_PORT=$PORT "$PY" -m app >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$PORT/health/ready" >/dev/null && break
    kill -0 "$SERVER" || { cat "$LOG"; exit 1; }
    sleep 0.3
done
status=0
"$(dirname "$PY")/schemathesis" --config-file schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" --checks all \
    --max-examples "$MAX_EXAMPLES" --seed 1 --workers 2 --request-timeout 60 --suppress-health-check all \
    --exclude-path-regex '/unload$' \
    --report junit,ndjson --report-dir schemathesis-report || status=$?
if grep -q "Traceback" "$LOG"; then echo "server log has a traceback:"; grep -A20 Traceback "$LOG"; exit 1; fi
exit $status
