"""Runs that survive: exact resume, SIGTERM, SIGKILL mid-write, corrupt checkpoints, non-finite
stops, a failing disk, a different mesh on restore, and export of a checkpoint to HF."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import HANG_S, REPO_ROOT, InlineScorer, metric_records, reference_run, tb_scalars, tiny_config

from reval_jax.data.templates import stop_token_ids
from reval_jax.run import train
from reval_jax.run.checkpoint import Checkpointer, CheckpointError
from reval_jax.run.policy import load_checkpoint_policy, make_run_mesh

# one pytest-xdist worker runs this file: its tests share module fixtures (runs, a worker pool)
pytestmark = pytest.mark.xdist_group("test_checkpoint")


def run(config, workdir):
    """train.run without reward workers: the reward path is not under test here."""
    return train.run(config, str(workdir), scorer=InlineScorer())


def final_params(workdir, config):
    model, _ = load_checkpoint_policy(workdir / "checkpoints", config, make_run_mesh(config))
    from flax import nnx

    return jax.tree.map(np.asarray, nnx.state(model))


@pytest.fixture(scope="module")
def straight(data_file, tmp_path_factory):
    """The uninterrupted 4-iteration reference run (shared with test_async's sync run)."""
    return reference_run(tmp_path_factory, data_file, num_iterations=4), tiny_config(data_file, num_iterations=4)


def assert_same_run(a, b, config):
    assert metric_records(a) == metric_records(b)
    pa, pb = final_params(a, config), final_params(b, config)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.e2e
def test_resume_is_bitwise_identical(straight, data_file, tmp_path):
    ref_dir, config = straight
    run(tiny_config(data_file, num_iterations=2), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").steps() == [1, 2]
    run(tiny_config(data_file, num_iterations=4), tmp_path)  # resumes at 3
    assert_same_run(ref_dir, tmp_path, config)
    assert [r for r in metric_records(tmp_path) if r["kind"] == "train"][-1]["updates"] == 8


def _cli(workdir, data_file, log, extra=(), script=None, env=None):
    """The training command line (or a python script wrapping train.run) as a subprocess whose
    output goes to the file `log` (a pipe that nobody reads while the test waits could fill up and
    stop the run)."""
    overrides = {"model.path": tiny_config(data_file).model.path, "data.train_files": f"('{data_file}',)"}
    if script is None:
        args = [sys.executable, "-m", "reval_jax.run.train", "--config=tests/run_config.py",
                f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()], *extra]
    else:
        args = [sys.executable, "-c", script]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file, "REVAL_TEST_WORKDIR": str(workdir),
           "REVAL_TEST_MODEL": overrides["model.path"],
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]), **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(proc, log) -> str:
    """Waits for the command (HANG_S is the hang guard; it is killed then) and returns its output."""
    try:
        proc.wait(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Path(log).read_text()


def _wait_for_iteration(workdir, iteration, proc, log):
    """Waits until the run has written the train record of `iteration` (HANG_S is the hang guard)."""
    deadline = time.monotonic() + HANG_S
    path = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # a line being written is not one
        if any(r["kind"] == "train" and r["iteration"] >= iteration for r in map(json.loads, lines)):
            return
        if proc.poll() is not None:
            raise AssertionError(Path(log).read_text())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("run did not reach the iteration in time")


@pytest.mark.e2e
def test_sigterm_checkpoints_and_the_same_command_resumes(straight, data_file, tmp_path):
    ref_dir, config = straight
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    # The run waits after iteration 1 until it has received the signal (run_config.py): it cannot
    # finish before the signal arrives, and stops after iteration 1 exactly.
    proc = _cli(workdir, data_file, log, env={"REVAL_TEST_PAUSE_AFTER": "1"})
    try:
        _wait_for_iteration(workdir, 1, proc, log)
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, log)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "rerun the same command to resume" in out
    assert Checkpointer(workdir / "checkpoints").steps()[-1] == 1
    proc = _cli(workdir, data_file, log)  # the same command
    out = _finish(proc, log)
    assert proc.returncode == 0, out
    assert "resumed from checkpoint 1" in out
    assert_same_run(ref_dir, workdir, config)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from helpers import InlineScorer, tiny_config
    from reval_jax.run import checkpoint
    from reval_jax.run import train
    original = checkpoint.Checkpointer.save
    def save(self, iteration, *args, **kwargs):
        original(self, iteration, *args, **kwargs)  # the async write is now under way
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save
    config = tiny_config(os.environ["REVAL_TEST_DATA"], num_iterations=4)
    config.model.path = os.environ["REVAL_TEST_MODEL"]  # the test's: the resume compares the run's config
    train.run(config, os.environ["REVAL_TEST_WORKDIR"], scorer=InlineScorer())
