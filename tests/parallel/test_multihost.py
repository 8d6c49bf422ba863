"""Two processes on 127.0.0.1 with 4 fake CPU devices each run the real command and reproduce a
single-process run of the same global configuration (8 devices): in sync mode and in async mode
time-sliced (mesh 2x2x2, rounds generated 2 updates ahead), and in async mode on two device groups
(2 rollout devices of each process generate its half of every round, the other 4 train)."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import HANG_S, REPO_ROOT, InlineScorer, metric_records, tiny_config

from reval_jax.run import train


@contextlib.contextmanager
def _reserved_port():
    """A local port held for the test: bound (not listening) with SO_REUSEPORT, which the
    coordinator's gRPC server sets too, so that it can bind the port while no other process takes
    it. Closing the probe socket before the run would leave the port free to anyone until the
    coordinator binds it, seconds later on a loaded machine (a taken port crashes the run)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _kill_if_running(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# async: time-sliced (pipeline.rollout_devices=0, the multi-process form), round 2 generated from
# the initial weights before round 1's updates, 2 updates stale when trained
ASYNC = {"pipeline.mode": "async", "pipeline.max_staleness": 2}
# two groups: devices 0-1 of each process generate (one process: devices 0-3), the rest train on
# a (1, 4, 1) mesh; each process generates its prompt of the 2 per round
GROUPS = {**ASYNC, "pipeline.rollout_devices": 4, "mesh": (1, 4, 1)}


@pytest.mark.e2e
@pytest.mark.multiprocess
@pytest.mark.parametrize("pipeline", [{}, ASYNC, GROUPS], ids=["sync", "async", "two_groups"])
def test_two_processes_equal_one(pipeline, data_file, tmp_path):
    overrides = {"num_iterations": 2, "mesh": (2, 2, 2), **pipeline}
    single = tmp_path / "single"
    train.run(tiny_config(data_file, **overrides), str(single), scorer=InlineScorer())

    multi = tmp_path / "multi"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file,
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),  # conftest's flags
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files: a full pipe would stall a process
    with _reserved_port() as port, contextlib.ExitStack() as stack:
        args = [sys.executable, "-m", "reval_jax.run.train", "--config=tests/run_config.py", f"--workdir={multi}",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                *(f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items())]
        procs = []
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO_ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, text=True))
            stack.callback(_kill_if_running, procs[-1])  # on a failure
        for p in procs:
            p.wait(timeout=HANG_S)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-5000:]

    # Floats within a tolerance: the collectives of two processes (gloo) sum in another order. The
    # samples, and so the counts, are equal unless a draw lies within rounding of a tie of the
    # logits (test_sampler checks that tie-aware); these draws have none.
    a, b = metric_records(single), metric_records(multi)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for k in ra:
            if k == "rounds_ahead" and pipeline is GROUPS:
                continue  # rounds the rollout thread has ready when the trainer takes one: timing
            if isinstance(ra[k], float):
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)
            else:
                assert ra[k] == rb[k], k
    if pipeline is GROUPS:
        # checkpoint 1 holds round 2, generated ahead: whole (both processes' halves, put together),
        # with the tokens and versions the one-process rollout group sampled
        saved = [_checkpoint_sums(w, 1) for w in (single, multi)]
        rounds = {k for k in saved[0] if k.startswith("['pipeline/")}
        assert "['pipeline/2/tokens']" in rounds and rounds == {k for k in saved[1] if k.startswith("['pipeline/")}
        for k in rounds:
            if any(f in k for f in ("tokens", "mask", "version", "group_id", "truncated")):
                assert saved[0][k] == saved[1][k], k
    if pipeline:
        assert [r["staleness_max"] for r in b if r["kind"] == "train"] == [0, 2]
    from reval_jax.run.checkpoint import Checkpointer

    assert Checkpointer(multi / "checkpoints").steps() == [1, 2]


def _checkpoint_sums(workdir, step: int) -> dict[str, str]:
    """The checksums (dtype, shape and hash) of a checkpoint's host arrays, from its metadata."""
    meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    return meta["checksums"]["buffer"]
