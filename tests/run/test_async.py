"""Asynchronous off-policy training (reval_jax/run/pipeline.py) on the tiny model and 8 fake devices:
async without staleness is sync, the staleness schedule is kept, weight pushes reach the rows in
flight, two device groups run the time-sliced schedule, resume is exact, a failing rollout side is
reported, and bad pipeline configs are refused.

Tiny runs: reval with K = 2 updates per round (its default), 4 iterations unless said otherwise,
scored in this process (helpers.InlineScorer: the reward path is not under test here).
"""

import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import InlineScorer, metric_records, reference_run, tiny_config
from models import tiny_model

from reval_jax.rollout.engine import Engine, EngineConfig, Pickup
from reval_jax.rollout.sampler import SamplingConfig, generate_static
from reval_jax.run import pipeline, producer, train
from reval_jax.run.config import PipelineConfig, pipeline_config
from reval_jax.run.pipeline import RolloutFailed, round_version
from reval_jax.run.policy import make_run_mesh

# one pytest-xdist worker runs this file: its tests share module fixtures (runs, a worker pool)
pytestmark = pytest.mark.xdist_group("test_async")

ASYNC2 = {"pipeline.mode": "async", "pipeline.max_staleness": 2}
# two groups: devices 0-3 generate (the rollout layout over them), device 4 trains (mesh (1, 1, 1))
GROUPS = {**ASYNC2, "pipeline.rollout_devices": 4}


def run(config, workdir):
    return train.run(config, str(workdir), scorer=InlineScorer())


def trains(workdir):
    return [r for r in metric_records(workdir) if r["kind"] == "train"]


def final_params(workdir, config):
    from reval_jax.run.policy import load_checkpoint_policy

    model, _ = load_checkpoint_policy(workdir / "checkpoints", config, make_run_mesh(config))
    return jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(model)))


def interrupt_at(monkeypatch, cls, iteration):
    """SIGTERM to this process when the trainer takes round `iteration`: the run finishes that
    iteration, checkpoints and returns, as when a scheduler preempts it."""
    take = cls.take

    def take_(self, i, state):
        if i == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return take(self, i, state)

    monkeypatch.setattr(cls, "take", take_)


