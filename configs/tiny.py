"""The embedded default: ReVal on the project's tiny arithmetic model (reval_jax/assets/tiny_arith),
on CPU, in a few minutes, with no downloads.

    python -m reval_jax.train --config=configs/tiny.py --workdir=runs/tiny   (what `make demo` runs)
"""

from configs import base

ASSETS = "reval_jax/assets/tiny_arith"


def get_config():
    c = base.get_config()
    c.model.path = ASSETS
    c.model.dtype = "float32"  # CPU: no gain from bfloat16
    c.model.remat = "none"
    c.model.scan_layers = False  # 4 small layers: the unrolled loop's update is ~15 % faster on CPU
    c.mesh = (1, 1, 1)
    c.num_iterations = 60
    c.data.train_files = (f"{ASSETS}/data/medium.jsonl",)
    c.data.template = "plain"
    c.data.max_prompt_len = 48
    c.data.prompts_per_iteration = 16
    c.sampling.num_samples = 8
    c.sampling.max_new_tokens = 48
    c.sampling.buckets = (48,)
    c.reward.num_workers = 2
    c.reward.transform = "centered"
    # A tiny model, few rollouts and a few minutes: a learning rate far above the paper's 1e-6 and a
    # reference that follows the policy closely (reset every 4 iterations of K = 2 updates). β 0.1:
    # a centered reward of ±0.5 asks for ±5 nats of log π(τ) over the ~30-token responses.
    c.beta = 0.1
    c.optimizer.learning_rate = 5e-4
    c.reference.reset_every = 8
    c.replay.capacity = 512
    c.replay.updates_per_iteration = 2
    c.eval.files = (f"{ASSETS}/data/medium_eval.jsonl",)
    c.eval.every = 10
    c.eval.limit = 64
    c.eval.k = 4
    c.checkpoint.every = 10
    c.chunk = 512
    c.row_tokens = 8 * 96  # ~68-token trajectories: one per 96-token row would leave 30% padding, 11 per row 3%
    # 12 rows per micro-batch: a round's ~12 rows in one call; the few row counts that occur are each compiled once
    c.tokens_per_device = 12 * 8 * 96
    c.model.attention = "einsum"  # [768, 768] scores are small: the plain path is the fastest on CPU
    return c
