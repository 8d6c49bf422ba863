"""reval_jax: off-policy value-based RL (ReVal) post-training of LLMs in JAX / Flax NNX.

The public names below are imported lazily, so that light modules (rewards, data, templates) and the
reward worker processes do not pay for importing jax and flax.
"""

import importlib

_PUBLIC = {
    "PRESETS": "reval_jax.model.config",
    "ModelConfig": "reval_jax.model.config",
    "preset": "reval_jax.model.config",
    "generate": "reval_jax.rollout.sampler",
    "load_hf": "reval_jax.model.hf",
    "save_hf": "reval_jax.model.hf",
    "Cache": "reval_jax.model.decoder",
    "Decoder": "reval_jax.model.decoder",
    "Qwen2": "reval_jax.model.decoder",
    "create_model": "reval_jax.model.decoder",
    "init_cache": "reval_jax.model.decoder",
    "make_mesh": "reval_jax.parallel.sharding",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'reval_jax' has no attribute {name!r}")
