# `make demo` and `make test` set themselves up: a .venv with torch (pinned first, so that
# nothing else pulls a torch with its CUDA wheels) and cectl installed in editable mode,
# with the test and ui (cectl serve) extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ui]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/cectl demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check cectl tests bench docs

test: lint
	$(BIN)/pytest -q

# The fast lane: everything but the tests marked slow (Ray clusters, faults, long runs).
test-fast: lint
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/shard.py
	$(BIN)/python bench/train_step.py --steps 5 --curve 200
	$(BIN)/python bench/loader.py --rounds 4
	$(BIN)/python bench/mask_runs.py --rounds 3
	$(BIN)/python bench/distributed.py --steps 3
	$(BIN)/python bench/features.py --steps 60 --layers conv1 conv3 conv5 pool5
	$(BIN)/python bench/checkpoint.py --rounds 8
	$(BIN)/python bench/elastic.py
	$(BIN)/python bench/feed.py
