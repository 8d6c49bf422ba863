"""reval_jax: off-policy value-based RL (ReVal) post-training of LLMs in JAX / Flax NNX."""

from reval_jax.config import PRESETS, ModelConfig, preset
from reval_jax.hf import load_hf, save_hf
from reval_jax.model import Cache, Qwen2, create_model, init_cache
from reval_jax.sharding import make_mesh

__all__ = [
    "PRESETS", "Cache", "ModelConfig", "Qwen2", "create_model", "init_cache", "load_hf",
    "make_mesh", "preset", "save_hf",
]
