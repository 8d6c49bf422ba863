"""What attaches to the training loop (reval_jax/run/trainer.py): metrics, evaluation, checkpoints,
progress lines and the stop signals. Each is a `Hook`; they run in the order they were added
(metrics, evaluation, checkpoint, progress), so an evaluation that reaches `eval.stop_at` is
checkpointed in the same iteration.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import numpy as np

from reval_jax.run.config import HookSchedule
from reval_jax.run.trainer import Hook, Trainer

TRAIN_ECHO = ("accuracy", "loss", "delta_abs_max", "kl_mean", "grad_norm", "response_length",
              "generate_s", "update_s", "staleness_max",
              "env_turns_mean", "env_tool_calls", "env_tool_errors", "env_tool_s")  # the env's: multi-turn runs only


def progress_line(iteration: int, total: int, durations: list[float]) -> str:
    """`iteration i/N (3.2s; about 4m10s left)`: the estimate averages the iterations run so far,
    leaving out the first (it compiles) once there are others."""
    steady = durations[1:] or durations
    left = round(float(np.mean(steady)) * (total - iteration))
    eta = f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"
    return f"iteration {iteration}/{total} ({durations[-1]:.1f}s; about {eta} left)"


def _due(iteration: int, every: int, total: int) -> bool:
    """Whether a hook acting every `every` iterations (0: only at the last) acts at `iteration`."""
    return (every > 0 and iteration % every == 0) or iteration == total


class MetricsHook(Hook):
    """The train record every `log_every` iterations (and the last) to the metrics writer."""

    def __init__(self, writer, schedule: HookSchedule, total: int):
        self.writer, self.every, self.total = writer, schedule.log_every, total

    def on_round_end(self, trainer, iteration, metrics):
        if _due(iteration, self.every, self.total):
            self.writer.write("train", iteration, metrics, echo=TRAIN_ECHO)


class EvalHook(Hook):
    """avg@k every `eval_every` iterations (and the last, and before the first of a fresh run);
    asks the loop to stop once it reaches `stop_at` (> 0). `evaluate(params)` returns the results."""

    def __init__(self, evaluate: Callable[[object], dict[str, float]], writer, schedule: HookSchedule, total: int,
                 initial: bool):
        self.evaluate, self.writer, self.schedule, self.total, self.initial = evaluate, writer, schedule, total, initial

    def run(self, trainer: Trainer, iteration: int) -> float:
        start = time.perf_counter()
        results = self.evaluate(trainer.state.params)
        results["eval_s"] = time.perf_counter() - start
        key = f"avg@{self.schedule.eval_k}"
        self.writer.write("eval", iteration, results, echo=(key,))
        return results[key]

    def on_start(self, trainer, first):
        if self.initial:
            print("evaluating the initial policy (the first sampler call compiles: slow)", flush=True)
            self.run(trainer, 0)

    def on_round_end(self, trainer, iteration, metrics):
        if not _due(iteration, self.schedule.eval_every, self.total):
            return
        score, stop_at = self.run(trainer, iteration), self.schedule.stop_at
        if stop_at > 0 and score >= stop_at:
            trainer.request_stop(f"evaluation reached eval.stop_at={stop_at} at iteration {{iteration}}; done")


class CheckpointHook(Hook):
    """The whole experiment every `checkpoint_every` iterations, at the last one and on a stop: the
    train state, the replay buffer, the rounds generated ahead (brought to rest first) and
    `meta()` (data position, verifier counters, config). A failed background write stops the run
    at the top of the next iteration."""

    def __init__(self, ckpt, schedule: HookSchedule, total: int, meta: Callable[[], dict]):
        self.ckpt, self.every, self.total, self.meta = ckpt, schedule.checkpoint_every, total, meta

    def on_round_start(self, trainer, iteration):
        self.ckpt.poll()

    def on_round_end(self, trainer, iteration, metrics):
        if _due(iteration, self.every, self.total) or trainer.stop_reasons:
            trainer.pipeline.quiesce()  # the rounds generated ahead, and the data position after them, at one point
            self.ckpt.save(iteration, trainer.state, {**trainer.buffer.state_dict(), **trainer.pipeline.state_dict()},
                           self.meta())

    def on_end(self, trainer):
        self.ckpt.wait()


class ProgressHook(Hook):
    """`iteration i/N (…s; about … left)` after every iteration; says that the first one compiles."""

    def __init__(self, total: int):
        self.total, self.first, self.t0 = total, 1, 0.0
        self.durations: list[float] = []

    def on_start(self, trainer, first):
        self.first = first

    def on_round_start(self, trainer, iteration):
        self.t0 = time.perf_counter()
        if iteration == self.first:
            print(f"iteration {iteration}/{self.total}: compiling the sampler and the train step "
                  "(the first iteration is slow)", flush=True)

    def on_round_end(self, trainer, iteration, metrics):
        self.durations.append(time.perf_counter() - self.t0)
        print(progress_line(iteration, self.total, self.durations), flush=True)


class StopOnSignal:
    """SIGTERM / SIGINT: finish the iteration, checkpoint, stop (a second SIGINT aborts). A context
    manager: the handlers are installed (main thread only) on entry and the previous ones restored
    on exit."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.received, self.handlers = trainer, [], {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)

    def on_signal(self, signum, _frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received.append(signum)
        print(f"received {signal.Signals(signum).name}: checkpointing after this iteration, then stopping")
        self.trainer.request_stop("stopped after iteration {iteration}; rerun the same command to resume", first=True)
