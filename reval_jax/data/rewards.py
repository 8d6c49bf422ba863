"""Verifiable rewards: is the response's final answer equivalent to the ground truth?

ALGORITHMS.md, "Rewards": r_rule ∈ {0, 1} is 1 when the last ``\\boxed{...}`` of the response is
mathematically equivalent to the ground-truth answer (checked with ``math_verify``), with bounded
time per answer; a crash or a timeout scores 0 and is counted. For the ``r1_distill`` template only
the text after the last ``</think>`` counts, and a response that never closes its thinking scores 0;
likewise for a response that opens a thinking block itself (Qwen3 in thinking mode).

Reward functions have the signature ``fn(response, answer, template) -> float`` and are chosen by
name from ``REWARDS``, or by an importable path ``"package.module:function"``. ``RewardScorer``
runs one of them in a small pool of worker processes started with the ``forkserver`` method (a
fresh interpreter that has imported ``math_verify`` forks each worker; ``spawn`` where there is no
forkserver), never with ``fork`` (the trainer process runs JAX threads, which ``fork`` would copy in
an undefined state). Each answer gets ``timeout_s`` seconds of wall time; a worker that overruns is
killed and replaced by a standby worker started ahead (after the first replacement the pool keeps
``num_workers`` of them), so a hung verifier never stalls the run and a storm of hung answers costs
about ``timeout_s`` per answer and worker, not a worker start on top of each. ``math_verify``'s own
``signal.alarm`` timeouts are switched off: the pool's deadline is the one time limit.

Adding a reward: write ``fn(response, answer, template) -> float`` in an importable module and add
it to ``REWARDS`` (or pass its ``"module:function"`` path as the reward name).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from reval_jax.data.templates import TEMPLATES, THINK_CLOSE, THINK_TAG

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str], float]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if there is none.

    Braces are matched with nesting (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); escaped
    braces ``\\{`` and ``\\}`` do not count. ``\\boxed 5`` (no braces) gives the following word. A
    last box that is never closed (a response cut at the length limit) gives None.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    pos = start + len(command)
    rest = text[pos:].lstrip()
    if not rest.startswith("{"):
        if len(rest) == len(text) - pos:  # "\boxedx" is another command
            return None
        # "\boxed 5": the argument is the next word, up to whitespace or the closing "$".
        word = rest.split(maxsplit=1)
        return (word[0].split("$")[0] or None) if word else None
    pos = len(text) - len(rest)
    depth = 0
    i = pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character ("\{", "\}", "\\")
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
        i += 1
    return None


def final_answer_text(response: str, template: str) -> str | None:
    """The part of the response that holds the final answer: the text after the last ``</think>``
    for ``r1_distill`` (whose prompt opens the thinking block) and for any response that opens one
    itself (a Qwen3 model in thinking mode under ``qwen_math``), None when that block is never
    closed; else all of it."""
    if template == "r1_distill" or THINK_TAG in response:
        cut = response.rfind(THINK_CLOSE)
        if cut < 0:
            return None
        return response[cut + len(THINK_CLOSE) :]
    return response


def _parse(latex: str) -> list[Any]:
    from math_verify import parse

    # parsing_timeout=None: no signal.alarm; the scorer's per-answer deadline bounds the time.
    return parse(f"\\boxed{{{latex}}}", parsing_timeout=None)


def answers_equivalent(predicted: str, answer: str) -> bool:
    """Whether two LaTeX answers are mathematically equivalent (``\\frac{1}{2}`` and ``0.5`` are).

    Runs ``math_verify`` without its signal-based timeouts: call it where the caller bounds the
    time (a ``RewardScorer`` worker), not on untrusted input in the trainer process.
    """
    from math_verify import verify

    gold = _parse(answer)
    if not gold:
        # The gold answer is not parseable LaTeX: fall back to an exact string match.
        return predicted.strip() == answer.strip() != ""
    target = _parse(predicted)
    if not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))


def math_reward(response: str, answer: str, template: str) -> float:
    """r_rule ∈ {0, 1}: 1.0 when the last ``\\boxed{}`` of the final-answer part of ``response``
    (see ``final_answer_text``) is equivalent to the ground-truth ``answer``."""
    text = final_answer_text(response, template)
    if text is None:
        return 0.0
    boxed = extract_boxed(text)
    if boxed is None or not boxed.strip():
        return 0.0
    return 1.0 if answers_equivalent(boxed, answer) else 0.0


REWARDS: dict[str, RewardFn] = {"math": math_reward}


def resolve_reward(name: str) -> RewardFn:
    """The reward function called ``name`` in ``REWARDS``, or at the path ``"module:function"``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load reward function {name!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(
        f"unknown reward {name!r}; valid names: {sorted(REWARDS)} or a 'module:function' path"
    )


def _worker_main(conn: multiprocessing.connection.Connection, name: str, template: str) -> None:
    """Worker process: load the reward, answer ``(index, response, answer)`` requests until the
    pipe closes. Replies are ``(index, score, error)``; ``error`` is None or a traceback string."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice
    try:
        fn = resolve_reward(name)
        fn("\\boxed{1}", "1", "plain")  # warm-up: lazy imports and parser construction
    except Exception:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, ConnectionResetError):  # the trainer closed the pipe, or exited without closing it
            return
        index, response, answer = request
        try:
            reply = (index, float(fn(response, answer, template)), None)
        except Exception:
            reply = (index, 0.0, traceback.format_exc(limit=5))
        try:
            conn.send(reply)
        except (BrokenPipeError, ConnectionResetError):  # nobody to answer: the trainer is gone
            return


def _context() -> Any:
    """The start method of reward workers: ``forkserver`` with ``math_verify`` imported in the server
    (a worker starts in ~0.1 s instead of ~0.6 s with ``spawn``, which is the fallback)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["math_verify"])  # no effect on a server already running; an ImportError is ignored
    return ctx


