# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 0.0.0.0
PORT ?= 8000
BENCH_ARGS ?=
BIN := $(VENV)/bin
# TensorFlow's C++ start-up notes (CPU instructions it was not built for) read like errors.
export TF_CPP_MIN_LOG_LEVEL ?= 1

# Debian tools the tests drive: haproxy (tests/test_replicas.py) and wrk (tests/test_bench.py).
TEST_TOOLS := haproxy wrk

.PHONY: serve test test-tools lint bench bench-replicas clean

# Serving and the default training: the server's dependencies and the [train] extra, no test tools.
serve: $(VENV)/.installed-train
	$(BIN)/python -m training --if-missing
	$(BIN)/python -m app --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-tools:
	@missing=$$(for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || echo $$tool; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing" $$missing; apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    else echo "the tests need:" $$missing "(Debian: sudo apt-get install" $$missing")"; exit 1; fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# .installed-train: `pip install -e '.[train]'`; .installed-dev: `.[dev]` (which includes train).
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$*]'
	touch $@

bench: $(VENV)/.installed-dev
	$(BIN)/python -m training --if-missing
	$(BIN)/python bench/serving.py $(BENCH_ARGS)

# Throughput with 1, 2 and 3 replicas behind HAProxy (apt-get install haproxy).
bench-replicas: $(VENV)/.installed-dev
	$(BIN)/python -m training --if-missing
	$(BIN)/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
