"""Verifiable math reward: answer extraction, equivalence, and the time-bounded worker pool."""

import os
import time

import pytest

from reval_jax.data.rewards import (
    REWARDS,
    RewardScorer,
    extract_boxed,
    math_reward,
    resolve_reward,
)

# Deadlines of the pools below. A real case takes at most ~50 ms in a started worker (the first
# \frac, idle): TIMEOUT_S is ~200 times that, so that no real case times out on a loaded machine,
# while the hang test pays it twice. The other pools never time out (nothing in them hangs), and a
# worker that takes STARTUP_S to start (imports and a warm-up) is broken, not slow.
TIMEOUT_S = 10.0
NO_TIMEOUT_S = 600.0
STARTUP_S = 600.0
NUM_WORKERS = 2

# one pytest-xdist worker runs this file: its tests share module fixtures (runs, a worker pool)
pytestmark = pytest.mark.xdist_group("test_rewards")



def faulty_reward(response: str, answer: str, template: str) -> float:
    """``math_reward``, except for test hooks: responses that hang, raise, kill the worker, answer
    with the worker's pid, wait for the file named by the answer, or create it."""
    if response == "HANG":
        time.sleep(300)
    if response == "RAISE":
        raise RuntimeError("reward failed")
    if response == "CRASH":
        os._exit(3)
    if response == "PID":
        return float(os.getpid())
    if response == "WAIT":
        while not os.path.exists(answer):
            time.sleep(0.01)
        return 1.0
    if response == "TOUCH":
        open(answer, "w").close()
        return 1.0
    return math_reward(response, answer, template)


def broken_at_start(response: str, answer: str, template: str) -> float:
    raise RuntimeError("cannot score anything")


FAULTY = f"{__name__}:faulty_reward"


def pool(timeout_s: float) -> RewardScorer:
    return RewardScorer(FAULTY, template="r1_distill", num_workers=NUM_WORKERS, timeout_s=timeout_s,
                        startup_timeout_s=STARTUP_S)


@pytest.fixture(scope="module")
def scorer():
    with pool(NO_TIMEOUT_S) as s:
        yield s


def ready_worker_pids(scorer: RewardScorer) -> set[int]:
    """The pids of the scorer's workers, once all are started and idle: rounds of one PID request
    per worker until a round is answered by every worker (one still starting takes none). It waits
    on the workers, not on a clock (STARTUP_S is the hang guard); the first requests of the next
    call then go one to each worker."""
    deadline = time.monotonic() + STARTUP_S
    while len(pids := {int(p) for p in scorer.score([("PID", "")] * NUM_WORKERS)}) < NUM_WORKERS:
        assert time.monotonic() < deadline, f"only workers {pids} take requests"
        time.sleep(0.05)  # pacing while a worker starts
    return pids


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is \\boxed{204}.", "204"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2} and finally \\boxed{x^{2}}", "x^{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("so $\\boxed 5$", "5"),
        ("\\fbox{3}", "3"),
        ("\\boxed{}", ""),
        ("no box here: 12", None),
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", None),
        ("\\boxed", None),
        ("\\boxed{3} \\boxedx", None),
        ("\\boxed $", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "response, answer, template, expected",
    [
        ("so \\boxed{0.5}", "\\frac{1}{2}", "qwen_math", 1.0),
        ("so \\boxed{\\frac{1}{2}}", "0.5", "qwen_math", 1.0),
        ("\\boxed{204}", "204", "qwen_math", 1.0),
        ("\\boxed{205}", "204", "qwen_math", 0.0),
        ("the answer is 204", "204", "qwen_math", 0.0),  # no \boxed: 0
        ("\\boxed{}", "204", "qwen_math", 0.0),
        ("first \\boxed{7}, no: \\boxed{204}", "204", "qwen_math", 1.0),  # the last box counts
        ("first \\boxed{204}, no: \\boxed{7}", "204", "qwen_math", 0.0),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\pi/2)", "plain", 1.0),
        ("\\boxed{x^2+1}", "1 + x^2", "plain", 1.0),
        ("\\boxed{\\text{(C)}}", "C", "plain", 1.0),
        ("<think>it is \\boxed{204}</think> The answer is 204.", "204", "r1_distill", 0.0),
        ("<think>hmm \\boxed{7}</think> so \\boxed{204}", "204", "r1_distill", 1.0),
        ("<think>a</think> \\boxed{1} <think>b</think> \\boxed{204}", "204", "r1_distill", 1.0),
        ("<think>a</think> \\boxed{204} <think>b</think> none", "204", "r1_distill", 0.0),
        ("<think>\\boxed{204} never closed", "204", "r1_distill", 0.0),
        ("\\boxed{204}", "204", "r1_distill", 0.0),  # no </think> at all
        # a model that opens its own thinking block (Qwen3 in thinking mode) under qwen_math
        ("<think>\nmaybe \\boxed{204}\n</think>\n\nSo \\boxed{7}", "204", "qwen_math", 0.0),
        ("<think>\nit is \\boxed{204}\n</think>\n\nThe answer is 204.", "204", "qwen_math", 0.0),
        ("<think>\nmaybe \\boxed{7}\n</think>\n\nSo \\boxed{204}", "204", "qwen_math", 1.0),
        ("<think>\n\\boxed{204} never closed", "204", "qwen_math", 0.0),
    ],
)
def test_math_reward(response, answer, template, expected):
    assert math_reward(response, answer, template) == expected


