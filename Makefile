# Two entry points of the README's quickstart; each sets up the local virtual environment it needs.
# TORCH_SPEC pins the CPU wheel that lies on this kind of machine; on a GPU machine set it to the
# CUDA build you want (e.g. `make test TORCH_SPEC=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train-tiny test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train-tiny: $(VENV)/.installed
	$(VENV)/bin/megatron-irl train --config examples/tiny.yaml

test: $(VENV)/.installed
	$(PY) -m pytest tests
