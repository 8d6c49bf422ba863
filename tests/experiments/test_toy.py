"""tiny_arith (reval_jax.experiments.toy): the task's gold answers score 1 and wrong ones 0, the committed model
loads through load_hf and succeeds near its target rates, and the build is byte-for-byte
deterministic."""

import json
import re

import pytest

import reval_jax
from reval_jax.data.rewards import math_reward
from reval_jax.data.templates import encode_prompt
from reval_jax.experiments import toy
from reval_jax.model.tokenizer import build_char_tokenizer

TARGETS = {"hard": 0.13, "medium": 0.31, "easy": 0.76}  # as stated in reval_jax/experiments/toy.py
BAND = 0.12  # on 128 samples the standard error is at most 0.044
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")


def _values(problem: str) -> list[int]:
    """The running values of a problem, computed independently of reval_jax.experiments.toy."""
    expr = problem.removeprefix("Compute ").removesuffix(".")
    assert re.fullmatch(r"\d+([+-]\d+)+", expr), problem
    values = [int(expr[: re.search(r"[+-]|$", expr).start()])]
    for op, b in re.findall(r"([+-])(\d+)", expr):
        values.append(values[-1] + int(b) if op == "+" else values[-1] - int(b))
    return values


def test_levels_are_ordered_by_difficulty():
    levels = toy.difficulty_levels()
    assert list(levels) == ["hard", "medium", "easy"]
    assert levels["easy"].num_ops < levels["medium"].num_ops < levels["hard"].num_ops
    with pytest.raises(ValueError, match="unknown difficulty"):
        toy.make_problems("impossible", 1)


@pytest.mark.parametrize("level", ["hard", "medium", "easy"])
def test_gold_answers_score_one_and_wrong_answers_zero(level):
    difficulty = toy.difficulty_levels()[level]
    problems = toy.make_problems(level, 16, seed=3)
    for problem, answer in problems:
        values = _values(problem)
        assert len(values) == difficulty.num_ops + 1
        assert all(0 <= v <= difficulty.max_value for v in values), problem
        assert answer == str(values[-1])
        solution, solved = toy.solve(problem)
        assert solved == answer and solution.endswith(f". \\boxed{{{answer}}}")
        assert math_reward(solution, answer, "plain") == 1.0
        wrong = solution.replace(f"\\boxed{{{answer}}}", f"\\boxed{{{int(answer) + 1}}}")
        assert math_reward(wrong, answer, "plain") == 0.0
        assert math_reward(solution.split(" \\boxed")[0], answer, "plain") == 0.0  # no box
    assert problems == toy.make_problems(level, 16, seed=3)
    assert problems != toy.make_problems(level, 16, seed=4)


def test_make_problem_writes_the_solution_that_solve_recomputes():
    import random

    rng = random.Random(0)
    for _ in range(50):
        problem, solution, answer = toy.make_problem(rng, toy.Difficulty(3, 29))
        assert toy.solve(problem) == (solution, answer)
    with pytest.raises(ValueError):
        toy.Difficulty(0, 9)


def test_teacher_slips_at_its_rate_and_carries_on_from_the_wrong_value():
    import random

    rng = random.Random(0)
    problems = [toy.make_problem(rng, toy.Difficulty(4, 9))[0] for _ in range(500)]
    assert all(toy.teacher_solution(rng, p, 0.0) == toy.solve(p)[0] for p in problems)
    slips = steps = 0
    for problem in problems:
        solution = toy.teacher_solution(rng, problem, 0.25)
        chain, answer = re.fullmatch(r"(.*)\. \\boxed\{(-?\d+)\}", solution).groups()
        operands = re.findall(r"[+-]\d+", problem.removeprefix("Compute ").removesuffix("."))
        value = _values(problem)[0]
        for step, operand in zip(chain.split(", "), operands, strict=True):
            left, right = step.split("=")
            assert left == f"{value}{operand}"  # each step starts from the value written before
            exact, value = value + int(operand), int(right)
            assert abs(value - exact) <= 2
            slips += value != exact
            steps += 1
        assert answer == str(value)
    assert abs(slips / steps - 0.25) < 0.03, slips / steps


def test_committed_datasets_are_regenerated_exactly(tmp_path):
    data = toy.ASSET_DIR / "data"
    for level in toy.difficulty_levels():
        for name, n, seed in [(level, toy.DATA_SIZE, 0), (f"{level}_eval", toy.EVAL_SIZE,
                                                          toy.eval_seed(0))]:
            out = toy.write_dataset(tmp_path / f"{name}.jsonl", level, n, seed)
            assert out.read_bytes() == (data / f"{name}.jsonl").read_bytes(), name
    rows = [json.loads(line) for line in (data / "medium.jsonl").read_text().splitlines()]
    assert len(rows) == toy.DATA_SIZE and len({r["id"] for r in rows}) == len(rows)
    assert set(rows[0]) == {"id", "problem", "answer", "source"}
    assert rows[0]["source"] == "tiny_arith_medium"
    train = {r["problem"] for r in rows}
    evals = [json.loads(line)["problem"] for line in (data / "medium_eval.jsonl").open()]
    assert len(set(evals) - train) > len(evals) // 2  # a different draw, not a copy


def test_committed_model_loads_through_load_hf():
    files = {p.name: p.stat().st_size for p in toy.ASSET_DIR.rglob("*") if p.is_file()}
    assert set(MODEL_FILES) <= set(files)
    assert sum(files.values()) < 10 * 2**20
    model, tokenizer = reval_jax.load_hf(toy.ASSET_DIR)
    cfg = toy.model_config(toy.PretrainConfig(), len(build_char_tokenizer()))
    assert model.cfg == cfg and 300_000 < cfg.num_params() < 3_000_000
    assert tokenizer is not None and tokenizer.chat_template


def test_load_hf_tokenizer_encodes_like_the_training_tokenizer():
    _, tokenizer = reval_jax.load_hf(toy.ASSET_DIR, load_tokenizer=True)
    reference = build_char_tokenizer()
    problem, _ = toy.make_problems("medium", 1)[0]
    assert encode_prompt(tokenizer, problem, "plain") == encode_prompt(reference, problem, "plain")


@pytest.mark.slow
def test_committed_model_succeeds_near_the_target_rates():
    model, tokenizer = reval_jax.load_hf(toy.ASSET_DIR)  # through the same HF path as real models
    rates = toy.success_rates(model, tokenizer, num_problems=128, seed=2)
    assert rates["hard"] < rates["medium"] < rates["easy"], rates
    for level, target in TARGETS.items():
        assert abs(rates[level] - target) <= BAND, (level, rates)


@pytest.mark.e2e  # pre-trains the toy model twice (the build's training loop, end to end)
def test_build_is_deterministic(tmp_path):
    config = toy.PretrainConfig(steps=3)
    outs = [toy.build(tmp_path / f"run{i}", 0, config, data_size=4, eval_size=2, log_every=0)
            for i in range(2)]
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert set(MODEL_FILES) <= {str(f) for f in files}
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (outs[0] / name).read_bytes() == (toy.ASSET_DIR / name).read_bytes(), name
