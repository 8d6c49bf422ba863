"""tiny_arith: a tiny Qwen2 model that knows some arithmetic, and the task it was trained on.

The embedded default model of reval_jax (no download, CPU only). Problems are chains of additions
and subtractions with a verifiable answer, prompted through the ``plain`` template:

    user:      Compute 7-3+4-6.
    assistant: 7-3=4, 4+4=8, 8-6=2. \\boxed{2}

so that ``rewards.math_reward(response, answer, "plain")`` scores them. ``Difficulty(num_ops,
max_value)`` sets the length of the chain and the range 0..max_value of every number in it;
``difficulty_levels()`` names three settings, all with numbers up to 9, at which the committed base
model succeeds about 75% (easy: one operation), 30% (medium: three) and 13% (hard: six) of the time
at temperature 1. ``make_problems`` / ``write_dataset`` draw problems of a level.

The model is a Qwen2-architecture decoder (D=128, L=4, N=4, K=2, F=384, tied embeddings: 834,560
parameters, float32) with the project's character tokenizer (``build_char_tokenizer()``), pre-trained
here for 2000 AdamW steps of 32 problems (1-8 operations, numbers up to 9) by next-token
cross-entropy, and saved with ``save_hf``; ``load_hf`` reads it like any real checkpoint.

The worked solutions it learns from are a slipping teacher's (``teacher_solution``): each step's
result is off by ±1 or ±2 with probability 0.25, and the chain carries on from the wrong value. The
model therefore knows the right step but hedges, like a pre-trained LLM whose greedy answer is right
more often than its samples: near-greedy (temperature 0.05, 256 samples) it solves 100% of easy, 81%
of medium and 28% of hard problems. That is what RL can sharpen within minutes on a CPU. (An
earlier model, trained 800 steps on exact solutions, was wrong in its mode almost as often as in its
samples: 0.53 at temperature 0.2 against 0.41 at 1 on its medium level; ReVal did not move it in
30 iterations of 16 x 8 rollouts at any learning rate tried.)

Everything is a function of the seed: problems come from ``random.Random`` seeded with strings, the
model from ``create_model(seed)``, each batch from its step number, and XLA's CPU kernels are
deterministic, so a second run on the same machine and software writes the same bytes (another CPU
or jax version may differ in the last bits, and then in the rates below).

Regenerate the committed files (reval_jax/assets/tiny_arith: config.json, model.safetensors,
tokenizer files with the chat template, data/{easy,medium,hard}.jsonl of 512 problems and
data/{level}_eval.jsonl of 128 problems):

    python -m reval_jax.experiments.toy --out=reval_jax/assets/tiny_arith --seed=0

On the project's 2-core CPU the build took 15.5 minutes (930 s, with success rates measured every
500 steps), and 29 minutes with two other jobs on the machine; the second build wrote the committed
bytes exactly (every file compared), and printed the seed-0 rates below.

Measured success rates of the committed model (``success_rates``: temperature 1, no top-k / top-p,
the real math reward, problems of the eval split):

    level    Difficulty   seed 0, 512 x 1   seed 1, 256 x 4   all 1536 samples
    easy     (1, 9)       0.775             0.746             0.756
    medium   (3, 9)       0.338             0.288             0.305
    hard     (6, 9)       0.137             0.128             0.131

and by number of operations (seed 0, 512 problems, numbers up to 9): 2 ops 0.529, 4 ops 0.193,
5 ops 0.146, 8 ops 0.119; the teacher alone would give 0.75^n. Per problem the rates spread
around these means; the one-prompt experiment (``reval_jax.experiments.one_prompt``) picks its prompts by their
own measured rate.

The success rates here are measured with ``build_char_tokenizer()``, whose files are the ones saved
with the model; ``load_hf`` returns a tokenizer that encodes the same (tests/test_toy.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE = "plain"
SOURCE = "tiny_arith"
ASSET_DIR = Path(__file__).parents[1] / "assets" / "tiny_arith"


# ----------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """A problem family: ``num_ops`` additions / subtractions in which every number (operands,
    intermediate results, answer) lies in 0..max_value."""

    num_ops: int
    max_value: int

    def __post_init__(self):
        if self.num_ops < 1 or self.max_value < 1:
            raise ValueError(f"{self}: num_ops and max_value must be >= 1")


def difficulty_levels() -> dict[str, Difficulty]:
    """The named difficulties of the data sets. The committed base model's success rate at
    temperature 1 is 0.13 (hard), 0.31 (medium) and 0.76 (easy) on them (module docstring)."""
    return {
        "hard": Difficulty(num_ops=6, max_value=9),
        "medium": Difficulty(num_ops=3, max_value=9),
        "easy": Difficulty(num_ops=1, max_value=9),
    }


def _difficulty(level: str | Difficulty) -> Difficulty:
    if isinstance(level, Difficulty):
        return level
    levels = difficulty_levels()
    if level not in levels:
        raise ValueError(f"unknown difficulty {level!r}; named levels: {sorted(levels)}")
    return levels[level]


def make_problem(rng: random.Random, difficulty: Difficulty) -> tuple[str, str, str]:
    """One problem drawn with ``rng``: (problem, worked solution, answer).

    ``Compute 7+8-9.`` -> ``7+8=15, 15-9=6. \\boxed{6}``, answer ``6``. The first number is
    uniform in 0..max_value; each operation is "+" or "-" (whichever keep the value in range) with
    an operand uniform in 1..(max_value - value) or 1..value."""
    top = difficulty.max_value
    value = rng.randint(0, top)
    expr = str(value)
    for _ in range(difficulty.num_ops):
        op = rng.choice([o for o, room in (("+", top - value), ("-", value)) if room > 0])
        b = rng.randint(1, top - value if op == "+" else value)
        value = value + b if op == "+" else value - b
        expr += f"{op}{b}"
    problem = f"Compute {expr}."
    return (problem, *solve(problem))


def teacher_solution(rng: random.Random | None, problem: str, error_rate: float) -> str:
    """A worked solution of ``problem`` by a teacher who slips: each step's result is off by ±1 or
    ±2 (uniformly) with probability ``error_rate`` (drawn from ``rng``; none is drawn at rate 0),
    and the later steps carry on correctly from the wrong value, so the boxed answer is wrong
    whenever a step was. The pre-training data."""
    expr = problem.removeprefix("Compute ").removesuffix(".")
    tokens = expr.replace("+", " + ").replace("-", " - ").split()
    value, steps = int(tokens[0]), []
    for op, b in zip(tokens[1::2], tokens[2::2], strict=True):
        new = value + int(b) if op == "+" else value - int(b)
        if error_rate and rng.random() < error_rate:
            new += rng.choice((-2, -1, 1, 2))
        steps.append(f"{value}{op}{b}={new}")
        value = new
    return ", ".join(steps) + f". \\boxed{{{value}}}"


def _rng(seed: int, difficulty: Difficulty, split: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and Python versions.
    return random.Random(f"{SOURCE}/{split}/{seed}/{difficulty.num_ops}/{difficulty.max_value}")


def make_problems(level: str | Difficulty, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (problem, answer) pairs of a named level (or a ``Difficulty``), fixed by ``seed``."""
    difficulty = _difficulty(level)
    rng = _rng(seed, difficulty, "problems")
    return [make_problem(rng, difficulty)[0::2] for _ in range(n)]


