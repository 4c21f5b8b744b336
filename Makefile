# The entry points of the README's quickstart; each sets up the local virtual environment it needs.
# TORCH_SPEC pins the CPU wheel that lies on this kind of machine; on a GPU machine set it to the
# CUDA build you want (e.g. `make test TORCH_SPEC=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo train-tiny test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The reduced 5% over-fitting study (docs/results.md): pre-train, fine-tune with MLE and with
# IQ-Learn, choose checkpoints on validation, evaluate, print the table, plot, export to Hugging
# Face format (runs/arithmetic_overfit_5pct_reduced).
demo: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) tools/run_experiment.py --config examples/arithmetic/overfit-5pct.yaml --reduced --jobs 2

train-tiny: $(VENV)/.installed
	$(VENV)/bin/megatron-irl train --config examples/tiny.yaml

test: $(VENV)/.installed
	$(PY) -m pytest tests
