"""Evaluation settings (reval_jax/run/evaluate.py): greedy decoding at eval.temperature 0."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import InlineScorer, tiny_config

from reval_jax.data.templates import stop_token_ids
from reval_jax.errors import UserError
from reval_jax.model.hf import load_hf
from reval_jax.run import config as run_config
from reval_jax.run import evaluate


def test_temperature_zero_means_greedy_and_a_negative_one_is_refused(data_file):
    config = tiny_config(data_file)
    assert not run_config.eval_settings(config, (1,)).greedy
    config.eval.temperature = 0.0
    settings = run_config.eval_settings(config, (1,))
    assert settings.greedy and settings.temperature == 1.0  # SamplingConfig ignores it when greedy
    config.eval.temperature = -0.5
    with pytest.raises(UserError, match=r"config.eval.temperature: -0.5 must be >= 0 \(0 = greedy"):
        run_config.eval_settings(config, (1,))


def _argmax_continuation(model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """The greedy response by full forward passes (no cache): the reference. The sequence sits at the
    left of one fixed-length row, so every pass is one compiled program; the causal mask keeps the
    tokens after position n out of position n's logits."""
    forward = nnx.jit(lambda model, row: model(row)[0])
    seq, row = list(prompt), np.zeros((1, len(prompt) + max_new), np.int32)
    for _ in range(max_new):
        row[0, : len(seq)] = seq
        token = int(jnp.argmax(forward(model, jnp.asarray(row))[len(seq) - 1]))
        seq.append(token)
        if token in stops:
            break
    return seq[len(prompt):]


@pytest.mark.slow
def test_greedy_evaluation_is_deterministic_and_decodes_the_argmax(data_file, monkeypatch):
    config = tiny_config(data_file)
    config.eval.temperature = 0.0  # what --config.eval.temperature=0 (or evaluate --greedy) sets
    model, tokenizer = load_hf(config.model.path, dtype="float32")
    stops = stop_token_ids(tokenizer)
    settings = run_config.eval_settings(config, stops)
    benchmarks = evaluate.load_benchmarks(tokenizer, run_config.data_settings(config))
    calls = []
    generate = evaluate.generate

    def recording(model, prompts, sampling, **kwargs):
        calls.append((prompts, sampling, out := generate(model, prompts, sampling, **kwargs)))
        return out

    monkeypatch.setattr(evaluate, "generate", recording)
    first = evaluate.evaluate(model, tokenizer, benchmarks, settings, InlineScorer())
    again = evaluate.evaluate(model, tokenizer, benchmarks, dataclasses.replace(settings, seed=7), InlineScorer())
    assert first == again  # another seed, the same answers
    prompts, sampling, rollout = calls[0]
    assert sampling.greedy and settings.k == 2
    tokens, lengths = np.asarray(rollout.response_tokens), np.asarray(rollout.response_length)
    for b, prompt in enumerate(prompts):
        want = _argmax_continuation(model, list(prompt), settings.max_new_tokens, set(stops))
        for n in range(settings.k):  # every sample of a problem is the greedy response
            row = b * settings.k + n
            assert tokens[row, : lengths[row]].tolist() == want, (b, n)