def solve(problem: str) -> tuple[str, str]:
    """The gold worked solution and answer of a problem written by ``make_problem``."""
    solution = teacher_solution(None, problem, error_rate=0.0)
    return solution, solution.rsplit("{", 1)[1].rstrip("}")


def write_dataset(path: str | os.PathLike, level: str | Difficulty, n: int, seed: int = 0) -> Path:
    """Writes ``n`` problems as JSON Lines in the format of /work/shared/data/math:
    ``{"id", "problem", "answer", "source"}``, one object per line."""
    difficulty = _difficulty(level)
    name = level if isinstance(level, str) else f"ops{difficulty.num_ops}_max{difficulty.max_value}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (problem, answer) in enumerate(make_problems(difficulty, n, seed)):
            row = {"id": f"{SOURCE}-{name}-s{seed}-{i}", "problem": problem, "answer": answer,
                   "source": f"{SOURCE}_{name}"}
            f.write(json.dumps(row) + "\n")
    return path


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Shapes and schedule of the supervised pre-training (defaults: the committed model)."""

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3  # peak; linear warmup, then cosine decay to 10% of it
    warmup_steps: int = 20
    weight_decay: float = 0.01
    # each batch draws its number of operations from train_ops, each row its max_value from
    # train_max_values; the worked solutions are the slipping teacher's (``teacher_solution``)
    train_ops: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    train_max_values: tuple[int, ...] = (9,)
    step_error_rate: float = 0.25
    # the decoder: D, L, F, N, K (H = D / N), tied embeddings
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2


def model_config(config: PretrainConfig, vocab_size: int):
    """The ``ModelConfig`` of the decoder of ``config`` for a vocabulary of ``vocab_size``."""
    from reval_jax.model.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_layers,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.hidden_size // config.num_heads, max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def encode_example(tokenizer, problem: str, solution: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the ``plain`` prompt and the worked answer closed by
    ``<|im_end|>``, the way the sampler sees them."""
    from reval_jax.data.templates import encode_prompt

    response = tokenizer.encode(solution + "<|im_end|>", add_special_tokens=False)
    return encode_prompt(tokenizer, problem, TEMPLATE), list(response)


