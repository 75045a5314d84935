# ViT image classification: every common task is one `make` target. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
IMAGE ?= vit-app
TAG ?= latest
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev all train run test test-fast lint format app serve mlflow-ui \
        export benchmark learning-benchmark transfer-benchmark monitor notebook docker-build docker-run deploy \
        browser clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-20s %s\n", $$1, $$2}'

# The stamp files make installs idempotent: pip runs again only when a requirements file changes.
$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/activate
	$(BIN)/pip install -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(BIN)/activate
	$(BIN)/pip install -r requirements-dev.txt
	touch $@ $(VENV)/.runtime-installed

install: $(VENV)/.runtime-installed ## create .venv and install the runtime requirements

install-dev: $(VENV)/.dev-installed ## install test and lint tools too

all: install train run ## train the default ViT on the embedded digits and evaluate it (the quick start)

train: install ## train (pass options with ARGS="--preset cifar10 --data path/")
	$(PYTHON) source/train.py $(ARGS)

run: install ## evaluate metadata/models/model.pth on the test split
	$(PYTHON) source/test.py $(ARGS)

browser: ## install Debian's chromium for the browser tests (needs apt; skipped if present)
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# One pytest worker a CPU (pytest-xdist), whole test files to each so a module's fixtures are
# built once: alone, pytest keeps about one core busy while its subprocesses start up.
PYTEST := $(PYTHON) -m pytest -q -n logical --dist loadfile --no-loadscope-reorder

test: install-dev browser lint ## lint, then run the whole test suite
	$(PYTEST) $(ARGS)

test-fast: install-dev ## the test suite without the slow end-to-end tests
	$(PYTEST) -m "not slow" $(ARGS)

lint: install-dev ## black --check and ruff
	$(PYTHON) -m black --check --quiet .
	$(PYTHON) -m ruff check .

format: install-dev ## black and ruff --fix
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m black .

app: install ## the Streamlit app on http://localhost:8501
	$(BIN)/streamlit run source/app.py

serve: install ## the REST API on http://127.0.0.1:8000
	$(PYTHON) source/serve.py $(ARGS)

mlflow-ui: install ## the MLflow UI over the local store on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///metadata/mlflow.db --default-artifact-root ./metadata/mlartifacts --host 127.0.0.1 --port 5000

benchmark: install-dev ## speed and serving benchmarks (results in metadata/results/*.md)
	$(PYTHON) benchmarks/speed.py $(ARGS)
	$(PYTHON) benchmarks/int8_formats.py
	$(PYTHON) benchmarks/serving.py

learning-benchmark: install ## accuracy vs minutes on ../shared/data/cifar10-dev.tar.gz (5/15/30 min)
	$(PYTHON) benchmarks/learning.py $(ARGS)

transfer-benchmark: install ## distilled vs plain ViT student, fine-tuned vs scratch (digits)
	$(PYTHON) benchmarks/transfer.py $(ARGS)

# The notebook in git has no outputs; the executed copy, every figure included, goes to NOTEBOOK_OUT.
NOTEBOOK_OUT ?= metadata/results/ViT.ipynb
notebook: install-dev ## run notebooks/ViT.ipynb (a few minutes); the executed copy: metadata/results/ViT.ipynb
	@mkdir -p $(dir $(NOTEBOOK_OUT))
	$(PYTHON) -c 'import nbclient, nbformat; \
	  nb = nbformat.read("notebooks/ViT.ipynb", as_version=4); \
	  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", \
	    resources={"metadata": {"path": "notebooks"}}).execute(); \
	  nbformat.write(nb, "$(NOTEBOOK_OUT)")'
	@echo "executed notebook: $(NOTEBOOK_OUT) (open it in VS Code or JupyterLab)"

clean: ## remove generated models, results and runs (keeps .venv)
	rm -rf metadata/models metadata/results runs metadata/mlflow.db metadata/mlartifacts

# ---- deployment: Dockerfile, kubernetes/, cloudbuild.yaml (README, "Deployment") ----------------
.PHONY: validate-deploy
K8S_VERSION ?= 1.33.0
PROJECT_ID ?= $(shell gcloud config get-value project 2>/dev/null)
REGISTRY ?= us-central1-docker.pkg.dev/$(PROJECT_ID)/vit
# The image name the manifests carry until a deploy fills in the real one (as cloudbuild.yaml does).
K8S_IMAGE_PLACEHOLDER := us-central1-docker.pkg.dev/PROJECT_ID/vit/vit-app:latest

docker-build: ## build the app image (IMAGE:TAG) with metadata/models/model.pth baked in; train first
	@test -f metadata/models/model.pth || { echo "error: metadata/models/model.pth is missing; train a model first (make all)"; exit 1; }
	docker build -t $(IMAGE):$(TAG) .

docker-run: ## run the app image on http://localhost:8501 with metadata/models mounted read-only
	docker run --rm -p 8501:8501 -v "$(CURDIR)/metadata/models:/app/metadata/models:ro" \
	  -e MODEL_PATH=/app/metadata/models/model.pth $(IMAGE):$(TAG)

# Needs the Google Cloud CLI and kubectl pointed at the cluster (gcloud container clusters
# get-credentials ...), and REGISTRY/IMAGE:TAG pushed. kubernetes/jobs/ (training) is not applied.
deploy: ## kubectl apply -f kubernetes/ with the image REGISTRY/IMAGE:TAG (needs gcloud + kubectl)
	@command -v kubectl >/dev/null 2>&1 || { echo "error: kubectl not found; install the Google Cloud CLI, then: gcloud components install kubectl (README, Deployment)"; exit 1; }
	@test -n "$(PROJECT_ID)" || { echo "error: no Google Cloud project; run gcloud config set project PROJECT_ID, or pass PROJECT_ID=... or REGISTRY=..."; exit 1; }
	for f in kubernetes/*.yml; do echo "---"; sed 's|$(K8S_IMAGE_PLACEHOLDER)|$(REGISTRY)/$(IMAGE):$(TAG)|' "$$f"; done \
	  | kubectl apply -f -
	kubectl rollout status deployment/vit-app --timeout=10m

validate-deploy: install-dev ## lint Dockerfile, kubernetes/, cloudbuild.yaml and the CI workflow (offline)
	$(BIN)/hadolint Dockerfile
	$(BIN)/kubernetes-validate --strict --kubernetes-version $(K8S_VERSION) \
	  $(shell find kubernetes -name '*.yml' -o -name '*.yaml' | sort)
	$(BIN)/check-jsonschema --builtin-schema vendor.cloudbuild cloudbuild.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

monitor: install ## check the model for decay and drift on new data (ARGS="--data DIR [--unlabelled]"; exit 1 = retrain)
	$(PYTHON) source/monitor.py $(ARGS)
