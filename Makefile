# megadistill: `make demo` runs the small CPU study, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
# CPU build lying on disk here; on a GPU cluster: make install TORCH_SPEC="torch==2.x.y" (CUDA build)
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-all demo clean bench

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/megadistill demo --out runs/demo

bench: install
	$(PY) tools/bench_loss.py
	$(PY) tools/bench_fit.py
	$(PY) tools/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