def assert_sigterm_resume_is_exact(straight, cls, overrides, data_file, workdir, monkeypatch):
    """SIGTERM in iteration 2 of 4, then the same command: the straight run's records and weights."""
    interrupt_at(monkeypatch, cls, 2)
    config = tiny_config(data_file, num_iterations=4, **overrides)
    run(config, workdir)
    assert [r["iteration"] for r in trains(workdir)] == [1, 2]
    monkeypatch.undo()
    run(config, workdir)
    assert metric_records(workdir) == metric_records(straight)
    for x, y in zip(final_params(workdir, config), final_params(straight, config), strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- the schedule


def test_round_versions():
    """w_i = ⌈max(0, (i−1)K − max_staleness) / s⌉ · s; staleness (i−1)K − w_i never over the bound."""
    sync = PipelineConfig()
    assert [round_version(i, 2, sync) for i in range(1, 6)] == [0, 2, 4, 6, 8]
    for K in (1, 2, 4):
        for ms in (0, 1, 2, 4, 8):
            for s in (1, 2, 4):
                if K % s and s > ms + 1:
                    continue  # refused by pipeline_config
                cfg = PipelineConfig(mode="async", max_staleness=ms, sync_every=s)
                w = [round_version(i, K, cfg) for i in range(1, 40)]
                staleness = [(i - 1) * K - v for i, v in enumerate(w, 1)]
                assert all(v % s == 0 for v in w) and w == sorted(w)
                assert all(0 <= x <= ms for x in staleness), (K, ms, s, staleness)
                # the oldest weights the bound allows: one push earlier would be over it
                assert all(v == 0 or x + s > ms for v, x in zip(w, staleness, strict=True)), (K, ms, s, staleness)
    assert [round_version(i, 2, PipelineConfig(mode="async", max_staleness=0)) for i in range(1, 5)] == [0, 2, 4, 6]


def _config(prompts=4, **pipeline_fields):
    c = ml_collections.ConfigDict({"replay": {"updates_per_iteration": 2}, "data": {"prompts_per_iteration": prompts}})
    c.pipeline = dict(mode="async", max_staleness=2, sync_every=1, rollout_devices=0, pickup="round",
                      in_flight="continue", pickup_steps=16)
    c.pipeline.update(pipeline_fields)
    return c


@pytest.mark.parametrize("fields,processes,message", [
    ({"mode": "overlap"}, 1, "pipeline.mode: 'overlap' is not one of"),
    ({"pickup": "token"}, 1, "pipeline.pickup: 'token' is not one of"),
    ({"in_flight": "drop"}, 1, "pipeline.in_flight: 'drop' is not one of"),
    ({"max_staleness": -1}, 1, "need max_staleness >= 0"),
    ({"sync_every": 4, "max_staleness": 1}, 1, "pipeline.sync_every: 4: a round would wait"),
    ({"rollout_devices": 8}, 1, "use 0 .time-sliced. or 1..7 of the 8 devices"),
    ({"mode": "sync", "rollout_devices": 4}, 1, "needs pipeline.mode='async'"),
    ({"rollout_devices": 3}, 2, "3 on 2 processes of 4 devices each: .* multiple of 2 below 8"),
    ({"rollout_devices": 2, "prompts": 3}, 2, "prompts_per_iteration: 3 does not split over the 2 processes"),
    ({"pickup": "step"}, 1, "'step' picks up weights while the rollout group decodes"),
])
def test_bad_pipeline_configs_are_refused(fields, processes, message):
    with pytest.raises(ValueError, match=message):
        pipeline_config(_config(**fields), devices=8, processes=processes)


@pytest.mark.e2e
def test_async_without_staleness_is_sync(data_file, tmp_path, tmp_path_factory):
    """max_staleness = 0, time-sliced: each round is generated from the weights sync would use, so
    the run is sync's, bit for bit (only rounds_ahead differs: the next round is already there).
    The sync run is the 4-iteration reference run test_checkpoint resumes against."""
    asy = tmp_path / "async"
    config = tiny_config(data_file, num_iterations=4)
    sync = reference_run(tmp_path_factory, data_file, num_iterations=4)
    run(tiny_config(data_file, num_iterations=4, **{"pipeline.mode": "async"}), asy)
    a, b = metric_records(sync), metric_records(asy)
    assert [r["rounds_ahead"] for r in trains(sync)] == [0, 0, 0, 0]
    assert [r["rounds_ahead"] for r in trains(asy)] == [1, 1, 1, 0]
    strip = [{k: v for k, v in r.items() if k != "rounds_ahead"} for r in a], \
        [{k: v for k, v in r.items() if k != "rounds_ahead"} for r in b]
    assert strip[0] == strip[1]
    assert all(r["staleness_max"] == 0 for r in trains(asy))
    for x, y in zip(final_params(sync, config), final_params(asy, config), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def sliced(data_file, tmp_path_factory):
    """The uninterrupted 4-iteration time-sliced run at max_staleness 2."""
    workdir = tmp_path_factory.mktemp("sliced")
    run(tiny_config(data_file, num_iterations=4, **ASYNC2), workdir)
    return workdir


@pytest.mark.e2e
def test_staleness_is_bounded_and_reported(sliced):
    """K = 2, max_staleness = 2: rounds 1 and 2 come from the initial weights, round i > 2 from
    update 2(i−2); trained at 2(i−1), every round is 2 updates stale after the first."""
    records = trains(sliced)
    assert [r["staleness_max"] for r in records] == [0, 2, 2, 2]
    assert [r["staleness_mean"] for r in records] == [0, 2, 2, 2]
    # the buffer's older rounds add their age (the method's reuse): at most one round more here
    assert all(2 <= r["update_staleness_max"] <= 2 + 2 * (r["iteration"] > 1) + 1 for r in records[1:])
    assert [r["updates"] + r["skipped_total"] for r in records] == [2, 4, 6, 8]
    raw = [json.loads(line) for line in (sliced / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in raw if r["kind"] == "train"):  # time-sliced: one side busy at a time
        assert 0 <= r["rollout_busy"] + r["train_busy"] <= 1 and r["train_busy"] > 0, r
        assert r["rollout_wait_s"] == r["train_wait_s"] == 0


@pytest.mark.e2e
def test_grpo_async_uses_the_sampler_log_probs(data_file, tmp_path):
    """GRPO (K = 1) at max_staleness 1: round i ≥ 2 was sampled one update back, and the truncated
    importance weight exp(log π_old − log π_sampler) corrects for it (≠ 1 from round 2 on, 1 up to
    rounding on round 1, generated by the policy it trains). The random model solves no sum, so the
    reward is the parity of the response text's character codes' sum here: groups with both rewards,
    advantages ≠ 0, updates that move the policy."""

    class Parity(InlineScorer):
        def score(self, pairs):
            super().score(pairs)  # counted like the real scorer
            return [float(sum(map(ord, text)) % 2) for text, _ in pairs]

    config = tiny_config(data_file, algorithm="grpo", **{"pipeline.mode": "async", "pipeline.max_staleness": 1})
    train.run(config, str(tmp_path), scorer=Parity())
    records = trains(tmp_path)
    assert [r["staleness_max"] for r in records] == [0, 1, 1]
    assert all(r["grad_norm"] > 0 for r in records)
    assert abs(records[0]["is_weight_mean"] - 1) < 1e-4
    assert all(abs(r["is_weight_mean"] - 1) > 1e-4 for r in records[1:]), [r["is_weight_mean"] for r in records]


@pytest.mark.e2e
def test_time_sliced_resume_is_exact(sliced, data_file, tmp_path, monkeypatch):
    """SIGTERM during iteration 2 checkpoints the rounds generated ahead (3 and 4, from updates 2 and
    4) with the data position after them; the same command then finishes the straight run's run."""
    assert_sigterm_resume_is_exact(sliced, pipeline.TimeSliced, ASYNC2, data_file, tmp_path, monkeypatch)


@pytest.mark.e2e
def test_resuming_refuses_rounds_over_a_smaller_bound(sliced, data_file, tmp_path):
    import shutil

    shutil.copytree(sliced, tmp_path / "run")
    for step in (3, 4):  # back to checkpoint 2, which holds rounds 3 and 4, 2 updates stale
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    accepted = {"allow_config_change": True}  # past the run record's check: the checkpoint's own
    with pytest.raises(ValueError, match="holds round 3 generated 2 updates ahead.*max_staleness=2 or more"):
        run(tiny_config(data_file, num_iterations=4, **{**ASYNC2, "pipeline.max_staleness": 1}, **accepted),
            tmp_path / "run")
    with pytest.raises(ValueError, match="written by an asynchronous run with rounds \\[3, 4\\]"):
        run(tiny_config(data_file, num_iterations=4, **accepted), tmp_path / "run")


# ----------------------------------------------------------------------------- two device groups


@pytest.fixture(scope="module")
def groups(data_file, tmp_path_factory):
    """The uninterrupted 4-iteration two-group run (round pickup) at max_staleness 2."""
    workdir = tmp_path_factory.mktemp("groups")
    run(tiny_config(data_file, num_iterations=4, **GROUPS), workdir)
    return workdir


@pytest.mark.e2e
def test_two_groups_run_the_time_sliced_schedule(groups, sliced):
    """Rollouts on devices 0-3, updates on device 4, overlapped: the same rounds from the same
    versions as the time-sliced run; the numbers agree to the rounding of the other layout."""
    a, b = trains(sliced), trains(groups)
    for ra, rb in zip(a, b, strict=True):
        for k in ("staleness_max", "staleness_mean", "update_staleness_max", "updates", "response_length",
                  "accuracy"):
            assert ra[k] == rb[k], k
        np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-4, atol=1e-6)


@pytest.mark.e2e
def test_two_groups_resume_is_exact(groups, data_file, tmp_path, monkeypatch):
    """SIGTERM: the rollout thread is brought to rest at its bound, the rounds it generated ahead
    are saved, and the rerun continues the straight two-group run bit for bit."""
    assert_sigterm_resume_is_exact(groups, pipeline.TwoGroups, GROUPS, data_file, tmp_path, monkeypatch)


@pytest.mark.e2e
def test_a_failing_rollout_group_is_reported(data_file, tmp_path, monkeypatch):
    """An error in the rollout thread reaches the trainer, naming the round, instead of a hang; the
    checkpoints written before it stay."""
    generate = producer.generate

    def failing(model, prompts, config, *, seed, **kwargs):
        if kwargs["pickup"].version >= 4:  # round 4's weights, pushed after iteration 2's updates
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating the KV cache")
        return generate(model, prompts, config, seed=seed, **kwargs)

    monkeypatch.setattr(producer, "generate", failing)
    with pytest.raises(RolloutFailed, match="generating round 4: MemoryError: RESOURCE_EXHAUSTED"):
        run(tiny_config(data_file, num_iterations=4, **GROUPS), tmp_path)
    from reval_jax.run.checkpoint import Checkpointer

    # round 4 fails before checkpoint 2 can hold the rounds ahead (a save waits for the rollout
    # side to rest at its bound): checkpoint 1 is the last one, and the run resumes from it
    assert Checkpointer(tmp_path / "checkpoints").steps() == [1]


# ----------------------------------------------------------------------------- weights between decode calls

PROMPTS = [list(np.random.RandomState(1).randint(1, 120, n)) for n in (5, 17, 9, 33, 2, 12)]
UNIFORM = SamplingConfig(max_new_tokens=12, num_samples=3, temperature=1.0, stop_ids=(), buckets=(64,))


def _flat_model():
    """The tiny model with its final norm zeroed: every logit 0, every token's log-prob −log V."""
    graphdef, state = nnx.split(tiny_model())
    state = jax.tree.map(lambda x: x, state)  # new variables: the shared model stays as it is
    norm = state["final_norm"]
    norm.set_value(np.zeros(norm.get_value().shape, np.float32))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("in_flight", ["continue", "finish"])
@pytest.mark.slow
def test_pushed_weights_reach_the_rows_in_flight(in_flight):
    """6 slots for 18 samples, 4 decode steps per call; new weights (version 7) arrive before the
    second call. 'continue': the 6 rows in flight keep their cache, their first 5 tokens (a_1 from
    the prefill, then 4 steps) are the old model's and the rest the new one's; 'finish': they end
    under the old weights before anything new is admitted. Every later row is the new model's."""
    old, new = tiny_model(), _flat_model()
    V = old.cfg.vocab_size
    polls = []

    def poll():
        polls.append(len(polls))
        return (7, new) if len(polls) == 2 else None

    engine = Engine(old, UNIFORM, EngineConfig(slots=6, page_size=4, prefill_rows=2), prompt_bucket=64, version=3)
    out = engine.run(PROMPTS, seed=5, prompt_ids=list(range(6)), limits=[12] * 6,
                     pickup=Pickup(weights=poll, max_steps=4, in_flight=in_flight))
    ref = jax.tree.map(np.asarray, generate_static(old, PROMPTS, UNIFORM, seed=5))
    first = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}  # prompts 0 and 1 fill the 6 slots
    switch = 5 if in_flight == "continue" else 12
    for p, samples in enumerate(out):
        for n, (tokens, logp, versions) in enumerate(samples):
            assert len(tokens) == 12
            k = switch if (p, n) in first else 0  # tokens under the old weights
            np.testing.assert_array_equal(versions, [3] * k + [7] * (12 - k))
            np.testing.assert_array_equal(tokens[:k], ref.response_tokens[p * 3 + n, :k])
            np.testing.assert_allclose(logp[:k], ref.logp[p * 3 + n, :k], atol=1e-5)
            np.testing.assert_allclose(logp[k:], -np.log(V), atol=1e-5)
    # polled before every decode call (and once more before the loop ends)
    assert engine.stats["decode_calls"] >= 4 and len(polls) == engine.stats["decode_calls"] + 1


@pytest.mark.e2e
def test_step_pickup_records_every_tokens_version(data_file, tmp_path):
    """Two groups, step pickup every 2 decode steps: rounds start under the newest pushed weights
    (never staler than the bound) and every response token's version is recorded."""
    run(tiny_config(data_file, num_iterations=3, **GROUPS, **{"pipeline.pickup": "step", "pipeline.pickup_steps": 2}),
        tmp_path)
    records = trains(tmp_path)
    assert all(0 <= r["staleness_max"] <= 2 for r in records)
    assert [r["updates"] + r["skipped_total"] for r in records] == [2, 4, 6]


def test_rollout_versions_reach_the_trajectories():
    r = generate_static(tiny_model(), PROMPTS[:2], UNIFORM, seed=1)
    traj = r.to_trajectories()
    v, mask = np.asarray(traj.sampler_version), np.asarray(traj.response_mask)
    assert mask.any() and (v[mask] == 0).all() and (v[~mask] == -1).all()


@pytest.mark.e2e
def test_multi_turn_episodes_run_ahead_in_async_mode(data_file, tmp_path):
    """Multi-turn episodes (helpers.LetterEnv) generated one update ahead: the rounds carry their
    policy masks through the pipeline (checkpointed rounds included) and train at staleness 1."""
    config = tiny_config(data_file, **{"env.name": "helpers:LetterEnv", "env.max_turns": 3,
                                       "pipeline.mode": "async", "pipeline.max_staleness": 1})
    run(config, tmp_path)
    records = trains(tmp_path)
    assert [r["staleness_max"] for r in records] == [0, 1, 1]
    assert all(np.isfinite(r["loss"]) and 1 <= r["env_turns_mean"] <= 3 for r in records)
    assert max(r["env_turns_mean"] for r in records) > 1
