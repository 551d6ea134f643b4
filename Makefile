# The README's two commands: `make smoke` (the main job) and `make test` (the suite).
# Both work on a fresh machine: a virtual environment is created unless one is active,
# torch 2.13.0 is installed only when no torch is importable (clusters bring their own
# CUDA build; a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box),
# then the project itself with its dev extra.

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeforge-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast smoke clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

smoke: setup
	$(PY) -m train +experiment=smoke

clean:
	rm -rf outputs .pytest_cache

# Wheels a bare GPU image (torch + Triton, Python 3.12, no network) lacks, into .whl/ for
# launch/gpu_check.sh to install there (docs/gpu.md). Needs a package registry here.
.PHONY: gpu-wheels
gpu-wheels: setup
	PYTHON=$(PY) launch/gpu_wheels.sh
