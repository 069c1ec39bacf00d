# candlecast — the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000

.PHONY: install run test lint bench requirements clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Layer requirements are generated from pyproject.toml, never edited by hand.
requirements: $(STAMP)
	$(BIN)/python infra/layer_requirements.py --write

run: $(STAMP)
	$(BIN)/python -m infra.run_local --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python infra/layer_requirements.py --check

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m infra.bench

clean:
	rm -rf $(VENV) .aws-sam .local .pytest_cache .ruff_cache
