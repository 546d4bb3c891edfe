# The two quick-start commands: `make run` (psq's main job) and `make test` (the test suite).
# Each sets up its own .venv, installing torch==2.13.0 before the project so that pip keeps the
# CPU build instead of resolving a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.psq-installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "psq needs Python 3.10 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,bench,metrics,lightning]'
	$(BIN)/python -m psq.native  # psq's CPU kernels, built once here rather than in the first step
	touch $@

# A fresh run folder each time: its own snapshot, so a run starts with no history.
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" PSQ_RUN_DIR="runs/$$(date +%Y%m%d-%H%M%S)" $(BIN)/honcho start

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2  # two at a time: most tests wait on processes and sockets

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
