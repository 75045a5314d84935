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
        export benchmark learning-benchmark monitor notebook docker-build docker-run deploy \
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

test: install-dev browser lint ## lint, then run the whole test suite
	$(PYTHON) -m pytest -q $(ARGS)

test-fast: install-dev ## the test suite without the slow end-to-end tests
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

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
	$(BIN)/mlflow ui --backend-store-uri sqlite:///metadata/mlflow.db --host 127.0.0.1 --port 5000

clean: ## remove generated models, results and runs (keeps .venv)
	rm -rf metadata/models metadata/results runs metadata/mlflow.db metadata/mlartifacts