def test_reward_registry():
    assert REWARDS["math"] is math_reward
    assert resolve_reward("math") is math_reward
    assert resolve_reward(FAULTY) is faulty_reward
    with pytest.raises(ValueError, match=r"unknown reward 'maths'.*\['math'\]"):
        resolve_reward("maths")
    with pytest.raises(ValueError, match="cannot load reward"):
        resolve_reward(f"{__name__}:no_such_function")
    with pytest.raises(ValueError, match="unknown reward"):
        RewardScorer("maths", num_workers=1)
    with pytest.raises(ValueError, match="unknown prompt template 'r1-distill'"):
        RewardScorer("math", template="r1-distill", num_workers=1)


CASES = [
    ("<think>x</think> \\boxed{0.5}", "\\frac{1}{2}"),
    ("<think>x</think> \\boxed{3}", "4"),
    ("<think>\\boxed{4}</think> \\boxed{4}", "4"),
    ("\\boxed{4}", "4"),
    ("<think>x</think> \\boxed{18}", "18"),
]
EXPECTED = [1.0, 0.0, 1.0, 0.0, 1.0]


def test_pool_scores_in_order(scorer):
    before = scorer.stats
    assert scorer.score(CASES) == EXPECTED
    assert [math_reward(r, a, "r1_distill") for r, a in CASES] == EXPECTED
    assert scorer.score([]) == []
    after = scorer.stats
    assert after.scored - before.scored == len(CASES)
    assert (after.timeouts, after.errors) == (before.timeouts, before.errors)


@pytest.mark.multiprocess  # hangs, kills and restarts worker processes (waits out timeouts)
def test_pool_timeout_scores_zero_and_pool_keeps_working(tmp_path):
    with pool(TIMEOUT_S) as scorer:
        first = ready_worker_pids(scorer)
        before = scorer.stats
        # While one worker is busy the other scores: a request that waits for a file is released
        # by the other worker creating it (scored one after the other, the wait would time out).
        flag = str(tmp_path / "flag")
        assert scorer.score([("WAIT", flag), ("TOUCH", flag)]) == [1.0, 1.0]
        assert scorer.stats.timeouts == before.timeouts
        # A hang scores 0 after TIMEOUT_S and its worker is replaced; the other scores the cases.
        assert scorer.score([("HANG", "4"), *CASES]) == [0.0, *EXPECTED]
        after = scorer.stats
        assert after.timeouts == before.timeouts + 1
        assert after.errors == before.errors
        assert after.restarts == before.restarts + 1
        second = ready_worker_pids(scorer)
        assert len(first & second) == 1  # the worker that did not hang is still there
        # Both workers hung at once: both are replaced, the run goes on.
        assert scorer.score([("HANG", "4"), ("HANG", "4"), *CASES]) == [0.0, 0.0, *EXPECTED]
        assert scorer.stats.timeouts == before.timeouts + 3
        assert scorer.stats.restarts == before.restarts + 3
        assert not ready_worker_pids(scorer) & second
        assert scorer.score(CASES) == EXPECTED


def test_pool_errors_score_zero_and_are_counted(scorer):
    before = scorer.stats
    pairs = [("RAISE", "4"), CASES[0], ("CRASH", "4"), *CASES]
    assert scorer.score(pairs) == [0.0, 1.0, 0.0, *EXPECTED]
    after = scorer.stats
    assert after.errors == before.errors + 2
    assert after.timeouts == before.timeouts
    assert after.restarts == before.restarts + 1  # only the crashed worker is replaced
    assert scorer.score(CASES) == EXPECTED


def test_worker_that_cannot_start_is_a_clear_error():
    scorer = RewardScorer(f"{__name__}:broken_at_start", num_workers=1, timeout_s=NO_TIMEOUT_S,
                          startup_timeout_s=STARTUP_S)
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*cannot score anything"):
        scorer.score(CASES)
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(CASES)
