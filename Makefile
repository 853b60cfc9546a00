# Two commands: `make repro` (install + run the whole pipeline) and `make test` (install + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed before everything else: a torch that is already importable (a CUDA build on a GPU host) is
# kept by giving the venv access to it; otherwise this pin, which is the local CPU wheel on a CPU machine.
TORCH ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install repro test combine-datasets stats train train-full merge evaluate clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed: $$(python3 -c 'import torch; print(torch.__version__)')"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q $(TORCH); \
	fi
	@extras=dev; if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  extras=dev,gpu; fi; echo "pip install -e .[$$extras]"; $(PY) -m pip install -q -e ".[$$extras]"
	@touch $@

repro: install
	dvc repro

test: install
	$(PY) -m pytest

# the seed's targets, as thin wrappers over dvc
combine-datasets: install
	dvc repro combine

stats: install
	dvc repro stats

train: install
	dvc repro train

# full-length training (3 epochs, 2048 tokens) as a DVC experiment, also on a CPU-only machine, where the `cpu:`
# profile's 20-step smoke run is lifted (hours on 2 cores); on a GPU this is what `make train` already does
train-full: install
	dvc exp run -S cpu.train.max_steps=-1 -S cpu.train.max_seq_length=2048 -S cpu.train.eval_steps=100 \
	  -S cpu.train.save_steps=100 train

merge: install
	dvc repro merge

evaluate: install
	dvc repro evaluate

clean-venv:
	rm -rf $(VENV)
