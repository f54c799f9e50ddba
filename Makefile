# megadistill: `make demo` runs the small CPU study, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
# CPU build lying on disk here; on a GPU cluster: make install TORCH_SPEC="torch==2.x.y" (CUDA build)
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers (TEST_WORKERS=0: one process). Whole files go to one worker (--dist loadfile), so a module's
# shared fixture -- the e2e study, a multi-process layout sweep -- is built once
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-all test-compat demo clean bench

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(XDIST) $(PYTEST_ARGS)

# The torch-version-sensitive tests (dynamo tracing of our autograd Functions and collectives, compiled vs eager
# trainer runs, SDPA / kernels, TP model, the compiled loss kernel) under a second torch: by default the lent GPU
# image's 2.11 (a CUDA build from PyPI, run on the CPU here). Its own venv and DeepSpeed op cache (a JIT op built for one torch crashes the other).
COMPAT_TORCH ?= torch==2.11.0
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS ?= tests/test_compile.py tests/test_tp_model.py tests/test_kernels.py tests/test_model.py tests/test_loss_kernel.py tests/test_grad_accum.py
CPY := $(COMPAT_VENV)/bin/python

$(COMPAT_VENV)/.installed: setup.py Makefile
	test -x $(CPY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(CPY) -m pip install -q --upgrade pip
	$(CPY) -m pip install -q "$(COMPAT_TORCH)"
	$(CPY) -m pip install -q -e ".[test]" "$(COMPAT_TORCH)"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	TORCH_EXTENSIONS_DIR=$(abspath $(COMPAT_VENV))/torch_extensions $(CPY) -m pytest -q $(XDIST) $(PYTEST_ARGS) $(COMPAT_TESTS)

demo: install
	$(VENV)/bin/megadistill demo --out runs/demo

bench: install
	$(PY) tools/bench_loss.py
	$(PY) tools/bench_fit.py
	$(PY) tools/bench_train.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
