"""The real training entry point on a tiny model and tiny data: every algorithm, one device and
8 fake devices, metrics files, and the config/data errors a user can hit."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import HANG_S, REPO_ROOT, InlineScorer, metric_records, reference_run, tiny_config

from reval_jax.errors import UserError
from reval_jax.run import config as run_config
from reval_jax.run import train
from reval_jax.run.hooks import progress_line

TRAIN_FIELDS = {"loss", "grad_norm", "accuracy", "reward_mean", "response_length", "truncation_rate",
                "generate_s", "update_s", "tokens_per_s", "buffer_size", "buffer_sample_age_mean",
                "buffer_uses_mean_current", "updates", "skipped_total", "kl_mean"}


def read(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.parametrize("algorithm", ["reval", "tbrm", "regression", "grpo", "rloo", "dapo"])
def test_each_algorithm_runs_and_writes_finite_metrics(algorithm, data_file, tmp_path):
    evaluating = algorithm == "reval"  # the evaluation path is the same for every algorithm
    config = tiny_config(data_file, algorithm=algorithm)
    config.eval.every = 2 if evaluating else 0
    if algorithm == "regression":  # the stored-reference path: reference pass, stale recompute after resets
        config.exact_reference, config.reference.reset_every = False, 1
    # the reward workers (RewardScorer) score the run that evaluates; the others score in this process
    train.run(config, str(tmp_path), **({} if evaluating else {"scorer": InlineScorer()}))
    records = read(tmp_path)
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in trains] == [1, 2, 3]
    assert [r["iteration"] for r in evals] == ([0, 2, 3] if evaluating else [])
    fields = TRAIN_FIELDS - ({"kl_mean"} if algorithm in ("grpo", "rloo", "dapo") else set())
    for r in trains:
        assert fields <= set(r), fields - set(r)
        for k in fields:
            assert np.isfinite(r[k]), (k, r[k])
    assert all(0 <= e["avg@2"] <= 1 and "arith/truncation_rate" in e for e in evals)
    data = next(r for r in records if r["kind"] == "data")
    assert data["skipped_missing"] == 1 and data["kept"] == 24
    expected_updates = {"reval": 2, "regression": 2, "tbrm": 1, "grpo": 1, "rloo": 1, "dapo": 1}[algorithm]
    assert trains[-1]["updates"] + trains[-1]["skipped_total"] == 3 * expected_updates
    if algorithm == "regression":
        assert trains[-1]["ref_version"] == trains[-1]["updates"]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event files


@pytest.mark.e2e
def test_multi_turn_episodes_train_and_report_their_turns(data_file, tmp_path):
    """An environment by "module:Class" (helpers.LetterEnv: a lowercase letter ends a turn and is
    answered "=1"): episodes of several turns train (their policy masks are not contiguous), every
    round reports the episodes' figures, the evaluation samples episodes of the environment too, and a
    run stopped and resumed is the same run."""
    config = tiny_config(data_file, **{"env.name": "helpers:LetterEnv", "env.max_turns": 3, "eval.every": 3})
    train.run(config, str(tmp_path), scorer=InlineScorer())
    evals = [r for r in read(tmp_path) if r["kind"] == "eval"]  # evaluated as episodes of the environment too
    assert [r["iteration"] for r in evals] == [0, 3]
    assert all(1 <= r["arith/env_turns_mean"] <= 3 and 0 <= r["avg@2"] <= 1 for r in evals), evals
    trains = [r for r in read(tmp_path) if r["kind"] == "train"]
    assert [r["iteration"] for r in trains] == [1, 2, 3]
    env = ("env_turns_mean", "env_observation_tokens_mean", "env_tool_use_rate", "env_tool_calls", "env_tool_errors",
           "env_tool_timeouts", "env_tool_s", "env_truncated_rate")
    for r in trains:
        assert all(np.isfinite(r[k]) for k in TRAIN_FIELDS | set(env)), r
        assert 1 <= r["env_turns_mean"] <= 3 and r["env_tool_errors"] == 0
    assert max(r["env_turns_mean"] for r in trains) > 1 and sum(r["env_tool_calls"] for r in trains) > 0
    assert all((r["env_tool_use_rate"] > 0) == (r["env_tool_calls"] > 0) for r in trains)
    assert all(r["env_observation_tokens_mean"] == pytest.approx(2 * (r["env_turns_mean"] - 1), abs=1) for r in trains)
    # stopped after 2 iterations and resumed: the same training, bit for bit (episodes are keyed like
    # samples); the first start also evaluates at its last iteration, so only the train records compare
    from test_checkpoint import final_params

    resumed = tmp_path / "resumed"
    train.run(tiny_config(data_file, **{"env.name": "helpers:LetterEnv", "env.max_turns": 3, "eval.every": 3,
                                        "num_iterations": 2}), str(resumed), scorer=InlineScorer())
    train.run(config, str(resumed), scorer=InlineScorer())
    only_train = lambda w: [r for r in metric_records(w) if r["kind"] == "train"]
    assert only_train(resumed) == only_train(tmp_path)
    for x, y in zip(jax.tree.leaves(final_params(resumed, config)), jax.tree.leaves(final_params(tmp_path, config)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.e2e
def test_runs_sharded_on_8_devices(data_file, tmp_path):
    config = tiny_config(data_file, mesh=(2, 2, 2), num_iterations=2)
    config.eval.every = 0
    last = train.run(config, str(tmp_path), scorer=InlineScorer())
    assert np.isfinite(last["loss"]) and last["updates"] + last["skipped_total"] == 4


@pytest.mark.e2e
def test_config_errors_name_the_field(data_file, tmp_path):
    with pytest.raises(ValueError, match="config.algorithm: 'ppo' is not one of"):
        train.run(tiny_config(data_file, algorithm="ppo"), str(tmp_path))
    with pytest.raises(ValueError, match="config.model.path: '/nope' is not a directory"):
        train.run(tiny_config(data_file, **{"model.path": "/nope"}), str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        train.run(tiny_config(data_file, **{"data.train_files": ("/nope.jsonl",)}), str(tmp_path))
    with pytest.raises(ValueError, match="config.tokens_per_device: 10 tokens do not hold one packed row of 76"):
        train.run(tiny_config(data_file, tokens_per_device=10), str(tmp_path))


def test_progress_line_estimates_time_left_without_the_compiling_iteration():
    assert progress_line(1, 60, [30.0]) == "iteration 1/60 (30.0s; about 29m30s left)"
    assert progress_line(3, 60, [30.0, 4.0, 2.0]) == "iteration 3/60 (2.0s; about 2m51s left)"
    assert progress_line(2, 2000, [30.0, 4.0]) == "iteration 2/2000 (4.0s; about 2h13m left)"


def test_algorithm_defaults_follow_the_spec(data_file):
    """Regression (Eq. 8) runs on r − group mean; GRPO takes one update per round (ρ ≡ 1)."""
    config = tiny_config(data_file, algorithm="regression", **{"reward.transform": "binary"})
    assert run_config.apply_algorithm_defaults(config) == ["reward.transform: 'binary' -> 'centered'"]
    run_config.check_config(config)
    config = tiny_config(data_file, algorithm="regression", algorithm_defaults=False,
                         **{"reward.transform": "plus_minus_one"})
    with pytest.raises(ValueError, match="config.reward.transform: 'plus_minus_one': the regression variant"):
        run_config.check_config(config)
    config = tiny_config(data_file, algorithm="grpo", algorithm_defaults=False,
                         **{"replay.updates_per_iteration": 2})
    with pytest.raises(ValueError, match="config.replay.updates_per_iteration: 2: GRPO does not store"):
        run_config.check_config(config)
    config = tiny_config(data_file, algorithm="grpo", **{"replay.updates_per_iteration": 2})
    run_config.apply_algorithm_defaults(config)
    run_config.check_config(config)


def test_fresh_priority_is_checked_and_reaches_the_loop(data_file):
    fields = {"replay.prioritized": True, "replay.fresh_priority": "delta"}
    config = tiny_config(data_file, **fields)
    run_config.check_config(config)
    assert run_config.run_settings(config, 1, 1).loop.fresh_priority_from_delta
    assert not run_config.run_settings(tiny_config(data_file), 1, 1).loop.fresh_priority_from_delta
    with pytest.raises(ValueError, match="config.replay.fresh_priority: 'delta' takes .* it needs replay.schedule"):
        run_config.check_config(tiny_config(data_file, **fields, **{"replay.schedule": "buffer_only"}))
    with pytest.raises(ValueError, match="config.replay.fresh_priority: 'newest': use max or delta"):
        run_config.check_config(tiny_config(data_file, **{"replay.fresh_priority": "newest"}))


def test_scan_layers_reaches_the_trained_model(data_file):
    """config.model.scan_layers (the demo's False: an unrolled layer loop) is the loaded policy's."""
    from configs import tiny
    from reval_jax.run.policy import load_hf_policy

    assert tiny.get_config().model.scan_layers is False
    for scan in (True, False):
        config = tiny_config(data_file, **{"model.scan_layers": scan})
        assert load_hf_policy(run_config.model_settings(config), None)[0].cfg.scan_layers is scan


@pytest.mark.e2e
def test_a_failed_start_leaves_the_workdir_as_it_was(data_file, tmp_path):
    """Every check (model directory, weights, data, evaluation files) runs before anything is
    written: a bad start in an existing run's workdir leaves config.json byte for byte."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    record = b'{"algorithm": "reval", "model": {"path": "/somewhere/good"}}'
    (workdir / "config.json").write_bytes(record)
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    no_rows = tmp_path / "no_rows.jsonl"
    no_rows.write_text('{"problem": "", "answer": "1"}\n')
    bad_starts = [({"model.path": str(empty_model)}, "config.json"),
                  ({"data.train_files": (str(no_rows),)}, "no usable rows"),
                  ({"eval.every": 1, "eval.files": (str(no_rows),)}, "no usable rows")]
    for overrides, message in bad_starts:
        with pytest.raises((ValueError, FileNotFoundError), match=message):  # past the record's check: accepted
            train.run(tiny_config(data_file, allow_config_change=True, **overrides), str(workdir))
        assert (workdir / "config.json").read_bytes() == record
        assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]


