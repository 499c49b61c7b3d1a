# driftloop: the front door. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --warn-undefined-variables

# The Python uv finds on this machine, or fetches where none is (pyproject.toml allows 3.11 only)
PYTHON ?= 3.11
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
DRIFTLOOP := $(VENV)/bin/driftloop
PYTEST_ARGS ?=
TEST_WORKERS ?= 2  # pytest-xdist processes; a module's tests stay in one (they share its servers)
include infra/versions.env  # pinned Kubernetes tool and add-on versions (HELM_VERSION, …)

##@ Start here
.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"} /^##@/ {printf "\n\033[1m%s\033[0m\n", substr($$0, 5)} \
	  /^[a-zA-Z0-9_-]+:.*##/ {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: demo
demo: install ## The whole loop on this machine: train, serve, drift, retrain, new champion served
	$(DRIFTLOOP) demo

.PHONY: test
test: install lint chart-tools system-deps ## Install everything pinned, lint, run the whole test suite (TEST_WORKERS=2 xdist workers)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

.PHONY: system-deps
system-deps: ## Chromium, redis-server and PostgreSQL for the tests (installed with apt as root, else named); checks Go
	tests/system-deps.sh

##@ Development
$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.PHONY: install
install: $(UV) ## Create .venv from uv.lock (pinned, nothing resolved anew)
	$(UV) sync --frozen --python $(PYTHON)

.PHONY: lock
lock: $(UV) ## Re-resolve uv.lock after editing pyproject.toml
	$(UV) lock

# The chart's checks run the real tools: helm built from its pinned source with the Go toolchain
# (the official Go tarball puts it in /usr/local/go/bin), and checkov in a venv of its own (its pins
# clash with the project's), resolved as PyPI stood on CHECKOV_INDEX_DATE so it installs the same.
HELM := $(TOOLS)/bin/helm
CHECKOV_VERSION := 3.3.30
CHECKOV_INDEX_DATE := 2026-11-01
CHECKOV := $(TOOLS)/checkov/bin/checkov

$(HELM): | $(UV)
	@PATH="$$PATH:/usr/local/go/bin" command -v go >/dev/null || \
	  { echo "building helm $(HELM_VERSION) needs the Go toolchain: https://go.dev/dl"; exit 1; }
	PATH="$$PATH:/usr/local/go/bin" GOBIN="$(abspath $(TOOLS)/bin)" GOFLAGS=-buildvcs=false \
	  go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

$(CHECKOV): | $(UV)
	$(UV) venv --quiet --python $(PYTHON) $(TOOLS)/checkov
	$(UV) pip install --quiet --python $(TOOLS)/checkov/bin/python --exclude-newer $(CHECKOV_INDEX_DATE) \
	  checkov==$(CHECKOV_VERSION)

.PHONY: chart-tools
chart-tools: $(HELM) $(CHECKOV) ## Build helm and install checkov (pinned), for the chart's tests

.PHONY: lint
lint: install ## Ruff over the code and tests
	$(VENV)/bin/ruff check driftloop pipelines serving monitoring feature_repo tests infra

.PHONY: ui
ui: install ## The MLflow (:5000), Evidently (:8000) and Prefect (:4200) UIs on the local stores
	$(DRIFTLOOP) ui

.PHONY: pipeline
pipeline: install ## Compile the KFP v2 pipeline to pipeline.yaml
	$(DRIFTLOOP) pipeline compile --out pipeline.yaml

##@ Benchmarks (not tests: numbers, not pass/fail)
.PHONY: bench-train
bench-train: install ## Wall time of `driftloop train`, local engine vs Prefect flow, same run, as a ratio
	$(VENV)/bin/python -m pipelines.bench

.PHONY: bench-cli
bench-cli: install ## CPU time of each everyday command next to `python -c pass` and `mlflow --version`, same run
	$(VENV)/bin/python -m driftloop.bench

.PHONY: bench-drift
bench-drift: install ## Drift check vs Evidently DataDriftPreset (100k and 1M rows x 20 columns: times, ratio, agreement) and robustness to extreme rows
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

##@ Kubernetes (needs Docker, kind, kubectl and helm; `make preflight` checks)
# Pinned versions live in infra/versions.env, which the scripts read. CLUSTER=current deploys into the
# current kubectl context instead of a local kind cluster, and pushes the image to REGISTRY.
CLUSTER ?= kind
GPU ?= 0
AIRGAP ?= 0
REGISTRY ?=
NAMESPACE ?= kubeflow
ENGINE ?= prefect
SECRET ?=
E2E_AIRGAP ?= 1
ifeq ($(CLUSTER),current)
VALUES ?= helm/values/cloud.yaml
else ifeq ($(GPU),1)
VALUES ?= helm/values/kind-gpu.yaml
else
VALUES ?= helm/values/kind.yaml
endif
INFRA_ENV = CLUSTER=$(CLUSTER) GPU=$(GPU) AIRGAP=$(AIRGAP) REGISTRY=$(REGISTRY) NAMESPACE=$(NAMESPACE) VALUES=$(VALUES)

.PHONY: preflight
preflight: ## Check tools, versions, Docker, memory, CPUs, inotify (GPU=1: GPU set-up; CLUSTER=current)
	AIRGAP=$(AIRGAP) infra/preflight.sh --cluster $(CLUSTER)$(if $(filter 1,$(GPU)), --gpu)$(if $(filter 1,$(AIRGAP)), --airgap)$(if $(findstring kind-small,$(VALUES)), --small)

.PHONY: deploy
deploy: install ## Image, kind cluster (or CLUSTER=current REGISTRY=host/org), add-ons, chart, smoke test (GPU=1; AIRGAP=1 builds every image here)
	$(INFRA_ENV) infra/deploy.sh

.PHONY: submit-pipeline
submit-pipeline: install ## Retrain on the cluster: ENGINE=prefect (default) or ENGINE=kfp [SECRET=…]
	AIRGAP=$(AIRGAP) NAMESPACE=$(NAMESPACE) SECRET=$(SECRET) infra/submit-pipeline.sh $(ENGINE)

.PHONY: predict
predict: install ## One prediction through the cluster's InferenceService
	AIRGAP=$(AIRGAP) NAMESPACE=$(NAMESPACE) infra/predict.sh

.PHONY: dashboards
dashboards: ## Port-forward the Evidently, MLflow, Prefect (and KFP, where installed) UIs, print their URLs (Ctrl-C stops)
	AIRGAP=$(AIRGAP) NAMESPACE=$(NAMESPACE) infra/dashboards.sh

.PHONY: e2e
e2e: install ## The cluster end to end on this machine (E2E_AIRGAP=1, 2-CPU values): deploy, loop, faults, undeploy
	tests/system-deps.sh e2e
	AIRGAP=$(E2E_AIRGAP) $(VENV)/bin/python tests/e2e/cluster.py

.PHONY: undeploy
undeploy: ## Remove the release; with CLUSTER=kind (default) delete the whole kind cluster
	$(INFRA_ENV) infra/undeploy.sh
