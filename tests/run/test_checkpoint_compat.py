"""A checkpoint written by the code before the subpackage layout (tests/fixtures/pre_layout_run,
made at 6f7f0ad) resumes with today's code and reproduces the uninterrupted run's next iteration.

The fixture's records were computed with XLA's default compile flags; the suite compiles with
faster ones (conftest.py), whose machine code rounds differently (~1e-6). The resume therefore runs
in a process of its own with XLA's defaults: the comparison is of one program with itself, at the
tolerance of an exact resume. It is also the suite's one end-to-end run under XLA's defaults."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HANG_S, REPO_ROOT, TIMING_SUFFIXES, InlineScorer, metric_records, tiny_config

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "pre_layout_run"
# what the sampled tokens and the bookkeeping decide: equal, not close
EXACT = ("iteration", "kind", "accuracy", "reward_mean", "response_length", "truncation_rate", "updates",
         "skipped_total", "ref_version", "num_tokens", "micro_batches", "tokens_processed")


@pytest.mark.e2e
def test_pre_layout_checkpoint_resumes(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", workdir / "checkpoints")
    shutil.copy(FIXTURE / "config.json", workdir / "config.json")
    straight = json.loads((FIXTURE / "straight_metrics.json").read_text())
    # the run's own record up to its checkpoint, as the old run left it
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight[:3]))
    data = shutil.copy(FIXTURE / "arith.jsonl", tmp_path / "arith.jsonl")
    recorded = (workdir / "config.json").read_bytes()

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}
    done = subprocess.run([sys.executable, __file__, str(workdir), str(data)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    assert (workdir / "config.json").read_bytes() == recorded  # kept; this start's config is recorded beside it
    model_path = done.stdout.strip().splitlines()[-1]
    assert json.loads((workdir / "config.start-3.json").read_text())["model"]["path"] == model_path

    records = metric_records(workdir)
    assert [(r["kind"], r.get("iteration")) for r in records] == [("data", 0), ("train", 1), ("train", 2),
                                                                   ("train", 3)]
    want = {k: v for k, v in straight[3].items() if not k.endswith(TIMING_SUFFIXES)}
    got = records[3]
    assert sorted(got) == sorted(want)
    for key in want:
        if key in EXACT or not isinstance(want[key], float):
            assert got[key] == want[key], key
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _resume(workdir: str, data: str) -> None:
    """The resume, in the subprocess: today's code on the fixture's run; prints the model path."""
    from reval_jax.run import train

    config = tiny_config(data, num_iterations=3)
    config.checkpoint.async_save = False
    config.allow_config_change = True  # the old run's paths (and the fields added since) differ from today's
    train.run(config, workdir, scorer=InlineScorer())
    print(config.model.path)


if __name__ == "__main__":  # the matmul precision comes with conftest.py's JAX_DEFAULT_MATMUL_PRECISION
    _resume(*sys.argv[1:3])
