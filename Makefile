# The two set-up commands (README): `make quickstart` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint bench-cpu study-cpu study-report clean

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

# The study's CPU tier (benchmarks/study.md): resumable; the tier's models and store travel with the repository.
STUDY ?= cpu_tier
STUDY_DB := sqlite:///benchmarks/study/$(STUDY)/mlflow.db
study-cpu: $(STAMP)
	$(PY) benchmarks/study_models.py restore
	$(PY) unlearn.py -m +study=cpu_overview
	$(PY) unlearn.py -m +study=cpu_extras
	$(PY) benchmarks/study_models.py save
	$(MAKE) study-report

study-report: $(STAMP)
	$(PY) -m potion.report --tracking-uri $(STUDY_DB) --out benchmarks/study/$(STUDY)/report
	$(PY) benchmarks/study_page.py --report benchmarks/study/$(STUDY)/report

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlflow.db outputs multirun
