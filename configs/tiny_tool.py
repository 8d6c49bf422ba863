"""The multi-turn demo: ReVal teaches the tiny model when to call the calculator, on CPU, in a few minutes.

The model (reval_jax/assets/tiny_tool, built by reval_jax.experiments.toy_tool) solves tiny_arith's
chains with mental steps that slip and, on about a fifth of the steps, a call ``<<4+4>>`` that the
calculator environment answers ``=8`` (reval_jax/env/calculator_env.py). Calls are exact, so
calling more pays; the rounds' env_tool_calls and accuracy show whether it learns to (docs/tiny_tool.md).

    python -m reval_jax.train --config=configs/tiny_tool.py --workdir=runs/tiny_tool
    python benchmarks/tiny_tool_demo.py        # ReVal against GRPO, 3 seeds each, with plots

Evaluation is off: it samples single-turn answers, and this model never writes a call's value itself
(the environment does); the training rounds' accuracy (temperature 1, fresh prompts each round) is
the curve to read.
"""

from configs import tiny

ASSETS = "reval_jax/assets/tiny_tool"


def get_config():
    c = tiny.get_config()
    c.model.path = ASSETS
    c.env.name = "calculator"
    c.env.max_turns = 6  # 3 operations, each a call, then the answer: 4 turns; 2 to spare
    c.num_iterations = 30
    c.data.train_files = (f"{ASSETS}/data/ops3.jsonl",)
    # every step a call ("<<7-3>>=4, ": 11 tokens) and the answer (". \boxed{10}<|im_end|>"): ~48 tokens
    c.sampling.max_new_tokens = 64
    # the rounds' accuracy is the demo's curve; --config.eval.every=10 adds evaluations of the eval split
    # (episodes with the calculator, like the rounds), at ~30 s each on 2 cores
    c.eval.every = 0
    c.eval.files = (f"{ASSETS}/data/ops3_eval.jsonl",)
    c.row_tokens = 8 * 112  # prompt bucket 48 + 64 response columns fit a row; ~8 trajectories per row
    c.tokens_per_device = 12 * 8 * 112
    return c
