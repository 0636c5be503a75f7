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
	@# No DeepSpeed op is built: fgcmr never loads its CPU shared-memory op (fgcmr.train.loop.init_distributed).
	touch $@

# img2dataset needs webdataset 0.2.x (the project pins 1.0.2), so it lives in its own tool venv and runs as a
# subprocess (fgcmr.bench.img2dataset_corpus.run_img2dataset; the real-tool test and the Flickr8k demo corpus).
I2D_VENV ?= .venv-img2dataset
$(I2D_VENV)/bin/img2dataset:
	$(PY) -m venv $(I2D_VENV)
	NO_ALBUMENTATIONS_UPDATE=1 $(I2D_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $@

setup: $(BIN)/fgcmr $(I2D_VENV)/bin/img2dataset
	@# Bytecode up front: where PYTHONDONTWRITEBYTECODE is set (as on this project's machines), every process of a
	@# stage or test would otherwise compile fgcmr's modules again.
	$(BIN)/python -m compileall -q fgcmr tests

demo: setup
	$(BIN)/fgcmr pipeline --config=configs/experiments/synthetic.yaml --nproc=2 --out=runs/demo

# Test files run on TEST_WORKERS pytest-xdist workers, a file at a time per worker, heaviest first; every Slurm
# test on one (tests/conftest.py). On 2 cores the ranks of one test leave gaps (start-up, waits) that another fills.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests
