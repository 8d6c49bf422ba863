"""Algorithm 1: the training loop, with everything it uses built before it (reval_jax/run/train.py).

    trainer = Trainer(loop_cfg, state, learner, buffer, pipeline, clock, reward_stats)
    trainer.add_hook(MetricsHook(...)); ...       # reval_jax/run/hooks.py
    last_metrics = trainer.train(first_iteration)

Each iteration takes round i from the pipeline (generated now, or ahead under an older policy),
fills its reference terms (when they are stored), adds it to the replay buffer and runs K updates:
the fresh round first (on_policy_first) or buffer draws, the reference reset to the policy every R
updates (the buffer flushed, or its stale reference terms recomputed when drawn), the new weights
handed to the pipeline after each. Then the hooks log, evaluate, checkpoint and may ask to stop.
The trainer owns the state: nothing else rebinds it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from reval_jax.data.batch import Trajectories
from reval_jax.data.replay import ReplayBuffer
from reval_jax.objective.losses import LossNorm
from reval_jax.objective.packing import Budget, pack
from reval_jax.objective.train_step import reference
from reval_jax.run.config import Advantages, LoopConfig
from reval_jax.run.pipeline import Clock, Pipeline, Round


class Diverged(RuntimeError):
    """Too many updates in a row were non-finite (config.max_skipped_in_a_row)."""


def staleness_of(batch: Trajectories, version: int) -> np.ndarray:
    """[B] updates between the oldest policy a trajectory's response was sampled under and
    `version`, the policy it is trained at (0 for a trajectory without recorded versions)."""
    v = np.asarray(batch.sampler_version)
    none = np.iinfo(np.int32).max
    oldest = np.where(np.asarray(batch.response_mask) & (v >= 0), v, none).min(1)
    return np.where(oldest == none, 0, version - oldest).astype(np.int64)


class Learner:
    """The objective's side of the loop: a batch packed by the token budget, then the reference
    pass or one update (reval_jax.objective.train_step.Updater)."""

    def __init__(self, updater, budget: Budget, max_response_length: int | None, advantages: Advantages):
        self.updater, self.budget = updater, budget
        self.max_response_length, self.advantages = max_response_length, advantages

    def fill_reference(self, batch: Trajectories, state) -> Trajectories:
        """Reference terms under the state's reference, packed by the token budget like the update."""
        micro, layout = pack(batch, self.budget)
        logps, vs = self.updater.reference(reference(state), micro)
        return batch.replace(ref_logp=layout.unpack_tokens(logps), ref_v=layout.gather(vs).astype(np.float32),
                             ref_version=np.full(batch.batch_size, int(state.ref_version), np.int32))

    def update(self, state, batch: Trajectories, weights: np.ndarray):
        """(new state, metrics) of one update on `batch` with per-trajectory `weights`."""
        micro, layout = pack(batch, self.budget, weights=weights, advantages=self.advantages(batch))
        norm = LossNorm.for_batch(batch, self.max_response_length)
        return self.updater.update(state, micro, layout, norm)

    def reset(self, state):
        """(state with π_ref ← π_θ, metrics of the reset: a LoRA merge's lora/merge_* or none)."""
        return self.updater.reset(state)


