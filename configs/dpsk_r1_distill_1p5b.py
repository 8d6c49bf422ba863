"""DeepSeek-R1-Distill-Qwen-1.5B with the paper's settings (β 0.002, 0/1 reward, R1 template, 8K)."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.path = "checkpoints/DeepSeek-R1-Distill-Qwen-1.5B"  # download it yourself
    c.model.preset = "deepseek-r1-distill-qwen-1.5b"  # its shapes, for `python -m reval_jax.scale` without the weights
    c.model.ref_dtype = "bfloat16"  # the reference is only read in bfloat16 compute: store it so (half the memory)
    c.data.template = "r1_distill"
    c.beta = 0.002
    c.reward.transform = "binary"
    c.reference.reset_every = 0
    c.sampling.max_new_tokens = 8192
    return c
