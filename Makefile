# Two entry points for a new user: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,rl]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m metagrad.experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check metagrad tests benchmarks
	$(BIN)/ruff format --check metagrad tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format metagrad tests benchmarks
	$(BIN)/ruff check --fix metagrad tests benchmarks

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
