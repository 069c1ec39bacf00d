# candlecast — the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
# The Lambda runtime's Python: the dev venv's, sam build's and the artifact check's.
PY312_BIN := $(shell for p in "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
	"$$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$$(command -v python3.12)"; do \
	"$$p" -c '' 2>/dev/null && { dirname "$$p"; break; }; done)
# The dev venv runs it with the layers' pins, so the suite tests the numpy and pyarrow that ship; without a 3.12 it
# falls back to python3 and the newest that fit.
PYTHON ?= $(if $(PY312_BIN),$(PY312_BIN)/python3.12,python3)
VENV := .venv
BIN := $(VENV)/bin
# Named after its Python: a venv installed by another (3.11 before 2026-12-06) is made again.
STAMP := $(VENV)/.installed-$(notdir $(PYTHON))
LAMBDA_RUNTIME := .local/lambda-runtime
PORT ?= 3000

.PHONY: install run test test-clock lint bench bench-scale bench-score-year bench-score-backlog requirements lock-layers clean tools qa-tools browser mutation check-template check-artifacts migrations-hash openapi

VERSION_OF = -c 'import sys; print(*sys.version_info[:2], sep=".")'
$(STAMP): pyproject.toml layers/constraints.txt
	[ -x $(BIN)/python ] && [ "$$($(BIN)/python $(VERSION_OF))" = "$$($(PYTHON) $(VERSION_OF))" ] \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ "$$($(BIN)/python $(VERSION_OF))" = 3.12 ]; then pins="-c layers/constraints.txt"; \
	else pins=; echo "no Python 3.12: the dev venv is not on the layers' pins (layers/constraints.txt)"; fi; \
	$(BIN)/python -m pip install --quiet $$pins -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Layer requirements are generated from pyproject.toml, never edited by hand.
requirements: $(STAMP)
	$(BIN)/python infra/layer_requirements.py --write

## Pin the layers' dependencies again (layers/constraints.txt): the registry's newest that fit, for Lambda arm64.
lock-layers: $(STAMP)
	$(BIN)/python infra/layer_requirements.py --lock

