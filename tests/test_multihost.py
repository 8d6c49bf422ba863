"""Two processes on 127.0.0.1 with 4 fake CPU devices each run the real command and reproduce a
single-process run of the same global configuration (8 devices, mesh 2x2x2)."""

import os
import socket
import subprocess
import sys

import numpy as np
from helpers import REPO_ROOT, metric_records, tiny_config

from reval_jax import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(data_file, tmp_path):
    overrides = {"num_iterations": 2, "mesh": (2, 2, 2)}
    single = tmp_path / "single"
    train.run(tiny_config(data_file, **overrides), str(single))

    multi = tmp_path / "multi"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}
    args = [sys.executable, "-m", "reval_jax.train", "--config=tests/run_config.py", f"--workdir={multi}",
            "--config.num_iterations=2", "--config.mesh=(2,2,2)", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2"]
    procs = [subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]

    a, b = metric_records(single), metric_records(multi)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for k in ra:
            if isinstance(ra[k], float):
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)
            else:
                assert ra[k] == rb[k], k
    from reval_jax.checkpoint import Checkpointer

    assert Checkpointer(multi / "checkpoints").steps() == [1, 2]
