# Two commands: `make repro` (install + run the whole pipeline) and `make test` (install + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed before everything else: a torch that is already importable (a CUDA build on a GPU host) is
# kept by giving the venv access to it (--system-site-packages, plus a .pth file when python3 is itself a venv's,
# as on hosts where torch lives in a conda env or venv); otherwise this pin, the local CPU wheel on a CPU machine.
TORCH ?= torch==2.13.0
# Everything else installs at the exact versions of requirements.lock. WHEELHOUSE=<dir> (made by `make wheelhouse`)
# installs from that folder only, with no package index: for machines without internet.
WHEELHOUSE ?=
PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)) -c $(abspath $(WHEELHOUSE))/constraints.txt,-c requirements.lock)
# `make wheelhouse` target: Python version, pip platform tag, extras, the target's `pip freeze` (what it has is
# left out), its CUDA version (bitsandbytes keeps only that library), e.g. for the lent H200:
#   make wheelhouse WHEELHOUSE=.whl PYTHON_VERSION=3.12 EXTRAS=gpu HOST_FREEZE=benchmarks/gpu_host/pip_freeze.txt CUDA=130
PYTHON_VERSION ?= $(shell python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
EXTRAS ?= dev,plots,gpu
HOST_FREEZE ?=
CUDA ?=
# the interpreter the venv is made from: python3 on PATH without this venv's bin/ (also when the venv is active)
SYS_PY := $(shell PATH="$$(echo "$$PATH" | tr : '\n' | grep -vxF '$(abspath $(VENV))/bin' | paste -sd: -)" \
	command -v python3)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install lock wheelhouse bench-wheels repro test combine-datasets collect-cv-full generate-qa stats train train-full \
	merge evaluate exps clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@if $(SYS_PY) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed: $$($(SYS_PY) -c 'import torch; print(torch.__version__)')"; \
	  $(SYS_PY) -m venv --clear --system-site-packages $(VENV); \
	  $(SYS_PY) -c "import site, sys; sys.prefix != sys.base_prefix and print(*site.getsitepackages(), sep=chr(10))" \
	    > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/expqa_host_site.pth"; \
	else \
	  $(SYS_PY) -m venv --clear $(VENV) && $(PY) -m pip install -q $(PIP_FROM) $(TORCH); \
	fi
	@extras=dev,plots; if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  extras=dev,plots,gpu; fi; \
	if [ -n "$(WHEELHOUSE)" ]; then extras=$$(cat $(WHEELHOUSE)/extras); fi; \
	echo "pip install -e .[$$extras] $(PIP_FROM)"; $(PY) -m pip install -q $(PIP_FROM) -e ".[$$extras]"
	@touch $@

# requirements.lock from the installed venv (after changing pyproject.toml's dependencies: rm -r .venv first)
lock: install
	$(PY) benchmarks/wheelhouse.py lock

# wheels of everything the project needs, for an offline machine (see the variables above)
# what `make wheelhouse` ships at requirements.lock's version even where the target has another version: the packages
# whose version changes the numbers (transformers 5.17 and 5.24 convert the same GGUF into different tokenizers; the
# rest is tested at docs/reproducibility.md "Supported versions"'s lowest); the others stay the host's (numpy,
# pandas, pyarrow, ...: 140 MiB of wheels in all, over what one lent-GPU call can carry)
MODEL_STACK := transformers tokenizers huggingface-hub safetensors peft trl accelerate bitsandbytes datasets gguf
wheelhouse:
	@if [ -z "$(WHEELHOUSE)" ]; then echo "usage: make wheelhouse WHEELHOUSE=<dir> [PYTHON_VERSION=3.12] ..."; exit 2; fi
	$(MAKE) install WHEELHOUSE=
	$(PY) benchmarks/wheelhouse.py build --out $(WHEELHOUSE) --python $(PYTHON_VERSION) --extras $(EXTRAS) \
	  $(if $(HOST_FREEZE),--host-freeze $(HOST_FREEZE) $(MODEL_STACK:%=--ship-pinned %)) $(if $(CUDA),--cuda $(CUDA)) \
	  $(if $(HOST_FREEZE),,--torch $(TORCH))

# what `benchmarks/gpu_train.py --suite` carries to a lent GPU (docs/benchmarks.md "Performance (GPU)"): the
# project's missing wheels (.gpu/bench/whl), Unsloth's for a second site folder (.gpu/bench/whl-unsloth: it pins
# older trl/datasets; its wheel without the studio/ web app; packages nothing of its SFT path imports left out) and
# the tokenizer (.gpu/bench/tokenizer). A folder of its own: `make wheelhouse`'s .gpu/whl stays as it is.
# Defaults: the lent H200 (Python 3.12, CUDA 13.0, its image's packages). For the CPU dry run on this machine:
#   make bench-wheels BENCH_WHEELS=.gpu/dry BENCH_PYTHON=3.11 BENCH_HOST=<pip freeze of a venv like the GPU image>
BENCH_WHEELS ?= .gpu/bench
BENCH_PYTHON ?= 3.12
BENCH_HOST ?= benchmarks/gpu_host/pip_freeze.txt
UNSLOTH_LEFT_OUT := --exclude xformers --exclude pydantic --exclude diffusers --exclude hf-transfer
bench-wheels: install
	$(PY) benchmarks/wheelhouse.py build --out $(BENCH_WHEELS)/whl --python $(BENCH_PYTHON) --host-freeze $(BENCH_HOST) \
	  --cuda 130 --requirement trl --requirement datasets --requirement bitsandbytes --requirement liger-kernel
	$(PY) benchmarks/wheelhouse.py build --out $(BENCH_WHEELS)/whl-unsloth --python $(BENCH_PYTHON) \
	  --host-freeze $(BENCH_HOST) --cuda 130 --no-lock --requirement unsloth==2026.10.9 --requirement trl==1.15.0 \
	  --requirement 'datasets>=4.7,<5' --requirement 'fsspec[http]<=2026.2.0' --shadow fsspec --shadow certifi \
	  --drop unsloth:studio/ $(UNSLOTH_LEFT_OUT)
	$(PY) benchmarks/wheelhouse.py check $(BENCH_WHEELS)/whl $(BENCH_WHEELS)/whl-unsloth --python $(BENCH_PYTHON) \
	  --host-freeze $(BENCH_HOST) $(UNSLOTH_LEFT_OUT)
	@if [ -f models/base/tokenizer.json ]; then $(PY) -c "from transformers import AutoTokenizer; \
	  AutoTokenizer.from_pretrained('models/base').save_pretrained('$(BENCH_WHEELS)/tokenizer')"; \
	  else echo "no models/base: run 'dvc repro base' first, or copy a saved tokenizer to $(BENCH_WHEELS)/tokenizer"; fi
	du -sh $(BENCH_WHEELS)/whl $(BENCH_WHEELS)/whl-unsloth $(BENCH_WHEELS)/tokenizer

repro: install
	dvc repro

# did this run reproduce the committed one? key metrics vs HEAD's (CHECK_REV=<commit>), within the tolerances of
# src/expqa/workspace/verify.py; exits 1 when one is outside (README "Reproducibility")
CHECK_REV ?= HEAD
.PHONY: check-repro pull
check-repro: install
	expqa verify --rev $(CHECK_REV)

# dvc pull that says which outputs no remote has, why, and what to run instead (README "Share models and data");
# PULL_ARGS="-r storage" etc. go to dvc pull
PULL_ARGS ?=
pull: install
	expqa pull $(PULL_ARGS)

# --durations=15: the 15 slowest tests at the end, so a test that got slow shows (the targets below do the same)
test: install
	$(PY) -m pytest --durations=15

# The lowest supported versions of the model stack (requirements-lowest.txt over requirements.lock, torch as `make
# install` takes it) in a venv of their own, and the tests whose result depends on those versions: the tokenizer the
# base stage builds, export, merge, training (Trainer, PEFT, TRL's losses, bitsandbytes), evaluation. CI runs it.
LOWEST_VENV ?= .venv-lowest
LOWEST_TESTS := tests/model/test_base.py tests/serving/test_export.py tests/model/test_merge.py \
	tests/model/test_loading.py tests/training/test_trainer.py tests/model/test_fused_lora.py tests/model/test_fp8.py \
	tests/model/test_lm_head.py tests/data/test_dataset.py tests/evaluation/test_evaluate.py
.PHONY: test-lowest
test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider --durations=15 $(LOWEST_TESTS)

$(LOWEST_VENV)/.installed: pyproject.toml requirements.lock requirements-lowest.txt
	$(SYS_PY) -m venv --clear $(LOWEST_VENV)
	@names=$$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements-lowest.txt | paste -sd'|'); \
	  grep -viE "^($$names)==" requirements.lock > $(LOWEST_VENV)/constraints.txt; \
	  grep '==' requirements-lowest.txt >> $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/python -m pip install -q -c $(LOWEST_VENV)/constraints.txt $(TORCH)
	$(LOWEST_VENV)/bin/python -m pip install -q -c $(LOWEST_VENV)/constraints.txt -e ".[dev]"
	$(LOWEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^($$(sed -n 's/==.*//p' requirements-lowest.txt | paste -sd'|')) "
	@touch $@

# the quick loop while editing: everything but the tests marked slow (embedded model, training, stage scripts,
# dvc repro) or gpu; `make test` still runs them all
.PHONY: test-fast lint format
test-fast: install
	$(PY) -m pytest -m "not slow and not gpu" --durations=15

# ruff, configured in pyproject.toml's [tool.ruff]: `lint` changes nothing (CI runs it), `format` rewrites the files
lint: install
	$(PY) -m ruff check .; status=$$?; $(PY) -m ruff format --check . && exit $$status

# lint fixes first: sorting imports can leave lines for the formatter to rewrap
format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# the seed's targets, as thin wrappers over dvc
combine-datasets: install
	dvc repro combine

# the whole Cross Validated dump instead of the shipped sample (README "More training data"): ARCHIVE is the site's
# archive as downloaded (stats.stackexchange.com.7z; streamed, never extracted), a path inside the repository (e.g.
# data/raw/) so the lock stays portable. A DVC experiment up to combine whose dvc.lock pins the archive's hash.
collect-cv-full:
	@if [ -z "$(ARCHIVE)" ]; then echo "usage: make collect-cv-full ARCHIVE=data/raw/stats.stackexchange.com.7z"; exit 2; fi
	@if [ ! -f "$(ARCHIVE)" ]; then echo "$(ARCHIVE): no such file; download the site's .7z from the Stack Exchange \
	  data dump (README \"More training data\")"; exit 2; fi
	@$(MAKE) --no-print-directory install
	dvc exp run -S 'collect.posts=$(ARCHIVE)' combine

# synthetic Q&A grounded in the arXiv papers' metadata (README "More training data"): the generate stage with its
# teacher switched on, a DVC experiment up to combine. TEACHER=<local model folder, hub id, or an OpenAI-compatible
# server's http://host:port/v1> replaces the base model (a strong instruct model on a GPU is the point; the embedded
# 135M teacher keeps few pairs); TEACHER_MODEL=<name> picks the model of a server that serves several (Ollama)
generate-qa: install
	dvc exp run -S generate.enabled=true $(if $(TEACHER),-S 'generate.model=$(TEACHER)') \
	  $(if $(TEACHER_MODEL),-S 'generate.endpoint_model=$(TEACHER_MODEL)') combine

stats: install
	dvc repro stats

train: install
	dvc repro train

# full-length training (3 epochs, 2048 tokens) + merge + evaluate as a DVC experiment, also on a CPU-only machine,
# where the `cpu:` profile's one epoch at 512 tokens is lifted (hours on 2 cores; a val loss and a checkpoint every
# half epoch, all kept, for curves over steps; the loss every 7 steps, as save_steps must be a multiple of it);
# on a GPU `make repro` already trains 3 epochs at 2048 tokens.
# Still 4 conversations per optimizer step, as 2 processes x 1 conversation x 2 accumulation steps: 2 packed
# 2048-token conversations per process need 6 GB of activations each without checkpointing (OOM-killed on 23 GB).
train-full: install
	dvc exp run -S cpu.train.num_train_epochs=3 -S cpu.train.max_seq_length=2048 -S cpu.train.eval_steps=49 \
	  -S cpu.train.save_steps=49 -S cpu.train.logging_steps=7 -S +cpu.train.save_total_limit=7 \
	  -S "cpu.train.micro_batch=1 conversations" \
	  -S +cpu.train.gradient_accumulation_steps=2

merge: install
	dvc repro merge

evaluate: install
	dvc repro evaluate

# dvc_plots/index.html: every chart of dvc.yaml plus base vs tuned, drawn without internet (Vega inlined);
# `make plots REVS="main my-exp"` compares commits, branches or experiments (as `dvc plots diff`)
.PHONY: plots plots-screenshot
plots: install
	expqa plots $(REVS)

# docs/plots.png (README "Plots"), drawn by headless chromium: rerun after `make repro`
plots-screenshot: install
	expqa plots --screenshot docs/plots.png

# The experiments of one baseline commit (EXPS_REV) in an 80-column terminal: the headline metrics that move between
# experiments (tuned values and p-values of metrics/headline.json; the base model's do not move) per experiment,
# then each experiment's changed params as rows (`dvc params diff`: `make train-full` alone changes 7 params of ~30
# characters, which as columns would not fit). Plain `dvc exp show` lists every key of params.yaml and every
# dependency's hash; `dvc exp show --only-changed` fits 120 columns for an experiment of one changed param once the
# changed dependencies' hashes are dropped (README "Experiments").
EXPS_REV ?= HEAD
exps: install
	@dvc exp show --no-pager --rev $(EXPS_REV) --drop '.*' --keep 'Experiment$$|(ppl|rougeL|cq)\.(tuned|p)$$'
	@for exp in $$(dvc exp list --rev $(EXPS_REV) --name-only); do \
	  echo; dvc params diff --no-path $(EXPS_REV) $$exp; done

clean-venv:
	rm -rf $(VENV)