def _seq_len(tokenizer, num_ops: int, max_value: int) -> int:
    """An upper bound on the tokens of an example (every number as long as the teacher's slips can
    make it, with a sign), rounded up to a multiple of 8: the row length of the training batches
    with ``num_ops`` operations."""
    n = "-" + "9" * len(str(max_value + 2 * num_ops))
    problem = "Compute " + "+".join([n] * (num_ops + 1)) + "."
    solution = ", ".join([f"{n}+{n}={n}"] * num_ops) + f". \\boxed{{{n}}}"
    prompt, response = encode_example(tokenizer, problem, solution)
    return -(-(len(prompt) + len(response)) // 8) * 8


def training_batch(tokenizer, config: PretrainConfig, seed: int, step: int):
    """The batch of ``step``, from rows of T tokens (prompt, worked answer, ``<|im_end|>``): inputs
    [B, T-1] int32, targets [B, T-1] int32 (the next tokens) and weights [B, T-1] float32 (1 where
    the target is a response token). All rows of a batch have the
    same number of operations, drawn from ``train_ops``, so that T fits them (one compiled shape
    per number of operations); each row draws its value range from ``train_max_values``.
    Rows are right-padded with id 0, which only ever sits after the real tokens, with no weight."""
    rng = random.Random(f"{SOURCE}/train/{seed}/{step}")
    num_ops = rng.choice(config.train_ops)
    B, T = config.batch_size, _seq_len(tokenizer, num_ops, max(config.train_max_values))
    tokens = np.zeros((B, T), np.int32)  # [B, T]
    weights = np.zeros((B, T - 1), np.float32)  # [B, T-1]
    for b in range(B):
        difficulty = Difficulty(num_ops, rng.choice(config.train_max_values))
        problem = make_problem(rng, difficulty)[0]
        solution = teacher_solution(rng, problem, config.step_error_rate)
        prompt, response = encode_example(tokenizer, problem, solution)
        n = len(prompt) + len(response)
        tokens[b, :n] = prompt + response
        weights[b, len(prompt) - 1 : n - 1] = 1.0  # positions whose next token is a response token
    return tokens[:, :-1], tokens[:, 1:], weights


def optimizer(config: PretrainConfig):
    """AdamW with global-norm clipping; linear warmup, then cosine decay to 10% of the peak."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1),
        end_value=0.1 * config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=config.weight_decay),
    )


def make_train_step(graphdef, tx):
    """The jitted step ``(params, opt_state, inputs, targets, weights) -> (params, opt_state,
    loss)`` minimising the mean next-token cross-entropy over the response tokens."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(params, inputs, targets, weights):
        logits = nnx.merge(graphdef, params)(inputs)  # [B, T, V]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
        # mean over the response tokens of the batch
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, inputs, targets, weights):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, weights)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def pretrain(
    config: PretrainConfig, seed: int = 0, *, log_every: int = 50,
    callback: Callable[[int, Any, Any], None] | None = None,
):
    """Builds the tokenizer and a fresh model and pre-trains it. Returns (model, tokenizer).
    ``callback(step, model, tokenizer)``, if given, runs after every step (e.g. evaluation)."""
    from flax import nnx

    from reval_jax.model.decoder import create_model
    from reval_jax.model.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = create_model(model_config(config, len(tokenizer)), seed=seed)
    graphdef, params = nnx.split(model)
    tx = optimizer(config)
    opt_state = tx.init(params)
    train_step = make_train_step(graphdef, tx)
    start = time.time()
    for step in range(config.steps):
        batch = training_batch(tokenizer, config, seed, step)
        params, opt_state, loss = train_step(params, opt_state, *batch)
        if log_every and (step + 1) % log_every == 0:
            logging.info("step %d/%d  loss %.4f  %.0fs", step + 1, config.steps, float(loss),
                         time.time() - start)
        if callback is not None:
            callback(step + 1, nnx.merge(graphdef, params), tokenizer)
    return nnx.merge(graphdef, params), tokenizer


