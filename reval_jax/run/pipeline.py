"""Generation and training, in turn (sync) or overlapped with bounded staleness (async).

ReVal's loss needs no importance ratio: a trajectory sampled by an older policy is training data as
it is. In async mode the rollout side therefore runs ahead of the trainer, as far as
`pipeline.max_staleness` allows, instead of waiting for every round's updates.

Versions. The policy version is the trainer's update count (`state.step`). Round i (the i-th batch
of prompts) starts training at version (i−1)·K, K = replay.updates_per_iteration. Its staleness is
that version minus the version its tokens were sampled under (`Trajectories.sampler_version`, per
token). The replay buffer's reuse of older rounds is the method's, as in sync mode, and is reported
separately (buffer_sample_age_*); `max_staleness` bounds how far generation runs ahead.

    sync     round i is generated at the top of iteration i from version (i−1)·K (staleness 0).
    async    round i is generated from version
                 w_i = ⌈max(0, (i−1)·K − max_staleness) / s⌉ · s      (s = sync_every)
             the oldest weights the bound allows, pushed every s updates, so generation overlaps
             as many updates as it may. max_staleness = 0 (with s dividing K) is sync's schedule.

Where async runs (`pipeline.rollout_devices`):
  0   time-sliced: one process alternates on all devices; round i is generated right after
      update w_i. Deterministic: the same config gives the same run, and resume is exact.
  n   two groups: the first n devices generate (the rollout layout on them), the others train
      (config.mesh over them). A rollout thread generates round after round while the trainer
      updates; the trainer pushes its weights to the rollout group (cast and resharded with
      jax.device_put, chunked, reval_jax.rollout.layout).
        pickup = "round": each round is sampled under exactly w_i, so the run is the
                 time-sliced one (up to the rounding of a different mesh);
        pickup = "step":  a round starts under the newest push that meets the bound, and rows in
                 flight pick up newer pushes between decode calls (every `pickup_steps` tokens),
                 continuing under them (in_flight = "continue") or finishing under the old weights
                 first (in_flight = "finish"): lower staleness, timing-dependent, every token's
                 version recorded.
      On several processes (a TPU pod, a multi-node GPU cluster) n is split evenly: the first n / P
      devices of every process form that process's own rollout group, which generates its share of
      each round's prompts with no communication while it decodes; the others, of every process,
      form the training mesh. A push gathers the weights onto the training devices (a collective,
      in the trainer's thread) and puts each process's copy onto its rollout group; the trainers
      put the shares of a round together when they take it (or before a checkpoint).

Checkpoints hold the rounds generated but not yet trained (`state_dict`) and the data position
after them; before a save the rollout side is brought to rest at its staleness bound (`quiesce`),
so that what is saved is one consistent point of the schedule. A failure of the rollout thread is
raised in the trainer, naming the round, instead of leaving it waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np

from reval_jax.data.batch import FIELD_DTYPES, Trajectories
from reval_jax.rollout.layout import Pending
from reval_jax.run.config import PipelineConfig

PUSHES_WAITING = 2  # weight copies waiting for the rollout group (round pickup) before the trainer waits


def device_groups(cfg: PipelineConfig) -> tuple[list[jax.Device], list[jax.Device]]:
    """(this process's rollout devices, the training devices of every process).

    Two groups: the first `rollout_devices / processes` devices of each process generate (a
    rollout group of its own per process, with no communication while it decodes); the others, of
    every process, form the training mesh. Otherwise: no rollout group, every device trains."""
    devices = jax.devices()
    if not cfg.two_groups:
        return [], devices
    per = cfg.rollout_devices // jax.process_count()
    owned = {p: [d for d in devices if d.process_index == p] for p in range(jax.process_count())}
    rollout = {d for ds in owned.values() for d in ds[:per]}
    return owned[jax.process_index()][:per], [d for d in devices if d not in rollout]


def round_version(iteration: int, updates_per_round: int, cfg: PipelineConfig) -> int:
    """The policy version round `iteration` (1-based) is generated from: w_i (module docstring)."""
    if cfg.mode == "sync":
        return (iteration - 1) * updates_per_round
    earliest = max(0, (iteration - 1) * updates_per_round - cfg.max_staleness)
    return -(-earliest // cfg.sync_every) * cfg.sync_every


@dataclasses.dataclass
class Round:
    """One round's rollouts, scored (rewards set, reference terms not yet), waiting to be trained."""

    iteration: int
    batch: Trajectories  # [R, T] host arrays
    truncated: np.ndarray  # [R] bool
    generate_s: float  # wall seconds the rollout side spent on it
    local: bool = False  # this process's share of the round only (two groups on several processes)
    info: dict[str, float] = dataclasses.field(default_factory=dict)  # the producer's figures (dynamic sampling)


# ----------------------------------------------------------------------------- timing


class Clock:
    """Busy intervals of each side (generate, train) and their waits, for per-iteration fractions.

    An interval counts from its start, while it is still open: a round generated across two
    iterations is busy time in both, each for its own part."""

    KINDS = ("generate", "train", "generate_wait", "train_wait")

    def __init__(self):
        self._lock = threading.Lock()
        self.intervals: dict[str, list[list[float | None]]] = {k: [] for k in self.KINDS}  # [start, end | None]

    @contextlib.contextmanager
    def busy(self, what: str):
        span = [time.perf_counter(), None]
        with self._lock:
            self.intervals[what].append(span)
        try:
            yield
        finally:
            with self._lock:
                span[1] = time.perf_counter()

    def window(self, start: float, end: float) -> dict[str, float]:
        """Busy fractions and wait seconds of each side over [start, end], and its length; forgets
        what ended before `end`."""
        out = {}
        with self._lock:
            for what, spans in self.intervals.items():
                out[what] = sum(max(0.0, (end if b is None else min(b, end)) - max(a, start)) for a, b in spans)
                self.intervals[what] = [x for x in spans if x[1] is None or x[1] > end]
        span = max(end - start, 1e-9)
        return {"rollout_busy": out["generate"] / span, "train_busy": out["train"] / span,
                "rollout_wait_s": out["generate_wait"], "train_wait_s": out["train_wait"], "iteration_s": span}


# ----------------------------------------------------------------------------- the three ways to run


Gather = Callable[[Round], Round]  # every process's share of a round -> the whole round (a collective)
Snapshot = Callable[[object], object]  # snapshot(state) -> the rollout side's model of the policy


class RolloutWeights(Protocol):
    """The policy a round is generated with, as the producer sees it: `current()` is (version,
    model in the rollout layout); with `picks_up`, `newer()` is asked between decode calls for a
    newer push ((version, model) or None) and `current()` then answers the newest taken so far."""

    picks_up: bool

    def current(self) -> tuple[int, object]: ...

    def newer(self) -> tuple[int, object] | None: ...


@dataclasses.dataclass
class FixedWeights:
    """One version for the whole round (sync, time-sliced, two groups with round pickup)."""

    version: int
    model: object
    picks_up = False

    def current(self) -> tuple[int, object]:
        return self.version, self.model

    def newer(self) -> None:
        return None


class RoundProducer(Protocol):
    """Makes round `iteration` (prompts -> engine -> rewards -> Trajectories) with `weights`."""

    def produce(self, iteration: int, weights: RolloutWeights) -> Round: ...


class Pipeline:
    """What the training loop calls; each way to run (Sync, TimeSliced, TwoGroups) decides when
    rounds are generated and defines `take(iteration, state) -> Round`, the round to train now.

        pipe.start(state, first_iteration)   # before the loop (after a resume: the queue restored)
        pipe.take(i, state)                  # round i, to train now
        pipe.update_params(state)            # after every update: the new weights
        pipe.quiesce(); pipe.state_dict()    # before a checkpoint
        pipe.close()                         # on every exit"""

    def __init__(self, cfg: PipelineConfig, updates_per_round: int, num_iterations: int, producer: RoundProducer,
                 snapshot: Snapshot, clock: Clock):
        self.cfg, self.K, self.num_iterations = cfg, updates_per_round, num_iterations
        self.producer, self.snapshot, self.clock = producer, snapshot, clock
        self.queue: dict[int, Round] = {}  # rounds generated, not yet taken
        self.next = 1  # the next round to generate

    def version_of(self, iteration: int) -> int:
        return round_version(iteration, self.K, self.cfg)

    def start(self, state, next_iteration: int) -> None:
        """Before the first iteration (after a resume: the queue restored, `next_iteration` the first to train)."""
        self.next = max([next_iteration, *(i + 1 for i in self.queue)])

    def update_params(self, state) -> None:
        """After every update: `state` holds the trainer's new weights."""

    def quiesce(self) -> None:
        """Before a checkpoint: the rollout side at rest, its queue and data position consistent."""

    def close(self) -> None:
        """At the end of the run (also after an error): nothing to release unless a thread runs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- checkpoints: the rounds waiting to be trained, as flat numpy arrays
    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.queue:  # nothing ahead (sync runs): the checkpoint holds the replay buffer only
            return {}
        out = {"pipeline/rounds": np.asarray(sorted(self.queue), np.int64)}
        for i in sorted(self.queue):
            r = self.queue[i]
            for name, a in r.batch.to_numpy().items():
                out[f"pipeline/{i}/{name}"] = a
            out[f"pipeline/{i}/truncated"] = np.asarray(r.truncated, bool)
            out[f"pipeline/{i}/generate_s"] = np.asarray(r.generate_s, np.float64)
            for name, v in r.info.items():  # only rounds of dynamic sampling have any
                out[f"pipeline/{i}/info/{name}"] = np.asarray(v, np.float64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.queue = {}
        for i in np.asarray(state.get("pipeline/rounds", np.zeros(0, np.int64))).tolist():
            batch = Trajectories.from_numpy({k: state[f"pipeline/{i}/{k}"] for k in FIELD_DTYPES
                                             if f"pipeline/{i}/{k}" in state})
            prefix = f"pipeline/{i}/info/"
            info = {k[len(prefix):]: float(v) for k, v in state.items() if k.startswith(prefix)}
            self.queue[int(i)] = Round(int(i), batch, np.asarray(state[f"pipeline/{i}/truncated"]),
                                       float(state[f"pipeline/{i}/generate_s"]), info=info)


class Sync(Pipeline):
    """Generate round i from the current policy, then train it: the loop without overlap."""

    def take(self, iteration, state):
        t0 = time.perf_counter()
        with self.clock.busy("generate"):
            weights = FixedWeights(int(state.step), self.snapshot(state))
            r = self.producer.produce(iteration, weights)
            del weights  # the rollout copy lives for this round only (before the updates)
        return dataclasses.replace(r, generate_s=time.perf_counter() - t0)


class TimeSliced(Pipeline):
    """Async on one set of devices: round i is generated right after update w_i."""

    def start(self, state, next_iteration):
        super().start(state, next_iteration)
        self.update_params(state)

    def update_params(self, state):
        version, weights = int(state.step), None
        while self.next <= self.num_iterations and self.version_of(self.next) <= version:
            with self.clock.busy("generate"):
                if weights is None:  # one rollout copy for the rounds due at this version
                    weights = FixedWeights(version, self.snapshot(state))
                self.queue[self.next] = self.producer.produce(self.next, weights)
            self.next += 1

    def take(self, iteration, state):
        if iteration not in self.queue:
            raise RuntimeError(f"round {iteration} was not generated (queue {sorted(self.queue)}): a schedule bug")
        return self.queue.pop(iteration)


class RolloutFailed(RuntimeError):
    """The rollout thread of a two-group run raised; the message names the round."""


def _built(entry: tuple[int, object] | None) -> tuple[int, object] | None:
    """A pushed (version, model), the model built first when the push is its builder (a LoRA push:
    rollout.layout.AdapterPush, merged on the rollout devices when taken; JAX dispatches the merge
    asynchronously, so building under the pipeline's lock does not hold it for the computation)."""
    if entry is None or not isinstance(entry[1], Pending):
        return entry
    return entry[0], entry[1].build()


class Mailbox:
    """Weights the trainer pushed to the rollout group (two groups) and the ones it generates with.

    Guarded by the pipeline's condition variable `cv`: the methods named `*_locked` expect it held;
    `current` and `newer` (the `RolloutWeights` the producer sees) take it."""

    def __init__(self, cv: threading.Condition, step_pickup: bool):
        self.cv, self.picks_up = cv, step_pickup
        self.pushed: deque[tuple[int, object]] = deque()  # (version, rollout model) pushed, not taken
        self.in_use: tuple[int, object] | None = None

    def available_locked(self, needed: int) -> bool:
        have = self.in_use[0] if self.in_use is not None else -1
        return have >= needed or any(v >= needed for v, _ in self.pushed)

    def put_locked(self, version: int, model) -> None:
        if self.picks_up:
            self.pushed.clear()  # only the newest push matters
        self.pushed.append((version, model))

    def take_locked(self, needed: int) -> tuple[int, object]:
        """The model to start a round with: the oldest push >= `needed` (round), the newest (step)."""
        if self.picks_up and self.pushed:
            self.in_use = self.pushed.pop()
            self.pushed.clear()
        while (self.in_use is None or self.in_use[0] < needed) and self.pushed:
            self.in_use = self.pushed.popleft()
        self.in_use = _built(self.in_use)
        return self.in_use

    def current(self) -> tuple[int, object]:
        with self.cv:
            return self.in_use

    def newer(self) -> tuple[int, object] | None:
        """Between decode calls (step pickup): a push newer than the weights in use, if any."""
        with self.cv:
            if not self.pushed or self.pushed[-1][0] <= self.in_use[0]:
                return None
            self.in_use = _built(self.pushed.pop())
            self.pushed.clear()
            self.cv.notify_all()
            return self.in_use

    def clear(self) -> None:
        self.pushed.clear()
        self.in_use = None


class TwoGroups(Pipeline):
    """Async on two device groups: a rollout thread generates while the trainer updates."""

    def __init__(self, *args, gather: Gather | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # several processes: each rollout thread makes its process's share of a round; the trainers
        # put the shares together (`gather`, a collective on the training devices), always in the
        # trainer's thread and in the same order on every process (take, quiesce)
        self.gather = gather
        self._cv = threading.Condition()
        self.mailbox = Mailbox(self._cv, step_pickup=self.cfg.pickup == "step")
        self._pushed = -1  # newest version pushed
        self._waiting_for: int | None = None  # version the rollout thread waits for (None: busy)
        self._error: tuple[int, BaseException] | None = None
        self._stop = False
        self._done = False
        self._thread: threading.Thread | None = None

    # --- the trainer's side
    def start(self, state, next_iteration):
        super().start(state, next_iteration)
        self._push(state, force=True)
        self._thread = threading.Thread(target=self._run, name="reval-rollout", daemon=True)
        self._thread.start()

    def _needed(self, version: int) -> bool:
        """Whether the rollout side will generate from this version (round pickup), or takes every
        s-th (step pickup)."""
        if self.cfg.pickup == "step":
            return version % self.cfg.sync_every == 0
        return any(self.version_of(j) == version for j in range(1, self.num_iterations + 1))

    def _push(self, state, force=False):
        version = int(state.step)
        if version <= self._pushed or not (force or self._needed(version)):
            return
        with self.clock.busy("train_wait"), self._cv:  # at most PUSHES_WAITING copies wait for the rollout group
            while self.cfg.pickup == "round" and len(self.mailbox.pushed) >= PUSHES_WAITING and not self._failed():
                self._cv.wait(1.0)
            self._raise_if_failed()
        model = self.snapshot(state)  # on the rollout group's devices: the trainer's state is not shared
        with self._cv:
            self.mailbox.put_locked(version, model)
            self._pushed = version
            self._cv.notify_all()

    def update_params(self, state):
        self._push(state)

    def take(self, iteration, state):
        with self.clock.busy("train_wait"), self._cv:
            while iteration not in self.queue and not self._failed():
                if self._done:
                    raise RuntimeError(f"the rollout thread ended without round {iteration}")
                self._cv.wait(1.0)
            self._raise_if_failed()
            r = self.queue.pop(iteration)
            self._cv.notify_all()
        return self.gather(r) if r.local else r

    def quiesce(self):
        with self._cv:
            while not (self._done or self._failed() or (self._waiting_for is not None
                                                        and not self.mailbox.available_locked(self._waiting_for))):
                self._cv.wait(1.0)
            self._raise_if_failed()
            shares = sorted(i for i, r in self.queue.items() if r.local)
        # the rollout thread rests at the bound, which every process reaches at the same round: the
        # same shares are waiting everywhere; put together, the checkpoint holds whole rounds
        for i in shares:
            whole = self.gather(self.queue[i])
            with self._cv:
                self.queue[i] = whole

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.mailbox.clear()

    def _failed(self) -> bool:
        return self._error is not None or (self._thread is not None and not self._thread.is_alive() and not self._done)

    def _raise_if_failed(self):
        if self._error is not None:
            iteration, e = self._error
            raise RolloutFailed(f"the rollout group failed while generating round {iteration}: "
                                f"{type(e).__name__}: {e}") from e
        if self._failed():
            raise RolloutFailed("the rollout thread died without reporting an error")

    # --- the rollout thread
    def _acquire(self, needed: int) -> bool:
        """Waits until weights >= `needed` were pushed and takes them into use; False when stopped."""
        with self.clock.busy("generate_wait"), self._cv:
            self._waiting_for = needed
            self._cv.notify_all()
            while not self._stop and not self.mailbox.available_locked(needed):
                self._cv.wait(1.0)
            self._waiting_for = None
            if self._stop:
                return False
            self.mailbox.take_locked(needed)
            self._cv.notify_all()
        return True

    def _weights(self) -> RolloutWeights:
        """Step pickup: the mailbox (newer pushes reach the rows in flight); round pickup: the
        weights taken for the round, fixed."""
        return self.mailbox if self.mailbox.picks_up else FixedWeights(*self.mailbox.current())

    def _run(self):
        iteration = self.next
        try:
            while iteration <= self.num_iterations:
                if not self._acquire(self.version_of(iteration)):
                    return
                with self.clock.busy("generate"):
                    r = self.producer.produce(iteration, self._weights())
                with self._cv:
                    self.queue[iteration] = r
                    self.next = iteration + 1
                    self._cv.notify_all()
                iteration += 1
        except BaseException as e:  # noqa: BLE001 — reported to the trainer by take / quiesce / push
            with self._cv:
                self._error = (iteration, e)
                self._cv.notify_all()
            return
        with self._cv:
            self._done = True
            self._cv.notify_all()


def make_pipeline(cfg: PipelineConfig, updates_per_round: int, num_iterations: int, producer: RoundProducer,
                  snapshot: Snapshot, clock: Clock, gather: Gather | None = None) -> Pipeline:
    """`gather` puts the processes' shares of a round together (two groups on several processes)."""
    if cfg.two_groups:
        return TwoGroups(cfg, updates_per_round, num_iterations, producer, snapshot, clock, gather=gather)
    kind = Sync if cfg.mode == "sync" else TimeSliced
    return kind(cfg, updates_per_round, num_iterations, producer, snapshot, clock)
