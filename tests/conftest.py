"""Test configuration: 8 fake CPU devices, set before jax is imported anywhere."""

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _compile_flags() -> str:
    """The suite is compile-bound (tiny models, hundreds of distinct programs): the tests compile
    with LLVM's -O0 and XLA CPU's elemental emitters, half the suite's time (README, "Tests and
    benchmarks"). The HLO programs are the same; their machine code is less optimised and rounds
    differently (~1e-6). REVAL_TEST_XLA_DEFAULTS=1 keeps XLA's defaults. XLA aborts on a flag it
    does not know (a newer jaxlib may drop one, e.g. under `make test-compat`): the flags are tried
    once per jaxlib version in a subprocess, the answer kept in a file, and dropped with a note if
    refused. Only an answer is kept: a probe that fails otherwise (a timeout on a loaded machine, a
    crash) costs this run the fast flags and is tried again by the next."""
    if os.environ.get("REVAL_TEST_XLA_DEFAULTS"):
        return ""
    from importlib.metadata import version

    tag = hashlib.sha256(f"{version('jaxlib')} {FAST_COMPILE}".encode()).hexdigest()[:16]
    answer = Path(tempfile.gettempdir()) / f"reval_jax_test_compile_flags_{tag}"
    said = answer.read_text() if answer.exists() else ""
    if not said:
        try:
            probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"], timeout=600,
                                   env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"},
                                   capture_output=True, text=True)
            said = "ok" if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["failed"])[-1]
        except subprocess.TimeoutExpired:
            said = "the probe timed out"
        if said == "ok" or "Unknown flag" in said:
            answer.write_text(said)
    if said != "ok":
        print(f"tests: {FAST_COMPILE} not used ({said}); XLA's default compile flags (slower)",
              file=sys.stderr)
        return ""
    return FAST_COMPILE


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + _compile_flags()
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compile times dominate this suite: identical programs (every train.run builds new closures, and
# the subprocess tests start new interpreters) load from JAX's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "reval_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The matmul precision as an environment variable too, so that the subprocess tests (the command
# line, the SIGTERM and SIGKILL runs, the two-process run) inherit it: their programs are then the
# programs this process compiles, and a test that compares their results bit for bit (an exact
# resume) compares one program with itself. Set by jax.config.update alone, the children compiled
# with the default precision: other programs (other HLO), equal only while XLA emits the same code.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """Tiny JSONL of sums shared by the end-to-end tests."""
    from helpers import write_arith_data

    return write_arith_data(tmp_path_factory.mktemp("data") / "arith.jsonl")
