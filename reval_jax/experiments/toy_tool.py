"""tiny_tool: the tiny arithmetic model taught to call the calculator sometimes (the multi-turn demo).

The model of ``configs/tiny_tool.py``. Its task is tiny_arith's (``reval_jax.experiments.toy``:
chains of additions and subtractions, the ``plain`` template, the math reward), but the worked
solutions it was pre-trained on mix two kinds of steps:

    user:      Compute 7-3+4-6.
    assistant: 7-3=4, <<4+4>>=8, 8-6=2. \\boxed{2}

a *mental* step ``7-3=4`` is the slipping teacher's (``toy.teacher_solution``: off by ±1 or ±2 with
probability 0.25), a *calculator* step ``<<4+4>>=8`` is a call in exactly the format of the
calculator environment (``reval_jax.env.calculator_env``): the policy writes ``<<4+4>>``, the turn
stops at ``>>``, the environment appends ``=8`` (always right) and the policy goes on with ``, ``.
Each step is a call with probability ``tool_rate`` (0.2), so the pre-trained model calls the tool
sometimes (about half of its episodes at 3-4 operations) but not always. Calls are exact and mental
steps slip, so calling on every step pays: RL can learn *when* to call it.

The appended ``=8`` is the environment's, not the policy's: its tokens have no weight in the
pre-training loss (``training_batch``), as observation tokens have none in RL (ALGORITHMS.md,
"Multi-turn trajectories"). The model therefore never learned to write the value after ``>>``
itself; it needs the environment, and evaluation without one (``run.evaluate``, single turn) is
meaningless for it (``configs/tiny_tool.py`` turns it off and reads the rounds' accuracy).

Shapes and tokenizer are tiny_arith's (Qwen2 decoder, D=128, L=4, 834,560 parameters, the character
tokenizer); pre-training starts from the committed tiny_arith weights (``ToolPretrainConfig.init``),
which already hold the arithmetic, and teaches the call format in far fewer steps than toy.py's 2000
from scratch (``--init=scratch`` trains from a fresh model).

Regenerate the committed files (reval_jax/assets/tiny_tool: the Hugging Face directory and
data/{level}.jsonl of 512 problems and data/{level}_eval.jsonl of 128 per level of
``difficulty_levels()``; docs/tiny_tool.md has the build's time and the measured rates):

    python -m reval_jax.experiments.toy_tool --out=reval_jax/assets/tiny_tool --seed=0

``episode_rates`` measures success and tool use through the real engine with the calculator
environment (``EnvTurns``), at temperature 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reval_jax.env.calculator_env import CALL_CLOSE, CALL_OPEN
from reval_jax.experiments import toy
from reval_jax.experiments.toy import Difficulty, PretrainConfig

SOURCE = "tiny_tool"
ASSET_DIR = Path(__file__).parents[1] / "assets" / "tiny_tool"
IM_END = "<|im_end|>"


def difficulty_levels() -> dict[str, Difficulty]:
    """The data sets' levels: 3 and 4 operations on numbers up to 9 (tiny_arith's medium and one
    step more), where a base model that calls the tool on a fifth of the steps leaves room."""
    return {"ops3": Difficulty(num_ops=3, max_value=9), "ops4": Difficulty(num_ops=4, max_value=9)}


# ----------------------------------------------------------------------------- the worked chains


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of a worked solution: the policy's text, or the calculator's observation."""

    text: str
    policy: bool


def tool_solution(rng: random.Random, problem: str, error_rate: float, tool_rate: float,
                  minus_bias: float = 0.0) -> list[Segment]:
    """A worked solution of ``problem`` whose steps are each a calculator call (probability
    ``tool_rate``: the policy's ``<<4+4>>``, then the observation ``=8``, exact) or a mental step of
    the slipping teacher (``7-3=4``, off by ±1 or ±2 with probability ``error_rate``); later steps
    carry on from the value written. Ends with the policy's ``. \\boxed{value}``.

    ``minus_bias`` (0: the committed model) is a systematic slip: a mental subtraction is written one
    too high with that probability (instead of the random slip), so that at 1 the model's mental
    subtractions are wrong in their mode and only a call gets them right."""
    expr = problem.removeprefix("Compute ").removesuffix(".")
    tokens = expr.replace("+", " + ").replace("-", " - ").split()
    value, segments, text = int(tokens[0]), [], ""
    for i, (op, b) in enumerate(zip(tokens[1::2], tokens[2::2], strict=True)):
        text += ", " if i else ""
        new = value + int(b) if op == "+" else value - int(b)
        if rng.random() < tool_rate:
            segments += [Segment(text + f"{CALL_OPEN}{value}{op}{b}{CALL_CLOSE}", True), Segment(f"={new}", False)]
            text = ""
        else:
            if op == "-" and minus_bias and rng.random() < minus_bias:
                new += 1
            elif error_rate and rng.random() < error_rate:
                new += rng.choice((-2, -1, 1, 2))
            text += f"{value}{op}{b}={new}"
        value = new
    return [*segments, Segment(text + f". \\boxed{{{value}}}", True)]


