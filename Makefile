# Set-up works on a machine that has only Python 3.10+ and make. It makes .venv and installs torch==2.13.0 (a CPU
# build where one is available) only when the venv has no torch, so a CUDA build already there is kept.
#   make demo  installs what the demo needs (torch, numpy, tqdm, matplotlib) and runs it
#   make test  installs the test and docs extras too and runs the suite
# Every other package comes at the version in requirements/lock.txt (the set CI last passed with, resolved on
# Python 3.11 / Linux x86_64); `make lock` re-resolves it to today's newest on purpose, `make test LOCK=` ignores it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements/lock.txt
EXTRAS_TEST := dev,plot,digits,hf,lightning,logging,docs
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q $(if $(LOCK),-c $(LOCK))

.PHONY: setup setup-demo demo test lint typecheck docs lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.demo: pyproject.toml $(LOCK) $(VENV)/.torch
	$(PIP) -e ".[plot]"
	touch $@

$(VENV)/.test: pyproject.toml $(LOCK) $(VENV)/.torch
	$(PIP) -e ".[$(EXTRAS_TEST)]"
	touch $@

setup-demo: $(VENV)/.demo
setup: $(VENV)/.test

demo: setup-demo
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

# Resolve every extra afresh in a scratch venv (newest releases that fit pyproject.toml's ranges) and write the
# result as the new lock; torch stays out of it (TORCH_SPEC decides torch). Run `make test` after it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS_TEST)]"
	{ echo "# Versions 'make test' installs (pip constraints). Written by 'make lock' on $$(date -u +%Y-%m-%d)"; \
	  .venv-lock/bin/python -c 'import platform; print("# with Python", platform.python_version(), "on", platform.system(), platform.machine())'; \
	  echo "# torch is not locked: the Makefile's TORCH_SPEC installs it where the venv has none"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|muonkit)=='; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt
	rm -rf .venv-lock
	@echo "requirements/lock.txt rewritten: review 'git diff requirements/lock.txt', then run 'make clean test'"

clean:
	rm -rf $(VENV) .venv-lock build dist site src/*.egg-info .pytest_cache
