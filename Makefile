# The two commands a newcomer needs: `make demo` and `make test`. Both build the environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
export FGCMR_DATA := $(abspath $(DATA))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test

$(BIN)/fgcmr: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,weights,bench]'
	touch $@

setup: $(BIN)/fgcmr

demo: setup
	$(BIN)/fgcmr pipeline --config=configs/experiments/synthetic.yaml --nproc=2 --out=runs/demo

test: setup
	$(BIN)/python -m pytest -q tests