def solution_text(segments: Sequence[Segment]) -> str:
    """The whole response: every segment's text in order (what the model sees)."""
    return "".join(s.text for s in segments)


def policy_turns(segments: Sequence[Segment]) -> list[str]:
    """The policy's turns as the environment sees them: the text before each observation."""
    return [s.text for s in segments if s.policy]


def encode_example(tokenizer, problem: str, segments: Sequence[Segment]) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, response ids, policy mask of the response): each segment tokenized on its own
    (as the engine appends an observation), the last closed by ``<|im_end|>``."""
    prompt, _ = toy.encode_example(tokenizer, problem, "")
    response, policy = [], []
    for k, s in enumerate(segments):
        ids = tokenizer.encode(s.text + (IM_END if k == len(segments) - 1 else ""), add_special_tokens=False)
        response += ids
        policy += [s.policy] * len(ids)
    return prompt, response, policy


# ----------------------------------------------------------------------------- pre-training


@dataclasses.dataclass(frozen=True)
class ToolPretrainConfig(PretrainConfig):
    """toy's PretrainConfig (the decoder's shapes) with the tool steps; defaults: the committed model."""

    steps: int = 500
    learning_rate: float = 1e-3  # fine-tuning tiny_arith: a third of its from-scratch peak
    train_ops: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    tool_rate: float = 0.2  # probability that a step is a calculator call
    minus_bias: float = 0.0  # probability that a mental subtraction is one too high (tool_solution)
    init: str | None = str(toy.ASSET_DIR)  # weights to start from (same shapes); None: a fresh model


def _seq_len(tokenizer, num_ops: int, max_value: int) -> int:
    """An upper bound on an example's tokens with ``num_ops`` operations (every step a call and
    every number as long as the slips make it), rounded up to a multiple of 8."""
    n = "-" + "9" * len(str(max_value + 2 * num_ops))
    step = f"{CALL_OPEN}{n}+{n}{CALL_CLOSE}={n}"
    problem = "Compute " + "+".join([n] * (num_ops + 1)) + "."
    prompt, response, _ = encode_example(tokenizer, problem, [Segment(", ".join([step] * num_ops) +
                                                                      f". \\boxed{{{n}}}", True)])
    return -(-(len(prompt) + len(response)) // 8) * 8


def training_batch(tokenizer, config: ToolPretrainConfig, seed: int, step: int):
    """The batch of ``step`` like ``toy.training_batch`` (inputs, targets [B, T-1] int32, weights
    [B, T-1] float32), with ``tool_solution``'s chains: weight 1 where the target is a policy token,
    0 at the calculator's observations and the padding."""
    rng = random.Random(f"{SOURCE}/train/{seed}/{step}")
    num_ops = rng.choice(config.train_ops)
    B, T = config.batch_size, _seq_len(tokenizer, num_ops, max(config.train_max_values))
    tokens = np.zeros((B, T), np.int32)  # [B, T]
    weights = np.zeros((B, T - 1), np.float32)  # [B, T-1]
    for b in range(B):
        problem = toy.make_problem(rng, Difficulty(num_ops, rng.choice(config.train_max_values)))[0]
        segments = tool_solution(rng, problem, config.step_error_rate, config.tool_rate, config.minus_bias)
        prompt, response, policy = encode_example(tokenizer, problem, segments)
        n = len(prompt) + len(response)
        tokens[b, :n] = prompt + response
        weights[b, len(prompt) - 1 : n - 1] = np.asarray(policy, np.float32)  # whose next token is the policy's
    return tokens[:, :-1], tokens[:, 1:], weights


def initial_model(config: ToolPretrainConfig, seed: int):
    """(model, tokenizer): ``config.init``'s weights, or a fresh model of ``config``'s shapes."""
    from reval_jax.model.decoder import create_model
    from reval_jax.model.hf import load_hf
    from reval_jax.model.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    want = toy.model_config(config, len(tokenizer))
    if config.init is None:
        return create_model(want, seed=seed), tokenizer
    model, _ = load_hf(config.init, load_tokenizer=False)
    got = {f: getattr(model.cfg, f) for f in ("vocab_size", "hidden_size", "num_layers", "intermediate_size")}
    if got != {f: getattr(want, f) for f in got}:
        raise ValueError(f"{config.init}: shapes {got} are not the config's")
    return model, tokenizer


def pretrain(config: ToolPretrainConfig, seed: int = 0, *, log_every: int = 50):
    """Pre-trains (``toy.make_train_step``: next-token cross-entropy on the policy tokens) from
    ``initial_model``. Returns (model, tokenizer)."""
    from flax import nnx

    model, tokenizer = initial_model(config, seed)
    graphdef, params = nnx.split(model)
    tx = toy.optimizer(config)
    opt_state = tx.init(params)
    train_step = toy.make_train_step(graphdef, tx)
    start = time.time()
    for step in range(config.steps):
        params, opt_state, loss = train_step(params, opt_state, *training_batch(tokenizer, config, seed, step))
        if log_every and (step + 1) % log_every == 0:
            logging.info("step %d/%d  loss %.4f  %.0fs", step + 1, config.steps, float(loss), time.time() - start)
    return nnx.merge(graphdef, params), tokenizer


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EpisodeRates:
    """Figures of sampled episodes with the calculator: success (reward 1), tool use (>= 1 call),
    calls and turns per episode, tool errors per episode, episodes truncated."""

    success: float
    tool_use: float
    calls: float
    turns: float
    errors: float
    truncated: float