# ----------------------------------------------------------------------------- evaluation


def problem_success(
    model, tokenizer, problems: Sequence[tuple[str, str]], *, num_samples: int = 1, seed: int = 0,
    max_new_tokens: int = 80,
) -> np.ndarray:
    """Per problem, the fraction of ``num_samples`` sampled responses (temperature 1, no top-k /
    top-p) that the math reward scores 1: float [len(problems)]."""
    from reval_jax.data.rewards import math_reward
    from reval_jax.data.templates import encode_prompt, stop_token_ids
    from reval_jax.rollout.sampler import SamplingConfig, generate

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=num_samples,
                            stop_ids=tuple(stop_token_ids(tokenizer)), buckets=(64,))
    prompts = [encode_prompt(tokenizer, p, TEMPLATE) for p, _ in problems]
    rollout = generate(model, prompts, config, seed=seed)
    tokens, lengths = np.asarray(rollout.response_tokens), np.asarray(rollout.response_length)
    scores = [
        math_reward(tokenizer.decode(tokens[r, : lengths[r]], skip_special_tokens=True),
                    problems[r // num_samples][1], TEMPLATE)
        for r in range(len(tokens))
    ]
    return np.asarray(scores, np.float64).reshape(len(problems), num_samples).mean(1)


def success_rates(
    model, tokenizer, levels: dict[str, str | Difficulty] | None = None, *, num_problems: int = 256,
    num_samples: int = 1, seed: int = 0, max_new_tokens: int = 80,
) -> dict[str, float]:
    """Fraction of sampled responses (temperature 1, no top-k / top-p) that the math reward scores
    1, per level: ``num_problems`` problems of the ``eval`` split of ``seed``, ``num_samples``
    samples each."""
    return {
        name: float(np.mean(problem_success(
            model, tokenizer, make_problems(level, num_problems, seed=eval_seed(seed)),
            num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens)))
        for name, level in (levels or difficulty_levels()).items()
    }


def eval_seed(seed: int) -> int:
    """The problem seed of the evaluation split: another draw than the data sets' seed ``seed``."""
    return 1_000 + seed


# ----------------------------------------------------------------------------- the committed files

DATA_SIZE = 512  # problems per level in data/{level}.jsonl
EVAL_SIZE = 128  # problems per level in data/{level}_eval.jsonl


def build(
    out: str | os.PathLike, seed: int = 0, config: PretrainConfig = PretrainConfig(), *,
    data_size: int = DATA_SIZE, eval_size: int = EVAL_SIZE, log_every: int = 100,
) -> Path:
    """Pre-trains the model and writes everything under ``out``: the Hugging Face directory
    (config.json, model.safetensors, tokenizer files with the chat template) and, per level of
    ``difficulty_levels()``, ``data/{level}.jsonl`` (problem seed ``seed``) and
    ``data/{level}_eval.jsonl`` (problem seed ``eval_seed(seed)``)."""
    from reval_jax.model.hf import save_hf

    out = Path(out)
    model, tokenizer = pretrain(config, seed, log_every=log_every)
    save_hf(model, tokenizer, out)
    for level in difficulty_levels():
        write_dataset(out / "data" / f"{level}.jsonl", level, data_size, seed)
        write_dataset(out / "data" / f"{level}_eval.jsonl", level, eval_size, eval_seed(seed))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the Hugging Face model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps,
                        help="pre-training steps (fewer for a quick check, not the committed model)")
    parser.add_argument("--eval_problems", type=int, default=512,
                        help="problems per level for the success rates printed at the end; 0 skips")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # its own progress
    start = time.time()
    out = build(args.out, args.seed, PretrainConfig(steps=args.steps))
    logging.info("wrote %s in %.0fs", out, time.time() - start)
    if args.eval_problems:
        from reval_jax.model.hf import load_hf
        from reval_jax.model.tokenizer import build_char_tokenizer

        model, _ = load_hf(out, load_tokenizer=False)
        tokenizer = build_char_tokenizer()  # the one saved with the model (module docstring)
        rates = success_rates(model, tokenizer, difficulty_levels(),
                              num_problems=args.eval_problems, seed=args.seed)
        for name, rate in rates.items():
            logging.info("success rate %-6s %s: %.3f (%d problems, temperature 1)", name,
                         difficulty_levels()[name], rate, args.eval_problems)


if __name__ == "__main__":
    from reval_jax.run import cli

    cli.run_plain(main)
