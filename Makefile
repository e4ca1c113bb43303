# Two entry points for a new user: `make demo` and `make test`. Both create .venv if missing.
# `make test` = ruff + mypy (metagrad/core) + pytest; `make test-fast` skips the slow end-to-end tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

.PHONY: demo test test-fast typecheck lint format bench docs clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,rl]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m metagrad.experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check metagrad tests benchmarks examples docs/hooks.py
	$(BIN)/ruff format --check metagrad tests benchmarks examples docs/hooks.py

format: $(STAMP)
	$(BIN)/ruff format metagrad tests benchmarks examples docs/hooks.py
	$(BIN)/ruff check --fix metagrad tests benchmarks examples docs/hooks.py

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# the unit tests alone (under a minute): everything not marked slow
test-fast: lint typecheck
	$(BIN)/pytest -m "not slow"

# the documentation site into site/ (broken links and missing references fail the build)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Peers (higher, TorchOpt) live in their own venv; torch stays pinned by the constraints file.
$(BENCH_STAMP): pyproject.toml benchmarks/requirements.txt benchmarks/constraints.txt
	test -d $(BENCH_VENV) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints.txt -e .
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints.txt -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

# All configs, second order, sizes that take about 10 minutes on 2 cores (MAML).
# The family, one algorithm per run: make bench BENCH_ARGS="--algorithm metasgd"
# (metasgd | anil | maml-adam | imaml; e.g. BENCH_ARGS="--config sinusoid --algorithm anil --rounds 4").
bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/bench_maml.py --config all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache
