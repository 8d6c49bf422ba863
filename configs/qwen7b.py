"""Qwen2.5-Math-7B with the paper's settings (β 0.02, centered reward, reference reset every 200)."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.path = "checkpoints/Qwen2.5-Math-7B"  # download it yourself; runs never download
    c.model.preset = "qwen2.5-math-7b"  # its shapes, for `python -m reval_jax.scale` without the weights
    c.model.ref_dtype = "bfloat16"  # the reference is only read in bfloat16 compute: store it so (half the memory)
    c.data.template = "qwen_math"
    c.beta = 0.02
    c.reward.transform = "centered"
    c.reference.reset_every = 200
    c.sampling.max_new_tokens = 3072  # the model's context is 4096 positions
    c.data.max_prompt_len = 1024
    # sampler on TP4 x DP2 (docs/scale.md, Rollout layout): 3.8 GB of bfloat16 weights per device instead of
    # 15.2 GB at tp 1, which leaves room for the 30 GB KV cache of 128 rows per device next to the trainer's
    # resident 13.3 GB per device (fsdp master, Adam moments, bfloat16 reference); costs 209 MB of
    # activation all-reduce per decode step (v5p compile), where the FSDP layout gathered 26 GB of weights
    c.rollout.tensor = 4
    # 256 slots refilled as responses stop (~600 tokens on average, 3,072 at most); 1,536 cached tokens per
    # slot on average (prompt + response) instead of 4,096: 393K tokens = 22.5 GB of bf16 KV, 5.6 GB per TP4 device
    c.rollout.slots = 256
    c.rollout.cache_tokens = 256 * 1536
    return c
