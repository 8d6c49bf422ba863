"""Verifiable math reward: answer extraction, equivalence, and the time-bounded worker pool."""

import os
import time

import pytest

from reval_jax.rewards import (
    REWARDS,
    RewardScorer,
    extract_boxed,
    math_reward,
    resolve_reward,
)

TIMEOUT_S = 1.5


def faulty_reward(response: str, answer: str, template: str) -> float:
    """``math_reward``, except that some responses hang, raise or kill the worker (test hooks)."""
    if response == "HANG":
        time.sleep(300)
    if response == "RAISE":
        raise RuntimeError("reward failed")
    if response == "CRASH":
        os._exit(3)
    return math_reward(response, answer, template)


def broken_at_start(response: str, answer: str, template: str) -> float:
    raise RuntimeError("cannot score anything")


FAULTY = f"{__name__}:faulty_reward"


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(FAULTY, template="r1_distill", num_workers=2, timeout_s=TIMEOUT_S) as s:
        yield s


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


def test_pool_timeout_scores_zero_and_pool_keeps_working(scorer):
    before = scorer.stats
    pairs = [("HANG", "4"), *CASES]
    start = time.monotonic()
    assert scorer.score(pairs) == [0.0, *EXPECTED]
    # The other worker went on scoring while the hung one ran out its time.
    assert time.monotonic() - start < TIMEOUT_S + 10.0
    after = scorer.stats
    assert after.timeouts == before.timeouts + 1
    assert after.errors == before.errors
    assert after.restarts == before.restarts + 1
    # Both workers hung at once: both are replaced, the run goes on.
    assert scorer.score([("HANG", "4"), ("HANG", "4"), *CASES]) == [0.0, 0.0, *EXPECTED]
    assert scorer.stats.timeouts == before.timeouts + 3
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
    scorer = RewardScorer(f"{__name__}:broken_at_start", num_workers=1, timeout_s=TIMEOUT_S)
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*cannot score anything"):
        scorer.score(CASES)
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(CASES)
