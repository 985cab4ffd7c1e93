# The two set-up commands (README): `make quickstart` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint bench-cpu study-tree study-models study-cpu study-report study-smoke clean

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
# It runs the code it was frozen at (benchmarks/study/<tier>/CODE_COMMIT) from a git worktree in .study/, so work
# on main never changes a study half-way; writing another commit there starts a new study (its cells run again).
STUDY ?= cpu_tier
STUDY_COMMIT = $(shell cat benchmarks/study/$(STUDY)/CODE_COMMIT)
STUDY_TREE = .study/$(STUDY_COMMIT)
STUDY_DB = sqlite:///$(CURDIR)/benchmarks/study/$(STUDY)/mlflow.db
IN_TREE = cd $(STUDY_TREE) && POTION_THREADS=1 $(CURDIR)/$(PY)
# One job per core, one torch thread each (a second thread per job mostly spins on these small networks): Hydra's
# joblib launcher.
STUDY_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PARALLEL := hydra/launcher=joblib hydra.launcher.n_jobs=$(STUDY_JOBS)
STUDY_ATTACKS := badnets,blend,sig,wanet,ftrojan,label_consistent,all_to_all

# The frozen checkout; the tier's dataset path (../shared/data) is relative, so .study/shared points where ../shared does.
study-tree: $(STAMP)
	test -d $(STUDY_TREE) || git worktree add --detach $(STUDY_TREE) $(STUDY_COMMIT)
	ln -sfn $(abspath ../shared) .study/shared

study-models: study-tree
	$(PY) benchmarks/study_models.py restore --runs $(STUDY_TREE)/runs/train
	$(IN_TREE) train.py -m $(PARALLEL) experiment=study_cpu seed=0,1,2 study_attack=$(STUDY_ATTACKS) \
		logger.tracking_uri=$(STUDY_DB)
	$(PY) benchmarks/study_models.py save --runs $(STUDY_TREE)/runs/train

study-cpu: study-models
	$(IN_TREE) unlearn.py -m $(PARALLEL) +study=cpu_overview logger.tracking_uri=$(STUDY_DB)
	$(IN_TREE) unlearn.py -m $(PARALLEL) +study=cpu_extras logger.tracking_uri=$(STUDY_DB)
	$(MAKE) study-report

study-report: $(STAMP)
	$(PY) -m potion.report --tracking-uri $(STUDY_DB) --commit $(STUDY_COMMIT) --out benchmarks/study/$(STUDY)/report
	$(PY) benchmarks/study_page.py --report benchmarks/study/$(STUDY)/report

# The smoke tier: the same machinery (train.py models, unlearn.py multirun, MLflow, potion.report) in minutes, offline,
# at this checkout's code, on the digits; store and report under runs/study_smoke/.
study-smoke: $(STAMP)
	POTION_THREADS=1 $(PY) unlearn.py -m $(PARALLEL) +study=smoke
	$(PY) -m potion.report --tracking-uri sqlite:///$(CURDIR)/runs/study_smoke/mlflow.db --out runs/study_smoke/report

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlflow.db outputs multirun
