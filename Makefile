# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 0.0.0.0
PORT ?= 8000
BENCH_ARGS ?=
BIN := $(VENV)/bin

.PHONY: serve test lint bench clean

serve: $(VENV)/.installed
	$(BIN)/python -m training --if-missing
	DROPOUT_SERVE_HOST=$(HOST) DROPOUT_SERVE_PORT=$(PORT) $(BIN)/python -m app

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

bench: $(VENV)/.installed
	$(BIN)/python -m training --if-missing
	$(BIN)/python bench/serving.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
