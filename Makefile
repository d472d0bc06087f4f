# Set-up works on a machine that has only Python 3.10+: it makes .venv, installs torch==2.13.0
# (a CPU build where one is available) only when the venv has no torch, then muonkit with the extras the
# tests and docs use (the integrations' tests need transformers and lightning; the docs build needs mkdocs).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.muonkit-installed

.PHONY: setup demo test lint typecheck docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,plot,digits,hf,lightning,logging,docs]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/muonkit demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

docs: setup
	$(VENV)/bin/mkdocs build --strict    # offline; the site lands in site/

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
