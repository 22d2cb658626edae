# Two commands for a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv and install the project on first use; later runs skip installation unless pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mhist-installed
REPORTS ?= reports/demo

.PHONY: demo test install nbtest pytest bench export clean-demo help gpu-check test-deps outputs readme docs
help:
	@echo "make demo   - the pipeline of params/demo.yaml on synthetic tiles into $(REPORTS)/ (MLflow: mlflow.db)"
	@echo "make test   - nbdev-test (including #| slow cells) and pytest"
	@echo "make bench  - benchmark tables (benchmarks/*.py)"
	@echo "make outputs - re-execute the library chapters (with #| slow cells) and store their outputs (committed)"
	@echo "make readme - README.md from nbs/index.ipynb (its results cell re-executed on reports/demo)"
	@echo "make docs   - the docs site in _docs/ from the committed outputs (offline; nbdev-docs with Quarto in CI)"
	@echo "make gpu-check - on a GPU box, with the python3 on PATH (no install): GPU tests, benchmarks, smoke pipeline; summary in $(GPU_CHECK_OUT)/"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,serve,app,scale]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import mhist_nb, torch, torchvision, nbdev, papermill, flask, gunicorn, prometheus_client, schemathesis, streamlit, captum, psycopg, flask_wtf" \
	  || { echo "installation into $(VENV) failed" >&2; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mhist run params/demo.yaml --name $(notdir $(REPORTS)) --reports $(dir $(REPORTS))
	@echo
	@echo "Reports in $(REPORTS)/: executed notebooks (*.ipynb) with their HTML, figures, tables and predictions."
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db   (then open http://127.0.0.1:5000)"

# System packages that only tests need, from Debian: chromium, which tests/test_app.py and tests/test_docs.py drive with
# Playwright (Playwright's own browser download is never used), and postgresql, the backend store of the shared MLflow
# server that tests/test_tracking_server.py starts on loopback (the cluster service is not started: the test runs its
# own). Idempotent: nothing to do when both are present. Without them those tests skip, saying why. CI (.ci/run) calls it.
TEST_DEBS = $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)
test-deps:
	@debs="$(strip $(TEST_DEBS))"; \
	if [ -z "$$debs" ]; then echo "test-deps: chromium and postgresql present"; \
	elif ! command -v apt-get >/dev/null; then echo "test-deps: no apt-get; install $$debs to run the tests that need them"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "test-deps: not root and no sudo; run as root: apt-get install -y --no-install-recommends $$debs"; exit 0; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$debs; \
	fi

# Notebooks and tests write scratch files (checkpoints, tiles, models) through tempfile: `make test` points TMPDIR at
# one scratch folder and removes it afterwards, so repeated runs don't fill the disk.
test: $(STAMP)
	@scratch=$$(mktemp -d -t mhist-test-XXXXXX) && trap 'rm -rf "$$scratch"' EXIT && \
	  TMPDIR="$$scratch" $(MAKE) --no-print-directory nbtest pytest

nbtest: $(STAMP)
	$(BIN)/nbdev-test --flags slow --n-workers 2 --timing

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/trainer.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/ddp.py

export: $(STAMP)
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean

clean-demo:
	rm -rf $(REPORTS) data/synth

# On a machine with a GPU and a prepared Python (no install step, no network): the python3 on PATH must have torch; the
# project is used from this checkout through PYTHONPATH. tools/gpu_check.py runs the GPU tests, the DDP benchmark (2+
# GPUs), benchmarks/gpu.py and (with papermill, nbconvert, ipykernel, mlflow) the smoke pipeline, and ends with one
# summary table, also in $(GPU_CHECK_OUT)/summary.json. Without CUDA it says so and succeeds.
GPU_PY ?= python3
GPU_CHECK_OUT ?= reports/gpu-check
gpu-check:
	@PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PY) tools/gpu_check.py --out $(GPU_CHECK_OUT)

# Library chapters are committed with their outputs (the docs are built from them, as in nbdev projects): re-execute
# them here after changing one, then commit. Scratch files go to a folder removed afterwards.
LIBRARY_NBS = $(shell grep -l '"\#| default_exp' nbs/*.ipynb)
outputs: $(STAMP)
	@scratch=$$(mktemp -d -t mhist-outputs-XXXXXX) && trap 'rm -rf "$$scratch"' EXIT && \
	  for nb in $(LIBRARY_NBS); do echo "$$nb"; TMPDIR="$$scratch" TQDM_DISABLE=1 PYTHONWARNINGS='ignore:IProgress not found' \
	    MLFLOW_LOGGING_LEVEL=WARNING $(BIN)/nbdev-test "$$nb" --flags slow --save || exit 1; done
	$(BIN)/nbdev-clean

readme: $(STAMP)
	$(BIN)/nbdev-test nbs/index.ipynb --save && $(BIN)/nbdev-clean --fname nbs/index.ipynb
	$(BIN)/python tools/docs.py readme

docs: $(STAMP)
	$(BIN)/python tools/docs.py site --out _docs --reports $(REPORTS)
