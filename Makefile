# driftloop: the front door. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --warn-undefined-variables

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
DRIFTLOOP := $(VENV)/bin/driftloop
PYTEST_ARGS ?=

##@ Start here
.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"} /^##@/ {printf "\n\033[1m%s\033[0m\n", substr($$0, 5)} \
	  /^[a-zA-Z_-]+:.*##/ {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: demo
demo: install ## The whole loop on this machine: train, serve, drift, retrain, new champion served
	$(DRIFTLOOP) demo

.PHONY: test
test: install lint ## Install everything pinned, lint, and run the whole test suite
	$(VENV)/bin/pytest $(PYTEST_ARGS)

##@ Development
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.PHONY: install
install: $(UV) ## Create .venv from uv.lock (pinned, nothing resolved anew)
	$(UV) sync --frozen --python $(PYTHON)

.PHONY: lock
lock: $(UV) ## Re-resolve uv.lock after editing pyproject.toml
	$(UV) lock

.PHONY: lint
lint: install ## Ruff over the code and tests
	$(VENV)/bin/ruff check driftloop pipelines serving monitoring feature_repo tests

.PHONY: ui
ui: install ## MLflow UI on the local store (runs, registered model, aliases)
	$(DRIFTLOOP) ui

.PHONY: pipeline
pipeline: install ## Compile the KFP v2 pipeline to pipeline.yaml
	$(DRIFTLOOP) pipeline compile --out pipeline.yaml

##@ Benchmarks (not tests: numbers, not pass/fail)
.PHONY: bench-train
bench-train: install ## Wall time of `driftloop train`, local engine vs Prefect flow, same run, as a ratio
	$(VENV)/bin/python -m pipelines.bench

.PHONY: bench-drift
bench-drift: install ## Drift check vs Evidently DataDriftPreset, 100k and 1M rows x 20 columns: times, ratio, agreement
	$(VENV)/bin/python -m monitoring.bench

# MLServer 1.7 needs a FastAPI older than Prefect accepts: it gets a venv of its own, with the
# model's libraries at the versions uv.lock pins for the project.
MLSERVER_VENV := .bench/mlserver
MLSERVER_PKGS := mlserver==1.7.1 mlserver-mlflow==1.7.1 mlflow==3.17.2 xgboost==3.2.0 scikit-learn==1.9.1 \
  uvloop==0.21.0  # MLServer 1.7 calls asyncio.get_event_loop(), which uvloop >= 0.22 refuses

$(MLSERVER_VENV)/bin/mlserver: | $(UV)
	$(UV) venv --quiet --python $(PYTHON) $(MLSERVER_VENV)
	$(UV) pip install --quiet --python $(MLSERVER_VENV)/bin/python $(MLSERVER_PKGS)

.PHONY: bench-serving
bench-serving: install $(MLSERVER_VENV)/bin/mlserver ## Our server vs mlflow models serve, MLServer and echo floors (needs wrk)
	@command -v wrk >/dev/null || { echo "bench-serving needs wrk: apt-get install wrk"; exit 1; }
	MLSERVER_PYTHON=$(MLSERVER_VENV)/bin/python $(VENV)/bin/python -m serving.bench

##@ Clean-up
.PHONY: clean
clean: ## Remove local state (data, stores, runs, models) and compiled pipelines
	rm -rf .driftloop pipeline.yaml

.PHONY: distclean
distclean: clean ## Also remove the virtual environment and tools
	rm -rf $(VENV) $(TOOLS) .bench .pytest_cache .ruff_cache
