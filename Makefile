# One command each: `make demo` installs moec and runs the quick-start; `make test` installs and runs the tests.
#
# Where it installs: inside an active virtual environment (or with PYTHON=/path/to/venv/bin/python), into
# that; otherwise into a project virtual environment .venv (created here: a system Python refuses pip,
# PEP 668). Which PyTorch, when none is installed yet: the CPU build on a machine without an NVIDIA GPU
# (from the package index, else PyTorch's CPU wheel index), the default (CUDA) build where `nvidia-smi`
# finds a GPU; TORCH=... chooses another.
PYTHON ?= python3
VENV ?= .venv
IN_VENV := $(shell $(PYTHON) -c "import sys; print(int(sys.prefix != sys.base_prefix))" 2>/dev/null)
PY := $(if $(filter 1,$(IN_VENV)),$(PYTHON),$(VENV)/bin/python)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH ?= $(if $(HAS_GPU),torch==2.13.0,torch==2.13.0+cpu)
CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install demo test test-large

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(if $(filter 1,$(IN_VENV)),,$(VENV)/bin/python)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)" \
		|| $(PY) -m pip install -q "$(TORCH)" --index-url $(CPU_INDEX)
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) examples/quickstart.py

# the suite on up to 4 processes (CI's 2 cores: both), each test file in one process (its order kept)
PYTEST := -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test: install
	$(PY) $(PYTEST)

test-large: install
	HYPOTHESIS_PROFILE=large $(PY) $(PYTEST)