def episode_rates(model, tokenizer, problems: Sequence[tuple[str, str]], *, num_samples: int = 1, seed: int = 0,
                  max_new_tokens: int = 96, max_turns: int = 6) -> EpisodeRates:
    """Samples ``num_samples`` episodes per problem (temperature 1, no top-k / top-p) through the
    rollout engine with the calculator environment (``EnvTurns``), scored by the math reward."""
    from reval_jax.data.templates import encode_prompt, stop_token_ids
    from reval_jax.env.base import EnvConfig, LocalScorer, get_environment
    from reval_jax.env.rollout import EnvTurns
    from reval_jax.rollout.sampler import SamplingConfig, generate

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    env = get_environment("calculator", EnvConfig(max_turns=max_turns, max_tokens=max_new_tokens), tokenizer,
                          LocalScorer(template=toy.TEMPLATE))
    examples = [Example(f"{i}", p, a) for i, (p, a) in enumerate(problems)]
    turns = EnvTurns(env, examples, tokenizer, vocab_size=model.cfg.vocab_size)
    config = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=num_samples,
                            stop_ids=tuple(stop_token_ids(tokenizer)), buckets=(64,))
    generate(model, [encode_prompt(tokenizer, p, toy.TEMPLATE) for p, _ in problems], config, seed=seed,
             turns=turns)
    turns.close()
    eps = [turns.episodes[(b, n)] for b in range(len(problems)) for n in range(num_samples)]
    mean = lambda f: float(np.mean([f(e) for e in eps]))
    return EpisodeRates(success=mean(lambda e: e.reward), tool_use=mean(lambda e: e.tool_calls > 0),
                        calls=mean(lambda e: e.tool_calls), turns=mean(lambda e: e.turns),
                        errors=mean(lambda e: e.tool_errors), truncated=mean(lambda e: e.truncated))


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt example for the environment (``reval_jax.env.base.Example``)."""

    id: str
    problem: str
    answer: str


# ----------------------------------------------------------------------------- the committed files


def build(out, seed: int = 0, config: ToolPretrainConfig = ToolPretrainConfig(), *,
          data_size: int = toy.DATA_SIZE, eval_size: int = toy.EVAL_SIZE) -> Path:
    """Pre-trains the model and writes under ``out`` the Hugging Face directory and, per level of
    ``difficulty_levels()``, ``data/{level}.jsonl`` (problem seed ``seed``) and
    ``data/{level}_eval.jsonl`` (``toy.eval_seed(seed)``), in tiny_arith's format."""
    from reval_jax.model.hf import save_hf

    out = Path(out)
    model, tokenizer = pretrain(config, seed)
    save_hf(model, tokenizer, out)
    for level, difficulty in difficulty_levels().items():
        _write_dataset(out / "data" / f"{level}.jsonl", level, difficulty, data_size, seed)
        _write_dataset(out / "data" / f"{level}_eval.jsonl", level, difficulty, eval_size, toy.eval_seed(seed))
    return out


def _write_dataset(path: Path, level: str, difficulty: Difficulty, n: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (problem, answer) in enumerate(toy.make_problems(difficulty, n, seed)):
            f.write(json.dumps({"id": f"{SOURCE}-{level}-s{seed}-{i}", "problem": problem, "answer": answer,
                                "source": f"{SOURCE}_{level}"}) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the Hugging Face model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=ToolPretrainConfig.steps)
    parser.add_argument("--init", default=ToolPretrainConfig.init, help="weights to start from, or 'scratch'")
    parser.add_argument("--minus_bias", type=float, default=0.0, help="ToolPretrainConfig.minus_bias (0: committed)")
    parser.add_argument("--eval_problems", type=int, default=256,
                        help="problems per level for the rates printed at the end; 0 skips")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    start = time.time()
    config = ToolPretrainConfig(steps=args.steps, init=None if args.init == "scratch" else args.init,
                                minus_bias=args.minus_bias)
    out = build(args.out, args.seed, config)
    logging.info("wrote %s in %.0fs", out, time.time() - start)
    if args.eval_problems:
        from reval_jax.model.hf import load_hf

        model, tokenizer = load_hf(out)
        for name, level in difficulty_levels().items():
            problems = toy.make_problems(level, args.eval_problems, seed=toy.eval_seed(args.seed))
            rates = episode_rates(model, tokenizer, problems, seed=args.seed)
            logging.info("%-5s %s: %s (%d problems, temperature 1)", name, level, rates, args.eval_problems)


if __name__ == "__main__":
    from reval_jax.run import cli

    cli.run_plain(main)