""")


@pytest.mark.e2e
def test_sigkill_during_a_checkpoint_write_restarts_from_the_previous_one(straight, data_file, tmp_path):
    ref_dir, config = straight
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    proc = _cli(workdir, data_file, log, script=KILL_DURING_SAVE)
    out = _finish(proc, log)
    assert proc.returncode == -signal.SIGKILL, out
    assert Checkpointer(workdir / "checkpoints").steps()[-1] in (1, 2)
    run(tiny_config(data_file, num_iterations=4), workdir)
    assert_same_run(ref_dir, workdir, config)


@pytest.mark.e2e
def test_corrupt_latest_checkpoint_is_reported_and_skipped(straight, data_file, tmp_path, capsys):
    ref_dir, config = straight
    run(tiny_config(data_file, num_iterations=3), tmp_path)
    latest = tmp_path / "checkpoints" / "3"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    run(tiny_config(data_file, num_iterations=4), tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint 3" in out and "corrupt or partial and is skipped" in out
    assert "resumed from checkpoint 2" in out
    assert_same_run(ref_dir, tmp_path, config)


@pytest.mark.e2e
def test_non_finite_updates_stop_the_run_and_keep_the_last_good_checkpoint(data_file, tmp_path):
    # r/β overflows float32: every update is non-finite and skipped
    config = tiny_config(data_file, num_iterations=5, beta=1e-45, max_skipped_in_a_row=3)
    config.reward.transform = "plus_minus_one"
    with pytest.raises(RuntimeError, match=r"3 updates in a row had a non-finite loss.*last good checkpoint \(1\)"):
        run(config, tmp_path)
    steps = Checkpointer(tmp_path / "checkpoints").steps()
    assert steps == [1]  # iteration 2 reached the limit: nothing after the last good one


@pytest.mark.e2e
def test_full_disk_is_reported_and_earlier_checkpoints_stay(data_file, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    original = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"saving checkpoint 2 .* No space left on device.*intact \(\[1\]\)"):
        run(tiny_config(data_file, num_iterations=3), tmp_path)
    monkeypatch.undo()
    assert Checkpointer(tmp_path / "checkpoints").steps() == [1]
    run(tiny_config(data_file, num_iterations=2), tmp_path)  # resumes from 1 fine


@pytest.mark.e2e
def test_a_failed_background_write_stops_the_run_at_once_naming_its_step(data_file, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    original_save, original_finalize = ocp.CheckpointManager.save, ocp.CheckpointManager._finalize_checkpoint

    def failing_finalize(self, step):  # in Orbax's background thread, after the arrays are written
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_finalize(self, step)

    def save(self, step, *args, **kwargs):
        saved = original_save(self, step, *args, **kwargs)
        while step == 2 and self.is_saving_in_progress():  # a write that fails quickly
            time.sleep(0.01)
        return saved

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize_checkpoint", failing_finalize)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(CheckpointError, match=r"saving checkpoint 2 .* No space left on device.*intact \(\[1\]\)"):
        run(tiny_config(data_file, num_iterations=6), tmp_path)
    monkeypatch.undo()
    # stopped before training iteration 3
    assert [r["iteration"] for r in metric_records(tmp_path) if r["kind"] == "train"] == [1, 2]
    assert Checkpointer(tmp_path / "checkpoints").steps() == [1]


@pytest.mark.e2e
def test_restore_onto_a_different_mesh(data_file, tmp_path):
    run(tiny_config(data_file, num_iterations=1), tmp_path)
    config = tiny_config(data_file, num_iterations=2, mesh=(2, 2, 2), allow_config_change=True)  # mesh: a change
    last = run(config, tmp_path)
    assert np.isfinite(last["loss"]) and last["updates"] + last["skipped_total"] == 4
    params = final_params(tmp_path, config)
    assert params["q_proj"].shape[0] == 2


@pytest.mark.e2e
def test_export_cli_writes_a_transformers_model(straight, tmp_path):
    import torch
    import transformers

    ref_dir, config = straight
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "reval_jax.export", f"--checkpoint={ref_dir}", f"--out={out}"],  # the user's name
        cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
    tokens = np.arange(1, 11)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    model, tok = load_checkpoint_policy(ref_dir / "checkpoints", config, make_run_mesh(config))
    ours = np.asarray(model(jax.numpy.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4
    assert tok.encode("1+2") == transformers.AutoTokenizer.from_pretrained(str(out)).encode("1+2")
    generation = transformers.GenerationConfig.from_pretrained(str(out))  # the run's stops and sampling
    assert generation.eos_token_id == stop_token_ids(tok) and generation.do_sample
    assert generation.temperature == config.sampling.temperature and generation.top_p == config.sampling.top_p


# ----------------------------------------------------------------------------- checksums


def test_fingerprints_do_not_depend_on_the_sharding_and_see_one_bit():
    from jax.sharding import NamedSharding, PartitionSpec

    from reval_jax.parallel.sharding import make_mesh
    from reval_jax.run.checkpoint import fingerprints

    mesh = make_mesh((2, 2, 2))
    x = np.random.RandomState(0).randn(8, 6).astype(np.float32)
    tree = {"w": jax.numpy.asarray(x), "b": jax.numpy.asarray(x[0]).astype(jax.numpy.bfloat16),
            "n": np.arange(5, dtype=np.int32)}
    sharded = {**tree, "w": jax.device_put(tree["w"], NamedSharding(mesh, PartitionSpec(mesh.axis_names[:2])))}
    a, finite = fingerprints(tree)
    assert finite and a == fingerprints(sharded)[0]
    for flip in (0, 17, 47):  # one bit of one element, anywhere
        y = x.copy().reshape(-1)
        y.view(np.uint32)[flip] ^= 1 << (flip % 32)
        assert fingerprints({**tree, "w": jax.numpy.asarray(y.reshape(8, 6))})[0]["['w']"] != a["['w']"]
    y = x.copy()
    y[3, 2] = np.nan
    assert not fingerprints({**tree, "w": jax.numpy.asarray(y)})[1]


def test_a_non_finite_state_is_not_saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    good = {"params": jax.numpy.ones(3), "opt_state": jax.numpy.zeros(3)}
    said = []
    assert ckpt.save(1, good, {"x": np.zeros(2)}, {}, log=said.append)
    bad = {**good, "opt_state": jax.numpy.asarray([0.0, np.inf, 1.0])}
    assert not ckpt.save(2, bad, {"x": np.zeros(2)}, {}, log=said.append)
    ckpt.wait()
    assert ckpt.steps() == [1] and ckpt.last_good() == 1
    assert said == [f"not saving checkpoint 2: the parameters or optimizer state are not finite; "
                    f"the checkpoints kept in {ckpt.directory} are [1]"]
    ckpt.close()


def _largest_data_file(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


def _garble(f):  # a few bytes in the middle of the array data: the step still loads
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.fixture(scope="module")
def six(data_file, tmp_path_factory):
    """A 6-iteration run checkpointed every 2 iterations: steps [2, 4, 6]."""
    workdir = tmp_path_factory.mktemp("six")
    run(tiny_config(data_file, num_iterations=6, **{"checkpoint.every": 2}), workdir)
    assert Checkpointer(workdir / "checkpoints").steps() == [2, 4, 6]
    return workdir


@pytest.mark.e2e
@pytest.mark.parametrize("damage", [_garble, _truncate, lambda f: f.unlink()], ids=["garbled", "truncated", "deleted"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(six, data_file, tmp_path, capsys, damage):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(six, workdir)
    damage(_largest_data_file(workdir / "checkpoints" / "6"))
    config = tiny_config(data_file, num_iterations=7, **{"checkpoint.every": 2})
    # evaluate and export fall back to the newest usable step too, given the workdir
    said = []
    model, _ = load_checkpoint_policy(workdir, config, make_run_mesh(config), log=said.append)
    assert said[0].startswith("checkpoint 6 in ") and "is corrupt or partial and is skipped" in said[0]
    assert said[-1].startswith("loaded checkpoint 4 (the newest usable one)")
    capsys.readouterr()
    run(config, workdir)
    out = capsys.readouterr().out
    assert "checkpoint 6" in out and "corrupt or partial and is skipped" in out
    if damage is _garble:
        assert "values do not match the checksums saved with them: state" in out
    assert "resumed from checkpoint 4" in out
    assert Checkpointer(workdir / "checkpoints").steps() == [4, 6, 7]  # 6 written again, from 5
    assert (workdir / "checkpoints.corrupt" / "6").is_dir()
    train_rows = [r["iteration"] for r in metric_records(workdir) if r["kind"] == "train"]
    assert train_rows == [1, 2, 3, 4, 5, 6, 7]
    loss_steps = sorted(step for tag, step, _ in tb_scalars(workdir) if tag == "train/loss")
    assert loss_steps == train_rows  # the events of 5 and 6 from before the resume are gone


@pytest.mark.e2e
def test_a_checkpoint_without_checksums_is_accepted_with_a_warning(six, data_file, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(six, workdir)
    metadata = workdir / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(metadata.read_text())
    del meta["checksums"]
    metadata.write_text(json.dumps(meta))
    run(tiny_config(data_file, num_iterations=7, **{"checkpoint.every": 2}), workdir)  # a finished run is not read
    out = capsys.readouterr().out
    assert "warning: checkpoint 6" in out and "predates checksums; restored unverified" in out
    assert "resumed from checkpoint 6" in out


# ----------------------------------------------------------------------------- quiet recovery


def _recovery_output(workdir, data_file, module, args) -> str:
    """The output of a command (stdout and stderr in one file, as in a log) on `workdir`."""
    log = workdir.parent / "command.log"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file,
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", module, "--config=tests/run_config.py",
                               f"--config.model.path={tiny_config(data_file).model.path}",
                               f"--config.data.train_files=('{data_file}',)", "--config.checkpoint.every=2", *args],
                              cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=HANG_S)
    text = Path(log).read_text()
    assert proc.returncode == 0, text[-5000:]
    return text


def _assert_quiet(text: str, used: str, end_of_recovery: str) -> None:
    """The bad step and the one used are named, the reason in the same line; no traceback; the
    recovery takes a few lines."""
    lines = text.splitlines()
    bad = [line for line in lines if "checkpoint 6 in " in line and "is corrupt or partial and is skipped (" in line]
    assert len(bad) == 1 and bad[0].endswith(")"), text[-5000:]
    assert used in text, text[-5000:]
    for noise in ("Traceback", "Exception ignored", "Event loop is closed", "TensorStore", "read only"):
        assert noise not in text, (noise, text[-5000:])
    recovery = next(i for i, line in enumerate(lines) if end_of_recovery in line)
    assert recovery < 15, text


@pytest.mark.e2e
def test_evaluate_names_a_corrupt_step_and_the_one_it_uses_in_a_few_lines(six, data_file, tmp_path):
    """A deleted array file in the newest step: Orbax's failing read used to leave its other reads'
    coroutines to a closed event loop (a traceback and a TensorStore spec dump each)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(six, workdir)
    _largest_data_file(workdir / "checkpoints" / "6").unlink()
    out = tmp_path / "eval.json"
    text = _recovery_output(workdir, data_file, "reval_jax.run.evaluate", [f"--checkpoint={workdir}", f"--out={out}",
                                                 f"--config.eval.files=('{data_file}',)", "--config.eval.limit=2"])
    _assert_quiet(text, "loaded checkpoint 4 (the newest usable one)", "loaded checkpoint 4")
    assert "avg@2" in json.loads(out.read_text())
    assert (workdir / "checkpoints" / "6").is_dir()  # evaluate moves nothing


