"""Shared tiny models for tests: random `transformers` checkpoints of each family (Qwen2, Qwen3,
Llama 3) saved as HF directories, and our own tiny models. Everything is built locally and cached
for the whole test session."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

VOCAB = 128
_ROOT = Path(tempfile.mkdtemp(prefix="reval_jax_models_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


FAMILIES = ("qwen2", "qwen3", "llama")
# Llama 3 frequency scaling with every band present at head_dim 16, theta 1e4 (wavelengths 2π·10^(j/2)
# = 6.3, 19.9, 62.8, ...): high (λ < 32/4 = 8), medium (8..32) and low (λ > 32, divided by 8).
# The shortest wavelength of any RoPE is 2π, so original / high_freq_factor must exceed it.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
LONG = 48  # sequence length of the family tests: positions past every band's wavelength scale


def hf_config(*, num_kv_heads: int = 2, tie: bool = False, layers: int = 2, vocab: int = VOCAB,
              family: str = "qwen2"):
    """A tiny `transformers` config of `family`. Qwen2 keeps head_dim = hidden / heads = 8; Qwen3
    and Llama have an explicit head_dim of 16 (N·H = 64 != D = 32, as in Qwen3-0.6B); Llama uses
    the llama3 RoPE scaling `LLAMA3_ROPE` and rms eps 1e-5."""
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
        rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
    )
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if family == "llama":
        return transformers.LlamaConfig(**{**common, "rms_norm_eps": 1e-5}, head_dim=16,
                                        rope_scaling=dict(LLAMA3_ROPE), bos_token_id=None,
                                        eos_token_id=None)  # as the Qwen configs: no stop in generate
    raise ValueError(family)


@functools.cache
def hf_model(*, num_kv_heads: int = 2, tie: bool = False, layers: int = 2, seed: int = 0,
             vocab: int = VOCAB, family: str = "qwen2"):
    """A random `transformers` causal LM of `family` (float32, eval mode) with weights large enough
    (std 0.2, norms around 1) that the logits are far from trivial."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(num_kv_heads=num_kv_heads, tie=tie, layers=layers, vocab=vocab, family=family)
    cls = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    model = getattr(transformers, cls[family])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


@functools.cache
def hf_dir(*, num_kv_heads: int = 2, tie: bool = False, layers: int = 2, seed: int = 0,
           max_shard_size: str | None = None, tokenizer: bool = False, vocab: int = VOCAB,
           family: str = "qwen2") -> Path:
    """`hf_model(...)` saved with `save_pretrained` (optionally sharded) plus the tiny tokenizer."""
    name = (f"hf_{family}_kv{num_kv_heads}_tie{int(tie)}_l{layers}_s{seed}_{max_shard_size}_"
            f"{int(tokenizer)}_v{vocab}")
    path = _ROOT / name
    model = hf_model(num_kv_heads=num_kv_heads, tie=tie, layers=layers, seed=seed, vocab=vocab,
                     family=family)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    if tokenizer:
        from helpers import tiny_tokenizer

        tiny_tokenizer().save_pretrained(str(path))
    return path


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(layout: str, *, batch: int = 3, length: int = 12, vocab: int = VOCAB, seed: int = 0):
    """tokens, mask, positions for a batch of sequences of different lengths laid out with
    `layout` in {"none", "left", "right"} padding."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, length))
    mask = np.ones((batch, length), bool)
    if layout != "none":
        for b, n in enumerate(rng.randint(length // 3, length, batch)):
            if layout == "left":
                mask[b, : length - n] = False
            else:
                mask[b, n:] = False
        mask[0] = True  # one full-length row
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return tokens, mask, positions


@functools.cache
def tiny_model(seed: int = 0, **overrides):
    """Our own randomly initialised `preset("tiny")` model, created once per session. Shared: do not
    modify it in place (split it and work on the state instead)."""
    import reval_jax
    from reval_jax.model.config import preset

    return reval_jax.create_model(preset("tiny", **overrides), seed=seed)


def tokenizer_model_dir() -> Path:
    """A tiny random Qwen2 with the project's char tokenizer (vocabulary sized to match)."""
    from helpers import tiny_tokenizer

    return hf_dir(tokenizer=True, vocab=len(tiny_tokenizer()), tie=True)
