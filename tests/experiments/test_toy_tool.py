"""tiny_tool (reval_jax.experiments.toy_tool): its chains call the calculator in exactly the environment's
format, pre-training weighs the policy's tokens only, the committed model loads and calls the tool
through the real engine, and configs/tiny_tool.py runs (shortened) with the calculator's metrics."""

import json
import random
import re

import numpy as np
import pytest

import reval_jax
from reval_jax.data.rewards import math_reward
from reval_jax.env.base import EnvConfig, LocalScorer
from reval_jax.env.calculator import calculate
from reval_jax.env.calculator_env import CalculatorEnv
from reval_jax.experiments import toy, toy_tool
from reval_jax.model.tokenizer import build_char_tokenizer
from reval_jax.run import train
from reval_jax.run.metrics import read_metrics


def _chains(n, *, error_rate, tool_rate, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        problem, _, answer = toy.make_problem(rng, toy.Difficulty(rng.randint(1, 6), 9))
        yield problem, answer, toy_tool.tool_solution(rng, problem, error_rate, tool_rate)


def test_calls_are_exactly_the_calculators_format():
    """Every policy turn but the last ends in a call that CalculatorEnv.parse reads, and the next
    segment is what the calculator appends to it; the last turn calls nothing. Steps slip, calls never."""
    tok = build_char_tokenizer()
    env = CalculatorEnv(EnvConfig(max_turns=8, max_tokens=256), tok, LocalScorer())
    calls = 0
    for _, _, segments in _chains(200, error_rate=0.25, tool_rate=0.5):
        assert [s.policy for s in segments] == [True, False] * (len(segments) // 2) + [True]
        for turn, observation in zip(segments[0::2], segments[1::2], strict=False):
            ids = tok.encode(turn.text, add_special_tokens=False)
            (call,) = env.parse(ids, turn.text)
            assert call.error is None and observation.text == "=" + calculate(call.arguments)
            assert env.observation_text(ids, turn.text, env.run_tools([call])) == observation.text
            calls += 1
        assert env.parse([], segments[-1].text) == [] and segments[-1].text.endswith("}")
        assert toy_tool.solution_text(segments).count("<<") == len(segments) // 2
    assert 300 < calls < 400  # half of the ~700 steps (200 chains of 1-6 operations); sd ~13


def test_exact_steps_solve_and_observations_tokenize_alone():
    """Without slips every chain's policy text (what the environment scores) has the right answer;
    segments tokenized one by one give the tokens of the whole text (the character tokenizer)."""
    tok = build_char_tokenizer()
    for problem, answer, segments in _chains(50, error_rate=0.0, tool_rate=0.3, seed=1):
        assert math_reward("".join(toy_tool.policy_turns(segments)), answer, "plain") == 1.0
        _, response, policy = toy_tool.encode_example(tok, problem, segments)
        whole = tok.encode(toy_tool.solution_text(segments) + "<|im_end|>", add_special_tokens=False)
        assert response == whole and len(policy) == len(response)


def test_pretraining_weighs_policy_tokens_only():
    """With every step a call, the weighted targets spell the policy's turns (no '=' anywhere: each
    '=value' is the calculator's) and the prompt, the observations and the padding weigh nothing."""
    tok = build_char_tokenizer()
    config = toy_tool.ToolPretrainConfig(tool_rate=1.0, step_error_rate=0.0, batch_size=4)
    _, targets, weights = toy_tool.training_batch(tok, config, seed=0, step=3)
    for row, w in zip(targets, weights, strict=True):
        text = tok.decode(row[w > 0])
        assert "=" not in text and text.endswith("<|im_end|>") and text.count("<<") == text.count(">>") >= 1
        assert set(np.unique(w)) == {0.0, 1.0}


def test_committed_model_loads_and_its_data_is_right():
    model, tokenizer = reval_jax.load_hf(toy_tool.ASSET_DIR)
    cfg = model.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (128, 4, len(build_char_tokenizer()))
    text = "Compute 7-3+4. <<7-3>>=4, 4+4=8. \\boxed{8}"
    ids = build_char_tokenizer().encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    for level, difficulty in toy_tool.difficulty_levels().items():
        for name, size in ((level, toy.DATA_SIZE), (f"{level}_eval", toy.EVAL_SIZE)):
            rows = [json.loads(x) for x in (toy_tool.ASSET_DIR / "data" / f"{name}.jsonl").read_text().splitlines()]
            assert len(rows) == size
            for r in rows:
                assert r["problem"].count("+") + r["problem"].count("-") == difficulty.num_ops
                assert toy.solve(r["problem"])[1] == r["answer"]


@pytest.mark.slow
def test_committed_model_calls_the_calculator_sometimes():
    """Through the real engine and the calculator environment (EnvTurns), at temperature 1: some
    episodes call the tool and some do not, and the calls are well formed."""
    model, tokenizer = reval_jax.load_hf(toy_tool.ASSET_DIR)
    problems = toy.make_problems(toy_tool.difficulty_levels()["ops3"], 48, seed=toy.eval_seed(0))
    rates = toy_tool.episode_rates(model, tokenizer, problems, num_samples=2, seed=0, max_new_tokens=64)
    assert 0.15 < rates.tool_use < 0.9 and rates.turns > 1
    assert rates.errors < 0.25 * rates.calls and 0.1 < rates.success < 0.9


@pytest.mark.e2e  # train.run: the demo config, shortened
def test_tiny_tool_config_runs_shortened(tmp_path):
    from configs import tiny_tool

    config = tiny_tool.get_config()
    config.num_iterations = 2
    config.data.prompts_per_iteration = 4
    last = train.run(config, str(tmp_path))
    assert last["iteration"] == 2 and 0.0 <= last["accuracy"] <= 1.0
    trains = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["iteration"] for r in trains] == [1, 2]
    for r in trains:
        assert 1.0 <= r["env_turns_mean"] <= config.env.max_turns and r["env_tool_errors"] <= r["env_tool_calls"]
        assert r["env_observation_tokens_mean"] >= 0 and 0.0 <= r["env_truncated_rate"] <= 1.0
    assert sum(r["env_tool_calls"] for r in trains) > 0  # 64 episodes of a model that calls on ~1 step in 5


def test_minus_bias_makes_mental_subtractions_wrong_in_their_mode():
    """At minus_bias 1 every mental subtraction is one too high and every addition exact (no random
    slips); the calls stay exact, so only a call gets a subtraction right."""
    rng = random.Random(3)
    for _ in range(100):
        problem = toy.make_problem(rng, toy.Difficulty(4, 9))[0]
        (segment,) = toy_tool.tool_solution(rng, problem, 0.0, 0.0, minus_bias=1.0)
        for a, op, b, c in re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)", segment.text):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b) + 1)
