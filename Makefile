# `make test` and `make demo` create .venv on first use (editable install with the dev extra).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint tools demo demo-photos venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Lint and types first: a finding fails the build before the (long) suite runs.
lint: $(STAMP)
	$(VENV)/bin/ruff check platform serving jobs tests
	$(VENV)/bin/mypy

# Chromium and kubectl, installed where this machine allows (.ci/tools); the tests of a tool that
# cannot be had here are skipped and listed with the reason at the end, any other one fails.
tools: $(STAMP)
	bash .ci/tools > $(VENV)/.missing-tools

test: lint tools
	DEEPINDEX_MISSING_TOOLS="$$(cat $(VENV)/.missing-tools)" $(PY) -m pytest --durations=15

demo: $(STAMP)
	$(PY) jobs/demo.py

# The example colour photo collection (deepindex example photos), then Ray Train on it with its recipe.
demo-photos: $(STAMP)
	$(PY) -m deepindex.cli example photos .deepindex/example-photos --force
	$(PY) -m deepindex.cli train --config .deepindex/example-photos/train.yaml --name example-photos

clean:
	-test -x $(PY) && $(PY) -m deepindex.cli down
	rm -rf .deepindex .pytest_cache .mypy_cache .ruff_cache
