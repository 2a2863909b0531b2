# One-command entry points. `make run` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast lint bench clean kafka-start kafka-stop

$(BIN)/dispatchkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

## the virtualenv, and dispatchkit's bytecode compiled as a wheel install does
setup: $(BIN)/dispatchkit
	@$(BIN)/python -m compileall -q src/dispatchkit > /dev/null

## run the article's whole job: 2M generated rows, embedded broker, results + chart in out/
run: setup
	$(BIN)/dispatchkit run --out out

## the whole test suite: starts a local Kafka (unless DISPATCHKIT_BOOTSTRAP_SERVERS is set)
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/test

## everything but the slow fault-injection scenarios
test-fast: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/test -m "not slow"

lint: setup
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/dispatchkit bench --out bench-out

kafka-start:
	scripts/kafka start

kafka-stop:
	scripts/kafka stop

clean:
	rm -rf out bench-out .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
