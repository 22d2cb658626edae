# Two commands for a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv and install the project on first use; later runs skip installation unless pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mhist-installed
DATA ?= data/synth
SCALE ?= 0.25
SEED ?= 0
JOBS ?= 2
REPORTS ?= reports/demo

.PHONY: demo test install nbtest pytest bench export clean-demo help
help:
	@echo "make demo   - synthetic tiles + exploration report into $(REPORTS)/"
	@echo "make test   - nbdev-test (including #| slow cells) and pytest"
	@echo "make bench  - benchmark tables (benchmarks/*.py)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import mhist_nb, torch, torchvision, nbdev, papermill" \
	  || { echo "installation into $(VENV) failed" >&2; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mhist synth $(DATA) --scale $(SCALE) --seed $(SEED) --jobs $(JOBS)
	$(BIN)/mhist explore --data-dir $(DATA) --out-dir $(REPORTS) --seed $(SEED)
	@echo
	@echo "Reports in $(REPORTS)/: executed notebook 02_explore.ipynb, its HTML, figures *.png, tables *.csv"
	@echo "Open $(REPORTS)/02_explore.html in a browser, or the .ipynb in Jupyter or VS Code."

test: $(STAMP) nbtest pytest

nbtest: $(STAMP)
	$(BIN)/nbdev-test --flags slow --n-workers 2 --timing

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/data.py

export: $(STAMP)
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean

clean-demo:
	rm -rf $(REPORTS)
