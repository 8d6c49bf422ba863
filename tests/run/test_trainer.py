"""Algorithm 1's loop (reval_jax/run/trainer.py) without a model: a fake pipeline, learner and
replay buffer record what the trainer asks of them, in order. Checked: take -> reference terms ->
add -> K updates (the fresh round first, then buffer draws), the reference reset every R updates
(with the buffer flushed on reset when asked), new weights to the pipeline after every update, the
hooks in their order, a stop request, and the divergence stop."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reval_jax.data.batch import FIELD_DTYPES, TOKEN_FIELDS, Trajectories
from reval_jax.objective.train_step import init_state, reset_reference
from reval_jax.run.config import LoopConfig
from reval_jax.run.pipeline import Clock, Round
from reval_jax.run.trainer import Diverged, Hook, Trainer

B, T = 4, 6


def batch(iteration: int, version: int) -> Trajectories:
    arrays = {k: np.zeros((B, T) if k in TOKEN_FIELDS else (B,)) for k in FIELD_DTYPES}
    arrays["response_mask"][:, 3:] = True
    arrays["sampler_version"][:] = version
    arrays["iteration"][:] = iteration
    arrays["raw_reward"][:] = [1, 0, 1, 1]
    return Trajectories.from_numpy(arrays)


class Log(list):
    def __call__(self, *event):
        self.append(event)


class FakePipeline:
    def __init__(self, log: Log, version_of):
        self.log, self.version_of, self.queue = log, version_of, {}

    def start(self, state, first):
        self.log("start", first)

    def take(self, iteration, state):
        self.log("take", iteration, int(state.step))
        return Round(iteration, batch(iteration, self.version_of(iteration)), np.zeros(B, bool), 0.5)

    def update_params(self, state):
        self.log("weights", int(state.step), int(state.ref_version))


class FakeLearner:
    def __init__(self, log: Log, skip_from: int | None = None):
        self.log, self.skip_from = log, skip_from

    def fill_reference(self, b, state):
        self.log("reference", int(state.ref_version))
        return b

    def update(self, state, b, weights):
        skip = self.skip_from is not None and int(state.step) + int(state.skipped) >= self.skip_from
        self.log("update", int(b.iteration[0]), float(weights.sum()))
        if skip:
            state = state.replace(skipped=state.skipped + 1, skipped_in_a_row=state.skipped_in_a_row + 1)
        else:
            state = state.replace(step=state.step + 1, skipped_in_a_row=jnp.zeros((), jnp.int32))
        return state, {"loss": 1.0, "skipped": skip, "abs_delta": np.ones(B)}

    def reset(self, state):
        return reset_reference(state), {}


@dataclasses.dataclass
class Sample:
    batch: Trajectories
    weights: np.ndarray
    indices: np.ndarray


class FakeBuffer:
    def __init__(self, log: Log):
        self.log, self.rounds = log, []

    def add(self, b):
        self.log("add", int(b.iteration[0]))
        self.rounds.append(b)
        return 100 * len(self.rounds) + np.arange(B)  # the slots written


    def sample(self, n, *, iteration, ref_version, recompute_fn):
        self.log("draw", iteration, ref_version)
        if recompute_fn is not None:
            recompute_fn(self.rounds[0])  # a stale entry: its terms under the current reference
        return Sample(self.rounds[-1], np.full(n, 0.5, np.float32), np.arange(n))

    def update_priorities(self, indices, abs_delta):
        self.log("priorities", len(indices), int(indices[0]))

    def flush(self):
        self.log("flush")

    def stats(self):
        return {"size": float(len(self.rounds))}


class Recorder(Hook):
    def __init__(self, log: Log, name: str):
        self.log, self.name = log, name

    def on_start(self, trainer, first):
        self.log(self.name, "start", first)

    def on_round_start(self, trainer, iteration):
        self.log(self.name, "round_start", iteration)

    def on_round_end(self, trainer, iteration, metrics):
        self.log(self.name, "round_end", iteration, metrics["updates"])

    def on_end(self, trainer):
        self.log(self.name, "end")


def make(log, *, K=2, R=3, on_policy_first=True, stores_reference=False, flush=False, prioritized=False,
         iterations=3, skip_from=None, version_of=lambda i: 2 * (i - 1), fresh_from_delta=False):
    cfg = LoopConfig(num_iterations=iterations, updates_per_round=K, update_batch=B, on_policy_first=on_policy_first,
                     reset_every=R, flush_on_reset=flush, prioritized=prioritized, stores_reference=stores_reference,
                     max_skipped_in_a_row=2, fresh_priority_from_delta=fresh_from_delta)
    state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1))
    stats = type("Stats", (), {"timeouts": 0, "errors": 0})()
    return Trainer(cfg, state, FakeLearner(log, skip_from), FakeBuffer(log), FakePipeline(log, version_of), Clock(),
                   lambda: stats)


def test_algorithm_1_in_order():
    log = Log()
    trainer = make(log, stores_reference=True, prioritized=True)
    trainer.add_hook(Recorder(log, "a"))
    trainer.add_hook(Recorder(log, "b"))
    last = trainer.train(1)
    round_1 = [("a", "round_start", 1), ("b", "round_start", 1), ("take", 1, 0), ("reference", 0), ("add", 1),
               ("update", 1, 4.0), ("weights", 1, 0),  # the fresh round, weight 1 each
               ("draw", 1, 0), ("reference", 0), ("update", 1, 2.0), ("priorities", B, 0), ("weights", 2, 0),
               ("a", "round_end", 1, 2), ("b", "round_end", 1, 2)]
    assert log[:3] == [("a", "start", 1), ("b", "start", 1), ("start", 1)]
    assert log[3 : 3 + len(round_1)] == round_1
    # R = 3: the reset after update 3 (round 2's first) and 6 (round 3's last); the pipeline gets the new reference
    assert [e for e in log if e[0] == "weights"] == [("weights", 1, 0), ("weights", 2, 0), ("weights", 3, 1),
                                                    ("weights", 4, 1), ("weights", 5, 1), ("weights", 6, 2)]
    assert log[-2:] == [("a", "end"), ("b", "end")]
    assert last["iteration"] == 3 and last["updates"] == 6 and last["ref_version"] == 2
    assert last["accuracy"] == 0.75 and last["response_length"] == 3 and last["buffer_size"] == 3
    # round i was sampled at 2(i − 1), trained from there: staleness 0; the buffer draws are one round old at most
    assert last["staleness_max"] == 0 and last["update_staleness_max"] == 1


def test_fresh_priorities_from_the_on_policy_update():
    """replay.fresh_priority = delta: the fresh round's |δ| from update k = 0 become its slots' priorities
    (the slots `add` wrote), then the buffer draw's as before."""
    log = Log()
    make(log, prioritized=True, fresh_from_delta=True, iterations=2).train(1)
    round_2 = [e for e in log if e[0] in ("add", "update", "draw", "priorities")][6:]
    assert round_2 == [("add", 2), ("update", 2, 4.0), ("priorities", B, 200), ("draw", 2, None),
                       ("update", 2, 2.0), ("priorities", B, 0)]


