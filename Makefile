# Two commands set everything up on a fresh machine:
#   make demo   creates .venv from the requirements and runs the embedded default (tiny model, CPU)
#   make test   creates .venv from the requirements and runs the linter and the test suite (what CI runs)
#   make test-fast   the unit tier: the suite without the end-to-end and multi-process tests (markers
#                    e2e / multiprocess, registered in pyproject.toml), for a quick check while editing
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast demo lint bench

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $@

lint: $(VENV)/.installed
	$(PY) -m ruff check reval_jax tests configs benchmarks launch

test: lint
	$(PY) -m pytest -q --durations=15 tests

test-fast: lint
	$(PY) -m pytest -q --durations=15 -m "not e2e and not multiprocess" tests

demo: $(VENV)/.installed
	$(PY) -m reval_jax.train --config=configs/tiny.py --workdir=runs/tiny
	$(PY) -m reval_jax.plot runs/tiny
