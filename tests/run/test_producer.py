"""The round producer (reval_jax/run/producer.py) on the tiny model with a fake scorer: a round is
the prompts' samples with their rewards; DAPO's dynamic sampling drops the groups whose rewards are
all equal and generates more prompts until the round is full, or tops it up with the earliest
dropped groups once dapo.max_extra_generations extra calls are spent; its rewards are DAPO's (0/1
plus the overlong penalty)."""

import functools

import numpy as np
import pytest
from helpers import tiny_config
from models import tokenizer_model_dir

from reval_jax.data.prompts import PromptExample
from reval_jax.objective.losses import overlong_penalty
from reval_jax.run import config as run_config
from reval_jax.run.pipeline import FixedWeights
from reval_jax.run.producer import Producer

N, A = 4, 8  # samples per prompt, response tokens


class ScriptedScorer:
    """Rewards by the prompt's answer: "same" gives its N samples all 1 (a group dynamic sampling
    drops), "mixed" gives 0, 1, 0, 1 (kept). Counts the answers it scored."""

    def __init__(self):
        self.calls = []

    def score(self, pairs):
        self.calls.append([a for _, a in pairs])
        return [1.0 if a == "same" else float(i % 2) for i, (_, a) in enumerate(pairs)]


@functools.cache
def _model():
    from reval_jax.model.hf import load_hf

    return load_hf(tokenizer_model_dir())


def batches(*answers):
    """The prompt stream: one batch of two prompts per pair of answers."""
    model, tokenizer = _model()
    ids = tokenizer("1+2=?")["input_ids"]
    for i, pair in enumerate(answers):
        yield [PromptExample(f"{i}.{j}", "1+2=?", a, ids) for j, a in enumerate(pair)]


def producer(algorithm, stream, scorer, extra=8, overlong_cache=0.0):
    config = tiny_config("unused.jsonl", algorithm=algorithm, **{"sampling.num_samples": N,
                                                                  "sampling.max_new_tokens": A})
    config.dapo.max_extra_generations = extra
    config.dapo.overlong_cache = overlong_cache
    run_config.apply_algorithm_defaults(config)
    model, tokenizer = _model()
    sampling = run_config.sampling_config(config, (), tokenizer.pad_token_id)
    rounds = run_config.RoundConfig(prompts_per_round=2, prompts_per_call=2, seed=0, seq_len=64 + A,
                                    num_iterations=10, max_extra_calls=extra)
    return Producer(rounds, sampling, None, stream, scorer, tokenizer, run_config.rewarding(config)), model


def test_a_round_without_dynamic_sampling_keeps_every_group():
    scorer = ScriptedScorer()
    make, model = producer("grpo", batches(("same", "mixed"), ("mixed", "mixed")), scorer)
    r = make.produce(3, FixedWeights(5, model))
    assert r.iteration == 3 and r.info == {} and len(scorer.calls) == 1
    np.testing.assert_array_equal(r.batch.group_id, np.repeat([6, 7], N))  # iteration · prompts + b
    np.testing.assert_array_equal(r.batch.raw_reward, [1, 1, 1, 1, 0, 1, 0, 1])
    assert (np.asarray(r.batch.sampler_version)[np.asarray(r.batch.response_mask)] == 5).all()
    assert r.batch.tokens.shape == (2 * N, 64 + A) and r.truncated.shape == (2 * N,)


def test_dynamic_sampling_generates_until_the_round_is_full():
    scorer = ScriptedScorer()
    stream = batches(("same", "mixed"), ("same", "same"), ("mixed", "same"), ("mixed", "mixed"))
    make, model = producer("dapo", stream, scorer)
    r = make.produce(1, FixedWeights(0, model))
    assert len(scorer.calls) == 3  # one mixed group in the first call, none in the second, one in the third
    assert r.info == {"generation_calls": 3.0, "groups_kept": 2.0, "groups_short": 0.0}
    # the kept groups in the order generated: call 0's prompt 1, call 2's prompt 0 (ids apart from every round's)
    np.testing.assert_array_equal(r.batch.group_id, np.repeat([2 + 1, (2 * 11 + 1) * 2 + 0], N))
    np.testing.assert_array_equal(r.batch.raw_reward, np.tile([0, 1, 0, 1], 2))
    np.testing.assert_array_equal(r.batch.reward, r.batch.raw_reward)  # binary, no length penalty (L_cache 0)
    assert next(stream)[0].id == "3.0"  # the stream moved on by the three batches taken


def test_dynamic_sampling_tops_up_with_dropped_groups_when_the_calls_run_out():
    scorer = ScriptedScorer()
    make, model = producer("dapo", batches(("same", "mixed"), ("same", "same")), scorer, extra=1)
    r = make.produce(1, FixedWeights(0, model))
    assert r.info == {"generation_calls": 2.0, "groups_kept": 1.0, "groups_short": 1.0}
    # rows keep their generation order: call 0's dropped prompt 0 tops up its kept prompt 1
    np.testing.assert_array_equal(r.batch.group_id, np.repeat([2, 3], N))
    np.testing.assert_array_equal(r.batch.raw_reward, [1, 1, 1, 1, 0, 1, 0, 1])


@pytest.mark.parametrize("cache", [0.5])
def test_dapo_rewards_carry_the_overlong_penalty(cache):
    scorer = ScriptedScorer()
    make, model = producer("dapo", batches(("mixed", "mixed")), scorer, overlong_cache=cache)
    r = make.produce(1, FixedWeights(0, model))
    lengths = np.asarray(r.batch.response_mask).sum(1)
    expected = np.asarray(r.batch.raw_reward) + overlong_penalty(lengths, A, int(cache * A))
    np.testing.assert_allclose(r.batch.reward, expected, rtol=0, atol=0)
    assert lengths.max() > A - int(cache * A)  # the random model runs long: the penalty acts
