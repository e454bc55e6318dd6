# `make test` and `make demo` create .venv on first use (editable install with the dev extra).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-photos venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) jobs/demo.py

# The example colour photo collection (deepindex example photos), then Ray Train on it with its recipe.
demo-photos: $(STAMP)
	$(PY) -m deepindex.cli example photos .deepindex/example-photos --force
	$(PY) -m deepindex.cli train --config .deepindex/example-photos/train.yaml --name example-photos

clean:
	-test -x $(PY) && $(PY) -m deepindex.cli down
	rm -rf .deepindex .pytest_cache
