# Two commands for a fresh machine (README): `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Stamp files: reinstall only when the packaging changes.
$(VENV)/.installed: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,dali]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/ccs-fast demo --out $(DEMO_OUT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests bench -q --benchmark-disable $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