class Hook:
    """Something attached to the loop; every method is optional (the defaults do nothing)."""

    def on_start(self, trainer: Trainer, first: int) -> None:
        """Before the pipeline starts and the first iteration (`first`) runs."""

    def on_round_start(self, trainer: Trainer, iteration: int) -> None:
        """At the top of an iteration, before its round is taken."""

    def on_round_end(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
        """After the K updates, with the iteration's train metrics (hooks run in the order added)."""

    def on_end(self, trainer: Trainer) -> None:
        """After the loop ended without an error (the last iteration, or a stop)."""


@dataclasses.dataclass
class Update:
    metrics: dict[str, float]  # the scalars of one update
    staleness: np.ndarray  # [B] of its batch
    reset: dict[str, float] = dataclasses.field(default_factory=dict)  # a reset after it: a LoRA merge's figures


class Trainer:
    """Algorithm 1 over a pipeline of rounds, a replay buffer and a learner (module docstring)."""

    def __init__(self, cfg: LoopConfig, state, learner: Learner, buffer: ReplayBuffer, pipeline: Pipeline,
                 clock: Clock, reward_stats: Callable[[], object]):
        self.cfg, self.state, self.learner, self.buffer = cfg, state, learner, buffer
        self.pipeline, self.clock, self.reward_stats = pipeline, clock, reward_stats
        self.hooks: list[Hook] = []
        self.stop_reasons: list[str] = []  # what asked the loop to stop after this iteration ({iteration} filled in)

    def add_hook(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def request_stop(self, reason: str, *, first: bool = False) -> None:
        """Stops the loop after the current iteration (checkpointed); `reason` is printed then."""
        self.stop_reasons.insert(0, reason) if first else self.stop_reasons.append(reason)

    def train(self, first: int) -> dict[str, float]:
        """Iterations `first` .. num_iterations (fewer on a stop); the last one's train metrics."""
        last: dict[str, float] = {}
        for hook in self.hooks:
            hook.on_start(self, first)
        if first <= self.cfg.num_iterations:
            self.pipeline.start(self.state, first)  # async: generates (or starts generating) the rounds due now
        window = time.perf_counter()
        for iteration in range(first, self.cfg.num_iterations + 1):
            for hook in self.hooks:
                hook.on_round_start(self, iteration)
            rnd = self.pipeline.take(iteration, self.state)
            staleness = staleness_of(rnd.batch, int(self.state.step))
            batch = self.learner.fill_reference(rnd.batch, self.state) if self.cfg.stores_reference else rnd.batch
            slots = self.buffer.add(batch)
            t0 = time.perf_counter()
            updates = [self.update(k, iteration, batch, slots) for k in range(self.cfg.updates_per_round)]
            last = self.round_metrics(iteration, rnd, staleness, updates, time.perf_counter() - t0, window)
            window = time.perf_counter()
            for hook in self.hooks:
                hook.on_round_end(self, iteration, last)
            if self.stop_reasons:
                print(self.stop_reasons[0].format(iteration=iteration))
                break
        for hook in self.hooks:
            hook.on_end(self)
        return last

    def update(self, k: int, iteration: int, batch: Trajectories, slots: np.ndarray) -> Update:
        """Update k of the round: the fresh round (k = 0, on_policy_first; its buffer `slots` take their
        |δ| as priorities with fresh_priority_from_delta) or a buffer draw; then the reference reset
        every R updates, and the new weights to the pipeline."""
        cfg, buffer = self.cfg, self.buffer
        if k == 0 and cfg.on_policy_first:
            indices = slots if cfg.fresh_priority_from_delta else None
            train_batch, weights = batch, np.ones(cfg.update_batch, np.float32)
        else:
            sample = buffer.sample(cfg.update_batch, iteration=iteration,
                                   ref_version=int(self.state.ref_version) if cfg.stores_reference else None,
                                   recompute_fn=self._recompute if cfg.stores_reference else None)
            train_batch, weights, indices = sample.batch, sample.weights, sample.indices
        staleness = staleness_of(train_batch, int(self.state.step))
        with self.clock.busy("train"):
            self.state, m = self.learner.update(self.state, train_batch, weights)
        if indices is not None and cfg.prioritized:
            buffer.update_priorities(indices, m["abs_delta"])
        if (skipped := int(self.state.skipped_in_a_row)) >= cfg.max_skipped_in_a_row:
            raise Diverged(f"stopping at iteration {iteration}: {skipped} updates in a row had a non-finite loss or "
                           f"gradient (config.max_skipped_in_a_row={cfg.max_skipped_in_a_row}).")
        reset: dict[str, float] = {}
        if cfg.reset_every and int(self.state.step) % cfg.reset_every == 0 and not m["skipped"]:
            self.state, reset = self.learner.reset(self.state)
            if cfg.flush_on_reset:
                buffer.flush()
        self.pipeline.update_params(self.state)  # async: rounds whose weights have come are generated / pushed
        return Update({k: v for k, v in m.items() if np.ndim(v) == 0}, staleness, reset)

    def _recompute(self, stale: Trajectories) -> tuple[np.ndarray, np.ndarray]:
        """Reference terms of buffer entries stored under an older reference, under the current one."""
        filled = self.learner.fill_reference(stale, self.state)
        return filled.ref_logp, filled.ref_v

    def round_metrics(self, iteration: int, rnd: Round, staleness: np.ndarray, updates: list[Update],
                      update_s: float, window: float) -> dict[str, float]:
        """The iteration's train record: the updates' means, the round's figures, the bookkeeping."""
        batch, state = rnd.batch, self.state
        raw, reward = np.asarray(batch.raw_reward), np.asarray(batch.reward)
        lengths = np.asarray(batch.response_mask).sum(1)
        update_staleness = np.concatenate([u.staleness for u in updates])
        stats = self.reward_stats()
        last = {k: float(np.mean([u.metrics[k] for u in updates])) for k in updates[0].metrics}
        for u in updates:  # the largest change any merge of the round made (LoRA)
            last.update({k: max(v, last.get(k, v)) for k, v in u.reset.items()})
        last.update(
            reward_mean=float(np.mean(reward)), accuracy=float(np.mean(raw)),
            response_length=float(np.mean(lengths)), truncation_rate=float(np.mean(rnd.truncated)),
            generate_s=rnd.generate_s, update_s=update_s,
            generate_tokens_per_s=float(lengths.sum()) / max(rnd.generate_s, 1e-9),
            updates=int(state.step), skipped_total=int(state.skipped), ref_version=int(state.ref_version),
            verifier_timeouts=stats.timeouts, verifier_errors=stats.errors,
            staleness_mean=float(staleness.mean()), staleness_max=float(staleness.max()),
            update_staleness_mean=float(np.mean(update_staleness)),
            update_staleness_max=float(np.max(update_staleness)),
            rounds_ahead=len(self.pipeline.queue),
            **{f"buffer_{k}": v for k, v in self.buffer.stats().items()},
            **rnd.info,
            **self.clock.window(window, time.perf_counter()),
        )
        last["iteration"] = iteration
        return last
