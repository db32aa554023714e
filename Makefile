# The two-command quick start: `make demo` (train + evaluate + figures on the real dataset) and `make test`.
# Both create .venv when missing, install what is needed once (stamp files), and are quiet when nothing changed.
#
# torch: the CPU wheel is pinned and installed before the package, so pip never pulls CUDA packages.
# A GPU user chooses another build, e.g.:
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
# Outside this project's machines, a CPU-only install from PyPI wants:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The demo trains `fast` for as many epochs as fit DEMO_BUDGET on this machine (measured from a fresh clone: 25
# epochs, 93.24% test, 4m34s in all on a 2-core AVX512-BF16 Zen 5; 5 epochs and 92.3% on a 2-core AVX2 Zen 3 with
# the older batch-256 recipe): a few minutes on any 2-core machine.
# `make demo DEMO_PRESET=default DEMO_BUDGET=` trains the bigger net for its full 10 epochs instead (about 20 minutes
# on 2 AVX2 cores).
DEMO_PRESET ?= fast
DEMO_BUDGET ?= 4m
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check -q
BIN := $(VENV)/bin

.PHONY: demo test lint dataset browser serve clean help
help:
	@echo "make demo   - train a CNN on Fashion-MNIST within $(DEMO_BUDGET), evaluate it, draw its figures (runs/demo)"
	@echo "make test   - install the dev extra and run the whole test suite"
	@echo "make serve  - web page and HTTP API for the demo model on http://127.0.0.1:8000"
	@echo "make lint   - ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	@touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(PIP) install -e ".[dev]"
	@touch $@

# The dataset: found where fmnist looks, else Debian's package when we may install it, else a download.
dataset: $(VENV)/.base
	@$(BIN)/python -c "from fmnist.data import locate_data; locate_data(download=False)" 2>/dev/null \
	  || ./scripts/install-dataset.sh

# Trains only when runs/demo has no model yet (or the install changed); `rm -r runs/demo` to retrain.
demo: runs/demo/model.json
	$(BIN)/fmnist evaluate runs/demo
	$(BIN)/fmnist plot runs/demo
	@echo "figures: runs/demo/plots/*.png, runs/demo/samples.png"

# The sample grid is drawn after training: `--overwrite` replaces the run folder whole, with what was in it.
runs/demo/model.json: $(VENV)/.base | dataset
	$(BIN)/fmnist train --preset $(DEMO_PRESET) $(if $(DEMO_BUDGET),--budget $(DEMO_BUDGET)) --out runs/demo --overwrite
	$(BIN)/fmnist data show --out runs/demo/samples.png

# The browser test drives Debian's headless Chromium; installed here when missing and we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || ./scripts/install-browser.sh

serve: $(VENV)/.dev runs/demo/model.json
	$(BIN)/fmnist serve runs/demo

test: $(VENV)/.dev dataset browser
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
