# make test  — create .venv from nothing, install the project with its test extras, run the tests.
# make demo  — same set-up, then pack a TinyLlama-shaped model and stream it against Accelerate.
#
# torch: on a host without nvidia-smi the CPU wheel (torch==2.13.0) is installed first, so that
# resolving the project's "torch" requirement never pulls a multi-GB CUDA build. On GPU hosts the
# default (CUDA) torch and the "gpu" extra (cupy-cuda13x, kvikio-cu13, nvidia-ml-py) are installed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH  ?= torch
EXTRAS ?= test,bench,serve,gpu
else
TORCH  ?= torch==2.13.0
EXTRAS ?= test,bench,serve
endif

comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test lint demo venv gpu-check cuda-check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc/endor_cpu.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

# The stage layering (import-linter, contract in pyproject.toml) and ruff fail the build like a test.
lint: $(STAMP)
	$(VENV)/bin/ruff check endor_gds tests bench
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/endor-gds demo

# Compile every CUDA kernel for sm_80 and sm_90 with the options used at run time (no GPU needed).
cuda-check: $(STAMP)
	$(PY) -m pytest -q tests/decode/test_cuda_compile.py

gpu-check: $(STAMP)
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info endor_gds/*.so endor_gds/*/*.so
