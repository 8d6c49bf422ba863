"""A storm of pathological answers: bounded by the scorer's own timeout, no worker left behind, and
the scorer scores normally afterwards.

The bound follows from RewardScorer's semantics (reval_jax/data/rewards.py): every answer gets
TIMEOUT_S from the moment a worker receives it; a worker that overruns is killed and a standby
worker, started during the previous wave, takes its place. With WORKERS workers, N answers that all
hang finish in ceil(N / WORKERS) waves of TIMEOUT_S each, plus a constant: the first wave's
replacements start when it ends (no standby workers exist before the first timeout), and a wave's
kills and swaps take milliseconds (WAVE_SLACK_S, SLACK_S below); a worker
start takes ~0.1-0.8 s from the forkserver, several times less than TIMEOUT_S, which is what lets the
standby workers be ready in time.
"""

import math
import os
import time

import pytest

from reval_jax.data.rewards import RewardScorer

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 2.0
WORKERS = 4
# Not a speed target: the bound catches a stalled round or a worker start on the path of every wave.
# Per wave, WAVE_SLACK_S covers the kills and swaps competing with hung workers for the cores (~0.3 s
# measured at load average ~4); SLACK_S the first wave's cold replacements and a loaded machine.
# Measured: 57.6 s against 25 waves x 2 s on the 2-core machine at load average ~4.
WAVE_SLACK_S = 1.0
SLACK_S = 30.0
# answers that sympy takes far longer than TIMEOUT_S on (towers of powers, huge factorials and
# expansions, a 2,000-term polynomial); all against the ground truth 5
HANGING = [
    "2^{2^{2^{2^{2^{10}}}}}",
    "10^{10^{10^{10}}}",
    "(x+1)^{100000}",
    "1000000!",
    "+".join(f"x^{{{i}}}" for i in range(2000)),
]
STORM = [(f"Long reasoning... so the answer is $\\boxed{{{HANGING[i % len(HANGING)]}}}$.", "5") for i in range(100)]


def descendants() -> set[int]:
    """Pids of this process's live descendants (psutil, or /proc where it is not installed)."""
    try:
        import psutil
    except ImportError:
        return _proc_descendants(os.getpid())
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def _proc_descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")  # started once, live as long as we do


def workers(pids: set[int]) -> set[int]:
    """The pids that are not multiprocessing's own helper processes."""
    return {p for p in pids if not any(h in cmdline(p) for h in HELPERS)}


def test_storm_of_pathological_answers_is_bounded_leaks_nothing_and_scoring_goes_on():
    before = descendants()
    scorer = RewardScorer("math", template="qwen_math", num_workers=WORKERS, timeout_s=TIMEOUT_S)
    try:
        assert scorer.score([("\\boxed{1}", "1")] * WORKERS) == [1.0] * WORKERS  # started
        started = scorer.stats
        t0 = time.monotonic()
        scores = scorer.score(STORM)
        elapsed = time.monotonic() - t0
        bound = (TIMEOUT_S + WAVE_SLACK_S) * math.ceil(len(STORM) / WORKERS) + SLACK_S
        assert elapsed <= bound, f"{len(STORM)} answers took {elapsed:.1f} s > {bound:.1f} s"
        assert scores == [0.0] * len(STORM)
        stats = scorer.stats
        assert stats.scored - started.scored == len(STORM)
        assert stats.timeouts > started.timeouts  # the storm did run into the deadline (kills, replacements)
        assert stats.restarts - started.restarts == stats.timeouts - started.timeouts + stats.errors - started.errors
        print(f"storm of {len(STORM)}: {elapsed:.1f} s (bound {bound:.1f} s), {stats}")
        # no worker accumulates: the live ones are the pool and its standby workers
        live = workers(descendants() - before)
        assert len(live) <= 2 * WORKERS, [cmdline(p) for p in live]
        # and the scorer goes on: normal answers score as before
        assert scorer.score([("So $x = \\boxed{\\frac{\\sqrt{2}}{3}}$.", "\\frac{2\\sqrt{2}}{6}"),
                             ("\\boxed{41}", "42")]) == [1.0, 0.0]
    finally:
        scorer.close()
    left = workers(descendants() - before)
    assert not left, [cmdline(p) for p in left]  # every worker and standby worker is gone
