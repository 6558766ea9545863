# flatfs: `make demo` and `make test` work on a fresh Debian machine as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all demo test test-fast check bench fuzz-long deps-run deps-test venv clean

all: test

deps-run:
	@sh .ci/ensure-deps run

deps-test:
	@sh .ci/ensure-deps test

$(BIN)/.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(BIN)/python -m pip install -q -e '.[test]' >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@touch $@

venv: $(BIN)/.stamp

demo: deps-run venv
	@$(BIN)/python demo/demo.py

test: deps-test venv
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

check: deps-run venv
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/mypy

test-fast: venv
	@$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: deps-test venv
	@$(BIN)/python bench/run.py $(BENCH_ARGS)

fuzz-long: deps-test venv
	@FLATFS_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest tests/fuzz $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
