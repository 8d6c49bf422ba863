# Two commands set everything up on a fresh machine:
#   make demo   creates .venv from the requirements and runs the embedded default (tiny model, CPU)
#   make test   creates .venv from the requirements and runs the linter and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo lint bench

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $@

lint: $(VENV)/.installed
	$(PY) -m ruff check reval_jax tests configs benchmarks launch

test: lint
	$(PY) -m pytest -q --durations=15 tests

demo: $(VENV)/.installed
	$(PY) -m reval_jax.train --config=configs/tiny.py --workdir=runs/tiny
	$(PY) -m reval_jax.plot runs/tiny
