# Two front doors, each doing its own set-up: `make demo` (the package alone) and `make test` (with the test extras).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The demo needs the package only: a first `make demo` does not download torch, transformers or libtpu.
$(BIN)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test bench
demo: $(BIN)/.installed-demo
	$(BIN)/analogjax demo --workdir $(WORKDIR)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed-test
	$(BIN)/python bench/step.py
