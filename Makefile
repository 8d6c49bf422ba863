# Two commands set everything up on a fresh machine:
#   make demo   creates .venv from the requirements and runs the embedded default (tiny model, CPU)
#   make test   creates .venv from the requirements and runs the linter and the test suite (what CI runs)
#   make test-fast   the unit tier: the suite without the end-to-end, multi-process and slow tests (markers
#                    e2e / multiprocess / slow, registered in pyproject.toml), for a quick check while editing
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

# Two pytest workers (pytest-xdist; PYTEST_WORKERS=0 runs in one process): the suite is mostly
# single-threaded compilation. Test files whose tests share a module fixture (one reference run) are
# one xdist_group, so that fixture runs once.
PYTEST_WORKERS ?= 2
PYTEST_ARGS := -q --durations=15 -n $(PYTEST_WORKERS) --dist loadgroup

test: lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: lint
	$(PY) -m pytest $(PYTEST_ARGS) -m "not e2e and not multiprocess and not slow" tests

demo: $(VENV)/.installed
	$(PY) -m reval_jax.train --config=configs/tiny.py --workdir=runs/tiny
	$(PY) -m reval_jax.plot runs/tiny

# make test-compat   optional, not part of `make test`: builds a second venv, .venv-compat, from the
#                    requirements, then upgrades the JAX stack (COMPAT_PACKAGES) to the newest releases
#                    the package registry offers and runs COMPAT_TESTS (the unit tests of the model,
#                    the samplers, the engine, the update and the checkpoint) and one end-to-end
#                    checkpoint resume, then checks the installed versions against pyproject.toml's
#                    ranges (python -m reval_jax.tools.versions). What it covers: docs/compat.md.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PACKAGES ?= jax jaxlib flax optax orbax-checkpoint ml-dtypes
COMPAT_TESTS ?= tests/model/test_model.py tests/model/test_attention.py tests/model/test_attention_banded.py \
	tests/model/test_hf.py tests/rollout/test_sampler.py tests/rollout/test_engine.py \
	tests/rollout/test_rollout_layout.py tests/objective/test_train_step.py tests/objective/test_logprobs.py \
	tests/run/test_checkpoint.py
COMPAT_RESUME ?= tests/run/test_checkpoint.py::test_resume_is_bitwise_identical
# a deprecation in a newer release fails the run: it is what breaks on the release after
COMPAT_PYTEST_FLAGS ?= -W error::DeprecationWarning -W error::PendingDeprecationWarning -W error::FutureWarning

.PHONY: test-compat
$(COMPAT_VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	echo '*' > $(COMPAT_VENV)/.gitignore
	$(COMPAT_PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -m pip install -q --disable-pip-version-check --upgrade $(COMPAT_PACKAGES)
	$(COMPAT_PY) -m reval_jax.tools.versions || true
	$(COMPAT_PY) -m pytest -q $(COMPAT_PYTEST_FLAGS) -m "not e2e and not multiprocess" $(COMPAT_TESTS)
	$(COMPAT_PY) -m pytest -q $(COMPAT_PYTEST_FLAGS) $(COMPAT_RESUME)
	$(COMPAT_PY) -m reval_jax.tools.versions
