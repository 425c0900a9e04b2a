# Two entry points for a fresh machine: `make quickstart` (main job) and `make test`.
# CPU machines take the CPU wheel of torch; on a GPU cluster set TORCH to your CUDA build
# (e.g. `make test TORCH=torch`) or install into an existing environment with `pip install -e .`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install quickstart test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

quickstart: install
	$(PY) examples/quickstart.py $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)
