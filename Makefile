# Two commands: `make repro` (install + run the whole pipeline) and `make test` (install + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed before everything else: a torch that is already importable (a CUDA build on a GPU host) is
# kept by giving the venv access to it; otherwise this pin, which is the local CPU wheel on a CPU machine.
TORCH ?= torch==2.13.0
# Everything else installs at the exact versions of requirements.lock. WHEELHOUSE=<dir> (made by `make wheelhouse`)
# installs from that folder only, with no package index: for machines without internet.
WHEELHOUSE ?=
PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)) -c $(abspath $(WHEELHOUSE))/constraints.txt,-c requirements.lock)
# `make wheelhouse` target: Python version, pip platform tag, extras, the target's `pip freeze` (what it has is
# left out), its CUDA version (bitsandbytes keeps only that library), e.g. for the lent H200:
#   make wheelhouse WHEELHOUSE=.whl PYTHON_VERSION=3.12 EXTRAS=gpu HOST_FREEZE=benchmarks/gpu_host/pip_freeze.txt CUDA=130
PYTHON_VERSION ?= $(shell python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
EXTRAS ?= dev,gpu
HOST_FREEZE ?=
CUDA ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install lock wheelhouse repro test combine-datasets stats train train-full merge evaluate clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@if python3 -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed: $$(python3 -c 'import torch; print(torch.__version__)')"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q $(PIP_FROM) $(TORCH); \
	fi
	@extras=dev; if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  extras=dev,gpu; fi; \
	if [ -n "$(WHEELHOUSE)" ]; then extras=$$(cat $(WHEELHOUSE)/extras); fi; \
	echo "pip install -e .[$$extras] $(PIP_FROM)"; $(PY) -m pip install -q $(PIP_FROM) -e ".[$$extras]"
	@touch $@

# requirements.lock from the installed venv (after changing pyproject.toml's dependencies: rm -r .venv first)
lock: install
	$(PY) benchmarks/wheelhouse.py lock

# wheels of everything the project needs, for an offline machine (see the variables above)
wheelhouse:
	@if [ -z "$(WHEELHOUSE)" ]; then echo "usage: make wheelhouse WHEELHOUSE=<dir> [PYTHON_VERSION=3.12] ..."; exit 2; fi
	$(MAKE) install WHEELHOUSE=
	$(PY) benchmarks/wheelhouse.py build --out $(WHEELHOUSE) --python $(PYTHON_VERSION) --extras $(EXTRAS) \
	  $(if $(HOST_FREEZE),--host-freeze $(HOST_FREEZE)) $(if $(CUDA),--cuda $(CUDA)) \
	  $(if $(HOST_FREEZE),,--torch $(TORCH))

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

# full-length training (3 epochs, 2048 tokens) + merge + evaluate as a DVC experiment, also on a CPU-only machine,
# where the `cpu:` profile's one epoch at 512 tokens is lifted (hours on 2 cores; a val loss and a checkpoint every
# half epoch, all kept, for curves over steps); on a GPU `make repro` already trains 3 epochs at 2048 tokens.
# Still 4 conversations per optimizer step, as 2 processes x 1 conversation x 2 accumulation steps: 2 packed
# 2048-token conversations per process need 6 GB of activations each without checkpointing (OOM-killed on 23 GB).
train-full: install
	dvc exp run -S cpu.train.num_train_epochs=3 -S cpu.train.max_seq_length=2048 -S cpu.train.eval_steps=49 \
	  -S cpu.train.save_steps=49 -S +cpu.train.save_total_limit=7 -S cpu.train.per_device_train_batch_size=1 \
	  -S cpu.train.gradient_accumulation_steps=2

merge: install
	dvc repro merge

evaluate: install
	dvc repro evaluate

clean-venv:
	rm -rf $(VENV)