@dataclasses.dataclass(frozen=True)
class RewardStats:
    """Cumulative counters of a ``RewardScorer``."""

    scored: int  # answers scored, timeouts and errors included
    timeouts: int  # answers that ran past timeout_s (scored 0)
    errors: int  # answers whose reward raised or whose worker died (scored 0)
    restarts: int  # workers replaced after a timeout or a crash


class _Worker:
    """One worker process and the request it is running (``index`` None when idle)."""

    def __init__(self, ctx: Any, name: str, template: str, startup_timeout_s: float):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, name, template), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.index: int | None = None
        self.deadline = time.monotonic() + startup_timeout_s

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardScorer:
    """Scores (response, answer) pairs with a named reward in ``num_workers`` worker processes.

    Every answer has ``timeout_s`` seconds from the moment a worker receives it; past that it scores
    0, is counted in ``stats.timeouts`` and its worker is killed and replaced. An exception in the
    reward or a dead worker scores 0 and is counted in ``stats.errors``. Use as a context manager or
    call ``close()``. Calls from several threads (an asynchronous run's rollout thread and the
    trainer's evaluation) take turns: one call owns the workers at a time.
    """

    def __init__(
        self,
        name: str = "math",
        template: str = "r1_distill",
        num_workers: int = 4,
        timeout_s: float = 10.0,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; valid: {sorted(TEMPLATES)}")
        resolve_reward(name)  # fail fast, in this process, on an unknown name
        self.name = name
        self.template = template
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._ctx = _context()
        self._spares: list[_Worker] = []  # standby workers, started from the first replacement on
        self._scored = self._timeouts = self._errors = self._restarts = 0
        self._lock = threading.Lock()
        self._workers = [self._start_worker() for _ in range(num_workers)]

    @property
    def stats(self) -> RewardStats:
        return RewardStats(self._scored, self._timeouts, self._errors, self._restarts)

    def restore_stats(self, stats: RewardStats) -> None:
        """Continues the counters of a resumed run."""
        self._scored, self._timeouts, self._errors, self._restarts = (
            stats.scored, stats.timeouts, stats.errors, stats.restarts)

    def _start_worker(self) -> _Worker:
        return _Worker(self._ctx, self.name, self.template, self.startup_timeout_s)

    def _replace(self, slot: int) -> None:
        """Kills worker ``slot`` and puts a standby worker in its place: one that has started, if
        any (its "ready" is read by the scoring loop), else the oldest; then tops the standby
        workers up to one per slot, so that a worker start is off the path of the next timeout."""
        self._workers[slot].kill()
        spare = next((w for w in self._spares if w.conn.poll()), None) or (
            self._spares[0] if self._spares else self._start_worker())
        if spare in self._spares:
            self._spares.remove(spare)
        self._workers[slot] = spare
        while len(self._spares) < len(self._workers):
            self._spares.append(self._start_worker())
        self._restarts += 1

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Rewards of ``pairs`` of (response, ground-truth answer), in order."""
        with self._lock:
            return self._score(pairs)

    def _score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        if not self._workers:
            raise RuntimeError("RewardScorer is closed")
        for slot, worker in enumerate(self._workers):
            if worker.index is not None:  # left busy by an interrupted call: its reply is stale
                self._replace(slot)
        scores = [0.0] * len(pairs)
        pending = deque(range(len(pairs)))
        done = 0
        while done < len(pairs):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.index is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((index, *pairs[index]))
                    except OSError:  # the worker died while idle: not this answer's fault
                        pending.appendleft(index)
                        self._replace(slot)
                        continue
                    worker.index = index
                    worker.deadline = now + self.timeout_s
            waiting = [w for w in self._workers if not w.ready or w.index is not None]
            wait_s = max(0.0, min(w.deadline for w in waiting) - now)
            handles = [w.conn for w in waiting] + [w.process.sentinel for w in waiting]
            ready = set(multiprocessing.connection.wait(handles, timeout=wait_s))
            for slot, worker in enumerate(self._workers):
                if worker not in waiting:
                    continue
                if worker.conn in ready or worker.process.sentinel in ready:
                    done += self._receive(slot, scores)
                elif time.monotonic() >= worker.deadline:
                    done += self._expire(slot, scores)
        self._scored += len(pairs)
        return scores

    def _receive(self, slot: int, scores: list[float]) -> int:
        """Handles a reply or the death of worker ``slot``; returns how many answers finished."""
        worker = self._workers[slot]
        try:
            message = worker.conn.recv() if worker.conn.poll() else None
        except Exception:  # EOF, or a reply cut short by the worker's death
            message = None
        if message is None:  # the process died without replying
            if not worker.ready:
                worker.process.join()
                code = worker.process.exitcode
                self.close()
                raise RuntimeError(
                    f"reward worker for {self.name!r} died while starting (exit code {code}); its "
                    "traceback is on stderr. Spawned workers re-import the __main__ module: "
                    "guard the entry point with `if __name__ == '__main__':`"
                )
            index = worker.index
            logger.warning("reward worker died while scoring answer %d; scored 0", index)
            self._errors += 1
            self._replace(slot)
            return 1
        if message[0] == "init_error":
            self.close()
            raise RuntimeError(f"reward worker for {self.name!r} failed to start:\n{message[1]}")
        if message[0] == "ready":
            worker.ready = True
            return 0
        index, value, error = message
        if error is not None:
            logger.warning("reward raised on answer %d; scored 0:\n%s", index, error)
            self._errors += 1
        scores[index] = value
        worker.index = None
        return 1

    def _expire(self, slot: int, scores: list[float]) -> int:
        """Worker ``slot`` ran past its deadline: kill it, score its answer 0, start another."""
        worker = self._workers[slot]
        if not worker.ready:
            self.close()
            raise RuntimeError(
                f"reward worker for {self.name!r} did not start in {self.startup_timeout_s} s"
            )
        logger.warning("reward timed out after %.1f s on answer %d", self.timeout_s, worker.index)
        scores[worker.index] = 0.0
        self._timeouts += 1
        self._replace(slot)
        return 1

    def close(self) -> None:
        """Stops the workers (a later ``score`` raises). Idempotent."""
        for worker in self._workers + self._spares:
            worker.kill()  # workers hold nothing that needs a clean exit
        self._workers, self._spares = [], []

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
