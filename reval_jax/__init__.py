"""reval_jax: off-policy value-based RL (ReVal) post-training of LLMs in JAX / Flax NNX.

The subpackages (model/, parallel/, data/, rollout/, objective/, run/, tools/, experiments/) each open
with a map of their files; docs/architecture.md is the one-page map. Commands: `python -m
reval_jax.{train,evaluate,export,plot,scale}` (kept names of run/ and tools/ modules).

Public names: `load_hf` / `save_hf` (Hugging Face directories), `generate` (the rollout engine's front
door), `Decoder` (the decoder of every family; `Qwen2` is its kept alias), `create_model`, `Cache`,
`init_cache`, `ModelConfig` / `preset` / `PRESETS` (the model config, not the run config of
configs/*.py) and `make_mesh`. They are imported lazily, so that light modules (rewards, templates,
the model config) and the reward worker processes do not pay for importing jax and flax.
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
