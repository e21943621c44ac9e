# `make test` and `make demo` set themselves up: a local .venv with everything installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a matching pair (PyPI's torchvision does not import beside
# every torch build); these two are known to work together.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

# Loader throughput: ViT-B-32 on this machine's CPU, writes bench/results/loader.md
bench: install
	$(PY) bench/loader_bench.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
