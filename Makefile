# The two set-up commands (README): `make quickstart` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m potion.quickstart

test: $(STAMP)
	$(PY) -m pytest

# The inner loop while editing: everything not marked slow (no training, no pipeline runs, no heavy subprocess).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlflow.db outputs multirun