@pytest.mark.e2e
def test_command_line_rejects_a_mistyped_field(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "reval_jax.run.train", "--config=configs/base.py",
         "--config.reward.transfrom=binary", f"--workdir={tmp_path}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode != 0
    assert "transfrom" in proc.stderr


def _cli_env(data_file):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file,
            "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}


def file_hashes(directory: Path) -> dict[str, str]:
    """Every file and folder under `directory` by relative path: a sha256 of each file's bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.mark.e2e
def test_command_line_without_workdir_writes_runs_config_stem(data_file, tmp_path):
    """--workdir is optional: the run goes to runs/<config file stem> under the current directory.
    The same command on the finished run says so, trains nothing and leaves every file as it was."""
    (tmp_path / "mini.py").write_text((Path(REPO_ROOT) / "tests" / "run_config.py").read_text())
    command = [sys.executable, "-m", "reval_jax.run.train", "--config=mini.py", "--config.num_iterations=1",
               f"--config.model.path={tiny_config(data_file).model.path}"]  # one model directory for both
    proc = subprocess.run(command, cwd=tmp_path, env=_cli_env(data_file), capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "runs" / "mini"
    records = read(workdir)
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1]
    assert "iteration 1/1: compiling" in proc.stdout and "iteration 1/1 (" in proc.stdout
    before = file_hashes(workdir)
    assert "config.json" in before and any(name.startswith("tb/events.out.tfevents") for name in before)
    again = subprocess.run(command, cwd=tmp_path, env=_cli_env(data_file), capture_output=True, text=True,
                           timeout=HANG_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is a finished run" in again.stdout and "nothing to train" in again.stdout
    assert "compiling" not in again.stdout
    assert file_hashes(workdir) == before  # metrics, config.json, TensorBoard events, checkpoints
    # quiet by default: no absl/Orbax INFO lines ("I1202 00:00:00.0 ... Closing _NonBlocking...")
    output = proc.stdout + proc.stderr
    assert re.search(r"(?m)^I\d{4} ", output) is None and "_NonBlockingMetadataStore" not in output, output[-3000:]


@pytest.mark.e2e
def test_a_start_that_trains_nothing_or_is_refused_changes_nothing(data_file, tmp_path_factory, tmp_path, capsys):
    """On a finished run: the same config trains nothing, another algorithm is refused naming the
    differences and the flag; both leave every file byte for byte. Accepted, the change trains on
    and is recorded beside the original config.json, which stays as it was."""
    workdir = tmp_path / "run"
    shutil.copytree(reference_run(tmp_path_factory, data_file, num_iterations=4), workdir)
    before = file_hashes(workdir)
    capsys.readouterr()
    assert train.run(tiny_config(data_file, num_iterations=4), str(workdir), scorer=InlineScorer()) == {}
    assert "is a finished run (checkpoint 4, num_iterations=4): nothing to train" in capsys.readouterr().out
    assert file_hashes(workdir) == before
    with pytest.raises(UserError) as refused:
        train.run(tiny_config(data_file, algorithm="grpo", num_iterations=5), str(workdir), scorer=InlineScorer())
    message = str(refused.value)
    assert "this start changes algorithm: 'reval' -> 'grpo'; replay.updates_per_iteration: 2 -> 1." in message
    assert "--config.allow_config_change=True" in message
    assert file_hashes(workdir) == before

    accepted = tiny_config(data_file, algorithm="grpo", num_iterations=5, allow_config_change=True)
    assert train.run(accepted, str(workdir), scorer=InlineScorer())["iteration"] == 5
    assert file_hashes(workdir)["config.json"] == before["config.json"]
    assert json.loads((workdir / "config.json").read_text())["algorithm"] == "reval"
    assert json.loads((workdir / "config.start-5.json").read_text())["algorithm"] == "grpo"
    assert "recorded in" in capsys.readouterr().out
    # the run's latest record is now the grpo start's: the same command goes on without the flag
    again = tiny_config(data_file, algorithm="grpo", num_iterations=5)
    before = file_hashes(workdir)
    assert train.run(again, str(workdir), scorer=InlineScorer()) == {}
    assert file_hashes(workdir) == before


@pytest.mark.e2e
def test_generating_in_chunks_gives_the_same_run(data_file, tmp_path):
    """sampling.batch_size splits a round into several sampler calls; samples are keyed by prompt
    id, so the run is the same as with one call."""
    whole = train.run(tiny_config(data_file, num_iterations=1), str(tmp_path / "whole"), scorer=InlineScorer())
    config = tiny_config(data_file, num_iterations=1)
    config.sampling.batch_size = 4  # one prompt (4 samples) per call
    chunked = train.run(config, str(tmp_path / "chunked"), scorer=InlineScorer())
    # Exact: with the same samples, both runs update through the same compiled programs. The samples
    # come from two sampler programs (4 and 8 rows); they agree unless a draw lies within rounding of
    # a tie of the logits (test_sampler checks that tie-aware; these ~100 draws have none). Such a
    # tie would fail this test on every run, not now and then.
    for key in ("loss", "accuracy", "response_length", "grad_norm", "delta_abs_max"):
        assert chunked[key] == whole[key], key


@pytest.mark.e2e
def test_evaluate_command_writes_json(data_file, tmp_path):
    out = tmp_path / "eval.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "REVAL_TEST_DATA": data_file,
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])}
    model_dir = tiny_config(data_file).model.path
    proc = subprocess.run(
        [sys.executable, "-m", "reval_jax.run.evaluate", "--config=tests/run_config.py", f"--hf={model_dir}",
         f"--config.eval.files=('{data_file}',)", "--config.eval.limit=3", "--config.eval.k=2", f"--out={out}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"arith/avg@2", "arith/response_length", "arith/truncation_rate", "avg@2"}
    assert 0 <= results["avg@2"] <= 1 and results["arith/response_length"] > 0


@pytest.mark.e2e
def test_in_a_log_file_the_eval_line_starts_its_own_line(data_file, tmp_path):
    """stdout and stderr to one file, progress bars on: no bar (its carriage returns) is left on the
    line of `[eval N]`. The evaluation is greedy (eval.temperature 0) on the command line."""
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "reval_jax.run.train", "--config=tests/run_config.py",
             f"--workdir={tmp_path / 'run'}", f"--config.model.path={tiny_config(data_file).model.path}",
             "--config.num_iterations=1", "--config.progress=True", "--config.eval.every=1",
             "--config.eval.temperature=0"],
            cwd=REPO_ROOT, env=_cli_env(data_file), stdout=out, stderr=subprocess.STDOUT, text=True, timeout=HANG_S)
    text = log.read_bytes().decode()  # as written: read_text() would turn the bars' "\r" into newlines
    assert proc.returncode == 0, text[-3000:]
    assert text.count("[eval") == 2, text[-3000:]  # before the first round and after the last
    assert re.search(r"[^\n]\[eval", text) is None, text[-3000:]