run: $(STAMP)
	$(BIN)/python -m infra.run_local --port $(PORT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python infra/layer_requirements.py --check

test: lint check-template check-artifacts qa-tools browser
	$(BIN)/python -m pytest

## The time-dependent tests with each one started a few seconds from an hour boundary (tests/clock_boundaries.py).
## tests/clock_shift.c, preloaded, moves the wall clock of pytest, PostgreSQL, Redis and moto; it needs a C compiler.
CLOCK_TESTS ?= tests/test_ingest.py tests/test_predictions.py tests/test_track_record.py tests/test_cache.py \
	tests/test_seed.py tests/test_retention.py tests/test_timeframes.py tests/test_drift.py tests/test_bad_state.py \
	tests/test_local_track_record.py tests/test_hardening.py tests/test_secrets.py
CLOCK_SHIFT := .local/clock/clock_shift.so
CLOCK_OFFSET := .local/clock/offset
$(CLOCK_SHIFT): tests/clock_shift.c
	mkdir -p $(@D) && $(CC) -O2 -Wall -Wextra -shared -fPIC -o $@ $< -ldl

test-clock: $(STAMP) $(CLOCK_SHIFT)
	head -c 8 /dev/zero > $(CLOCK_OFFSET)
	LD_PRELOAD=$(CURDIR)/$(CLOCK_SHIFT) CLOCK_SHIFT_FILE=$(CURDIR)/$(CLOCK_OFFSET) \
		$(BIN)/python -m pytest -p tests.clock_boundaries $(CLOCK_TESTS) $(ARGS)

## The fault suite (issue 10): Redis, PostgreSQL and S3 frozen and killed under load; prints a table.
.PHONY: faults
faults: $(STAMP)
	$(BIN)/python -m infra.faults

bench: $(STAMP) tools $(LAMBDA_RUNTIME)/.installed
	PATH="$(PY312_BIN):$$PATH" $(BIN)/python -m infra.bench

## 1M predictions x 30 steps in an embedded PostgreSQL under BENCH_SCALE_TMP (a few GB); not part of `make test`.
## Timed at normal priority; the loading connection's server process lowers itself to nice 19.
BENCH_SCALE_TMP ?= $(CURDIR)/.local/bench-scale
bench-scale: $(STAMP)
	mkdir -p $(BENCH_SCALE_TMP)
	TMPDIR=$(BENCH_SCALE_TMP) $(BIN)/python -m infra.bench_scale

## scoring.run on a production-shaped year (33,333 predictions x 30 steps, 150 symbols' candle files) on the local
## stack; state kept under .local/bench-score-year (--rebuild to build it again); not part of `make test`.
bench-score-year: $(STAMP)
	$(BIN)/python -m infra.bench_score_year

## The Score function's backlog throughput, old against new on 1M predictions (predictions/s and whether the
## track record is identical); SCORE_BASELINE is the old code's revision. Same state folder as bench-score-year.
SCORE_BASELINE ?= 0cdba5f
bench-score-backlog: $(STAMP)
	$(BIN)/python -m infra.bench_score_year --predictions 1000000 --compare $(SCORE_BASELINE) --budget 90

## First stops the Redis and PostgreSQL that a killed `make run` left running on a state folder under .local.
clean:
	if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.local_stack stop-leftovers .local/*/; fi
	rm -rf $(VENV) .aws-sam .local .pytest_cache .ruff_cache

## Template checks (template.yaml): cfn-lint, sam validate --lint, checkov on the translated template,
## sam build for arm64 without Docker, native-code and 250 MB size checks. SAM CLI and checkov pin
## boto3 and friends, so each gets its own venv under .local/, from the `sam` / `checkov` extras.
SAM_VENV := .local/sam-venv
CHECKOV_VENV := .local/checkov-venv
QA_VENV := .local/qa-venv
EXTRA = $$($(BIN)/python -c 'import sys, tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' $(1))

$(SAM_VENV)/.installed $(CHECKOV_VENV)/.installed $(QA_VENV)/.installed: .local/%/.installed: pyproject.toml $(STAMP)
	@test -n "$(PY312_BIN)" || { echo "python3.12 not found (pyenv install 3.12)"; exit 1; }
	test -x .local/$*/bin/python || $(PY312_BIN)/python3.12 -m venv .local/$*
	.local/$*/bin/python -m pip install --quiet $(call EXTRA,$(subst -venv,,$*))
	touch $@

tools: $(SAM_VENV)/.installed $(CHECKOV_VENV)/.installed

qa-tools: $(QA_VENV)/.installed

## Mutation testing (not in CI): kill rate per core module; `make mutation MODULES="tickers cache"` for some.
mutation: $(STAMP) $(QA_VENV)/.installed
	nice $(BIN)/python -m infra.mutation $(MODULES)

## Debian's chromium for the browser test (tests/test_page.py drives it headless with playwright, which
## never downloads a browser). Installed only when missing, and only where apt-get can run (root, as in CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] \
		&& { apt-get update -qq && apt-get install -y --no-install-recommends chromium; } \
		|| echo "chromium missing: run 'sudo apt-get install chromium' (the browser test skips without it)"; }

check-template: $(STAMP) tools
	PATH="$(PY312_BIN):$$PATH" $(BIN)/python infra/template_checks.py all

## Every function run from an x86_64 twin of `sam build`, as Lambda runs it (infra/artifacts.py).
$(LAMBDA_RUNTIME)/.installed: pyproject.toml $(STAMP)
	rm -rf $(LAMBDA_RUNTIME)
	$(PY312_BIN)/python3.12 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
		--target $(LAMBDA_RUNTIME) $(call EXTRA,lambda-runtime)
	touch $@

check-artifacts: $(STAMP) tools $(LAMBDA_RUNTIME)/.installed
	PATH="$(PY312_BIN):$$PATH" nice $(BIN)/python -m infra.artifacts check

migrations-hash: $(STAMP)
	$(BIN)/python infra/template_checks.py migrations-hash --write

openapi: $(STAMP)
	$(BIN)/python infra/openapi.py --write
