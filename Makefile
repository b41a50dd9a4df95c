# `make help` lists the targets. Everything runs inside the virtual environment $(VENV).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?= configs/resnet18.yaml

.PHONY: help install train test test-fast lint bench data

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## Create .venv (VENV=...) and install classifier with its test tools and every extra
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,export,serve,mlflow,tune,explain,parquet,shards]"

train:  ## Train configs/resnet18.yaml on the bundled digits (CONFIG=... for another)
	$(BIN)/classifier fit --config $(CONFIG)

test:  ## Run the whole test suite, slow tests included
	$(BIN)/pytest

test-fast:  ## Run the tests not marked slow
	$(BIN)/pytest -m "not slow"

lint:  ## Check style with ruff, and the package's layers and torch-free modules with import-linter
	$(BIN)/ruff check classifier tests benchmarks examples
	$(BIN)/ruff format --check classifier tests benchmarks examples
	$(BIN)/lint-imports

bench:  ## Reproduce the accuracy figures the tests no longer time (docs/performance.md), each beside its target
	$(BIN)/python -m benchmarks.first_hour
	$(BIN)/python -m benchmarks.bundled_digits --seeds 42 1 2
	$(BIN)/python -m benchmarks.speedrun
	$(BIN)/python -m benchmarks.lr_find
	$(BIN)/python -m benchmarks.multilabel
	$(BIN)/python -m benchmarks.near_copies
	$(BIN)/python -m benchmarks.resize_modes
	$(BIN)/python -m benchmarks.ood --seeds 0 1 2 3 4 42
	$(BIN)/python -m benchmarks.shards

data:  ## Rewrite the bundled digits under data/digits from scikit-learn
	$(BIN)/classifier demo-data digits data/digits
