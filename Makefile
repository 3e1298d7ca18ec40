# The two commands of the README: `make quickstart` (set up + run the main job) and `make test`.
# Both create ./.venv on first use. CPU machines get the pinned CPU build of torch; on a GPU
# machine pass your own, e.g. `make quickstart TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test test-slow test-all bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

quickstart: $(VENV)/.core
	$(BIN)/lmforge quickstart --overwrite

test: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow" --durations=25

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow --durations=25

test-all: test test-slow

clean-venv:
	rm -rf $(VENV)
