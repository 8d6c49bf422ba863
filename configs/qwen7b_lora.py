"""Qwen2.5-Math-7B trained with low-rank adapters (docs/lora.md): ReVal on one 80 GB GPU.

The base is frozen and stored in bfloat16 (15.2 GB), A and B of rank 64 on every projection (162 M
parameters, float32, with their Adam moments ~1.9 GB); the reference is the base itself (no copy) and
a reference reset every 200 updates is a merge. Everything else is configs/qwen7b.py's.

    python -m reval_jax.train --config=configs/qwen7b_lora.py
    python -m reval_jax.scale --config=configs/qwen7b_lora.py --devices=1 --device=h100
"""

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.model.ref_dtype = ""  # the reference of a LoRA run is the base: no stored copy
    c.lora.rank = 64
    c.lora.alpha = 128.0  # scale alpha / rank = 2, exact in bfloat16
    c.lora.base_dtype = "bfloat16"  # the frozen base in bfloat16: it is only read in bfloat16 compute
    c.optimizer.learning_rate = 1e-5  # adapters take ~10x full fine-tuning's rate (PEFT practice)
    # one device: the sampler's copy is the merged weights on the same device (tp 1); a smaller cache
    c.mesh = (1, -1, 1)
    c.rollout.tensor = 1
    c.rollout.slots = 64
    c.rollout.cache_tokens = 64 * 1536
    return c