@pytest.mark.e2e
def test_a_resumed_run_names_a_corrupt_step_and_the_one_it_uses_in_a_few_lines(six, data_file, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(six, workdir)
    _largest_data_file(workdir / "checkpoints" / "6").unlink()
    text = _recovery_output(workdir, data_file, "reval_jax.run.train",
                            [f"--workdir={workdir}", "--config.num_iterations=7"])
    _assert_quiet(text, "resumed from checkpoint 4", "resumed from checkpoint 4")
    assert "moved checkpoint 6 aside" in text
    assert [r["iteration"] for r in metric_records(workdir) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6, 7]


def test_a_failed_restore_leaves_no_read_behind():
    """The mechanism of the noise, made deterministic: Orbax runs a restore in a fresh event loop;
    one read fails while another is still in flight. Inside `_settling_event_loops` the other read
    is awaited before the loop closes; without it, it would be left to a closed loop."""
    import asyncio
    import gc

    from orbax.checkpoint._src import asyncio_utils

    from reval_jax.run.checkpoint import _settling_event_loops

    def restore(finished):
        async def read(delay, fail):
            await asyncio.sleep(delay)
            if fail:
                raise OSError("truncated")
            finished.append(delay)

        async def restore_all():
            await asyncio.gather(read(0, True), read(0.05, False))

        with pytest.raises(OSError, match="truncated"):
            asyncio_utils.run_sync(restore_all())
        gc.collect()

    left = []
    restore(left)
    assert left == []  # Orbax alone: the slow read never finished (destroyed pending at the loop's close)
    settled, policy = [], asyncio.get_event_loop_policy()
    with _settling_event_loops():
        restore(settled)
    assert settled == [0.05]
    assert asyncio.get_event_loop_policy() is policy  # put back