def test_buffer_only_flush_on_reset_and_staleness():
    log = Log()
    last = make(log, K=2, R=2, on_policy_first=False, flush=True, iterations=2, version_of=lambda i: 0).train(1)
    updates = [e for e in log if e[0] in ("add", "draw", "update", "flush")]
    assert updates == [("add", 1), ("draw", 1, None), ("update", 1, 2.0), ("draw", 1, None), ("update", 1, 2.0),
                       ("flush",), ("add", 2), ("draw", 2, None), ("update", 2, 2.0), ("draw", 2, None),
                       ("update", 2, 2.0), ("flush",)]
    assert "reference" not in {e[0] for e in log}  # exact reference: no stored terms to fill
    assert last["staleness_max"] == 2  # round 2 sampled at version 0, trained at 2


def test_a_stop_request_ends_the_loop_after_the_iteration():
    log = Log()
    trainer = make(log, iterations=5)

    class StopAt2(Hook):
        def on_round_end(self, trainer, iteration, metrics):
            if iteration == 2:
                trainer.request_stop("stopped after iteration {iteration}")

    trainer.add_hook(StopAt2())
    trainer.add_hook(Recorder(log, "after"))
    last = trainer.train(1)
    assert last["iteration"] == 2 and [e[1] for e in log if e[0] == "take"] == [1, 2]
    assert ("after", "round_end", 2, 4) in log and log[-1] == ("after", "end")  # later hooks still run


def test_a_resumed_loop_starts_at_its_iteration_and_a_finished_one_trains_nothing():
    log = Log()
    make(log, iterations=3).train(3)
    assert [e[1] for e in log if e[0] == "take"] == [3] and ("start", 3) in log
    log.clear()
    assert make(log, iterations=3).train(4) == {}
    assert log == []


def test_non_finite_updates_in_a_row_stop_the_run():
    log = Log()
    with pytest.raises(Diverged, match="stopping at iteration 2: 2 updates in a row had a non-finite loss"):
        make(log, skip_from=2).train(1)  # round 1's updates apply, round 2's both skip
    # the skipped update leaves the weights as they were; the second one raises before handing them on
    assert [e for e in log if e[0] == "weights"] == [("weights", 1, 0), ("weights", 2, 0), ("weights", 2, 0)]


def test_hooks_every_0_act_at_the_last_iteration_only():
    """`checkpoint.every = 0` (or log / eval every 0): the hook acts at the run's last iteration only."""
    from reval_jax.run.hooks import _due

    assert [i for i in range(1, 7) if _due(i, 0, 6)] == [6]
    assert [i for i in range(1, 7) if _due(i, 4, 6)] == [4, 6]
