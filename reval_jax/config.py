"""Model configuration: one frozen dataclass for the Qwen2 family, named presets, HF config mapping.

Dimension alphabet used across the package (einsum strings, shape comments, parameter names):
  B batch, T query length, S key length, D model, N query heads, K kv heads, G = N/K,
  H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reval_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "einsum", "chunked", "xla", "cudnn", "splash")  # = attention.IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Qwen2-architecture decoder."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype of activations; logits are always float32
    remat: str = "none"  # rematerialisation policy of each scanned layer, one of REMAT_POLICIES
    attention: str = "auto"  # attention kernel of training and prefill, one of ATTENTION
    attention_block: int = 512  # query and key block of the chunked kernel (docs/attention.md)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION:
            raise UserError(f"attention={self.attention!r}: expected one of {ATTENTION}")
        if self.attention_block < 1:
            raise UserError(f"attention_block={self.attention_block} must be >= 1")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"{name}={getattr(self, name)!r}: expected one of {DTYPES}")

    @property
    def num_groups(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        D, F, V, H = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        N, K = self.num_heads, self.num_kv_heads
        attn = D * N * H + 2 * D * K * H + N * H + 2 * K * H + N * H * D
        layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + D


# Named presets. The 1.5B / 7B entries carry the real shapes of the public checkpoints.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rope_theta=10_000.0, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    # The benchmark model of the sampler and train-step issues.
    "bench": ModelConfig(
        vocab_size=32_000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
        num_kv_heads=4, head_dim=64, max_position_embeddings=4096,
    ),
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
        max_position_embeddings=32_768, tie_word_embeddings=True,
    ),
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10_000.0,
        max_position_embeddings=131_072, tie_word_embeddings=False,
    ),
    "qwen2.5-math-7b": ModelConfig(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=10_000.0,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
    """Maps a Hugging Face `config.json` dict onto a ModelConfig, refusing what we do not implement."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or (
        archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)
    ):
        raise UserError(
            f"{source}: unsupported model (model_type={model_type!r}, architectures={archs}); "
            f"reval_jax supports model_type {SUPPORTED_MODEL_TYPES} / architectures "
            f"{SUPPORTED_ARCHITECTURES}. See docs/adding_a_model_family.md to add another."
        )
    if hf.get("rope_scaling"):
        raise UserError(f"{source}: rope_scaling={hf['rope_scaling']} is not supported yet")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported")
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
        if k not in hf
    ]
    if missing:
        raise UserError(f"{source}: missing required fields {missing}")
    num_heads = hf["num_attention_heads"]
    rope_params = hf.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(hf.get("rope_theta", rope_params.get("rope_theta", 10_000.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 32_768),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **overrides,
    )


def to_hf_config(cfg: ModelConfig, *, torch_dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` of a Qwen2ForCausalLM with our shapes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype or cfg.param_dtype,
    }
