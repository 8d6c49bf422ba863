"""The model config: `ModelConfig`, one frozen dataclass for every supported decoder family, named
presets, and the mapping to and from Hugging Face `config.json`.

The model config says what a network is (shapes, numerics, family switches). It is not the run
config: that is the `ml_collections.ConfigDict` of `configs/*.py` (`configs/base.py` documents every
field), which says what a training run does and names its model through `config.model`.

Families (`FAMILIES`): Qwen2 (q/k/v biases), Qwen3 (per-head RMSNorm of q and k, no biases) and
Llama 3 (no biases, RoPE frequencies scaled by `rope_scaling`). One decoder implements them all;
the family's switches are fields of `ModelConfig` (`attention_bias`, `qk_norm`, `rope_scaling`) and
`family` names the Hugging Face architecture it exports to.

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
class Family:
    """What a Hugging Face `model_type` is in our switches."""

    architecture: str  # the `architectures` entry of its config.json
    attention_bias: bool  # q/k/v projections carry biases (no output bias in any family we run)
    qk_norm: bool  # RMSNorm over the head dim of each query and key head, before RoPE


FAMILIES: dict[str, Family] = {
    "qwen2": Family("Qwen2ForCausalLM", attention_bias=True, qk_norm=False),
    "qwen3": Family("Qwen3ForCausalLM", attention_bias=False, qk_norm=True),
    "llama": Family("LlamaForCausalLM", attention_bias=False, qk_norm=False),
}


def family_switches(family: str) -> dict[str, Any]:
    """The ModelConfig fields that make `family`: `preset("tiny", **family_switches("qwen3"))`."""
    if family not in FAMILIES:
        raise UserError(f"family={family!r}: expected one of {sorted(FAMILIES)}")
    f = FAMILIES[family]
    return {"family": family, "attention_bias": f.attention_bias, "qk_norm": f.qk_norm}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (`rope_type` "llama3", `model.rope_frequencies`): with
    wavelength λ = 2π / f of each frequency f, high frequencies (λ < original / high_freq_factor)
    are kept, low ones (λ > original / low_freq_factor) divided by `factor`, and the band between
    interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise UserError(f"rope_scaling.rope_type={self.rope_type!r}: only 'llama3' is implemented")
        if not self.high_freq_factor > self.low_freq_factor > 0 or self.factor < 1:
            raise UserError(
                f"rope_scaling {self}: needs high_freq_factor > low_freq_factor > 0 and factor >= 1"
            )
        if self.original_max_position_embeddings < 1:
            raise UserError(f"rope_scaling {self}: original_max_position_embeddings must be >= 1")

    def to_hf(self) -> dict[str, Any]:
        return {
            "rope_type": self.rope_type, "factor": self.factor, "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes, numerics and family switches of a decoder. The defaults are Qwen2's."""

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
    scan_layers: bool = True  # one lax.scan over the layers; False unrolls it (compile time grows with depth)
    attention: str = "auto"  # attention kernel of training and prefill, one of ATTENTION
    attention_block: int = 512  # query and key block of the chunked kernel (docs/attention.md)
    family: str = "qwen2"  # a FAMILIES key: the HF architecture of export; the switches must match it
    attention_bias: bool = True  # q/k/v biases (q_bias, k_bias, v_bias)
    qk_norm: bool = False  # per-head RMSNorm of q and k over H (q_norm, k_norm)
    rope_scaling: RopeScaling | None = None  # Llama 3 frequency scaling; None = plain RoPE

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"family={self.family!r}: expected one of {sorted(FAMILIES)}")
        expected = family_switches(self.family)
        for name in ("attention_bias", "qk_norm"):
            if getattr(self, name) != expected[name]:
                raise UserError(
                    f"{name}={getattr(self, name)} does not exist in family {self.family!r} (it has "
                    f"{name}={expected[name]}); use config.family_switches({self.family!r})"
                )
        if isinstance(self.rope_scaling, dict):  # e.g. a preset override from the command line
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
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
        attn = D * N * H + 2 * D * K * H + N * H * D
        if self.attention_bias:
            attn += N * H + 2 * K * H
        if self.qk_norm:
            attn += 2 * H
        layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + D


# Named presets. The 1.5B / 7B / 8B entries carry the real shapes of the public checkpoints.
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
    "qwen3-1.7b": ModelConfig(
        vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
        max_position_embeddings=40_960, tie_word_embeddings=True, **family_switches("qwen3"),
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
        max_position_embeddings=40_960, tie_word_embeddings=False, **family_switches("qwen3"),
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        max_position_embeddings=131_072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        **family_switches("llama"),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads")


def _family(hf: dict[str, Any], source: str) -> str:
    """The FAMILIES key of a config.json, or a UserError naming what is not supported."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in FAMILIES or (archs and FAMILIES[model_type].architecture not in archs):
        raise UserError(
            f"{source}: unsupported model (model_type={model_type!r}, architectures={archs}); "
            f"reval_jax supports model_type {SUPPORTED_MODEL_TYPES} / architectures "
            f"{SUPPORTED_ARCHITECTURES}. See docs/adding_a_model_family.md to add another."
        )
    return model_type


def _check_unsupported(hf: dict[str, Any], family: str, source: str) -> None:
    """Refuses the config.json switches our decoder does not implement, naming the field."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if family != "qwen2" and hf.get("attention_bias"):
        raise UserError(
            f"{source}: attention_bias=true is not supported for model_type {family!r} (q/k/v/o "
            "biases); reval_jax implements this family without biases"
        )
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true is not supported (MLP projections without bias)")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported")
    sliding = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
    if sliding:
        raise UserError(f"{source}: layer_types {sliding} are not supported (only full_attention)")
    if hf.get("pretraining_tp", 1) != 1:
        raise UserError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from either spelling: `rope_theta` + `rope_scaling` (transformers
    4.x files, e.g. Llama-3.1-8B's) or `rope_parameters` (transformers 5.x, which holds the theta)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10_000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: {field}.partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(
            f"{source}: {field} rope_type={rope_type!r} is not supported (only 'default' and "
            "'llama3'); see docs/adding_a_model_family.md"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise UserError(f"{source}: {field} of rope_type 'llama3' lacks {missing}")
    return theta, RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
    """Maps a Hugging Face `config.json` dict onto a ModelConfig, refusing what we do not implement."""
    family = _family(hf, source)
    _check_unsupported(hf, family, source)
    missing = [k for k in REQUIRED_HF_FIELDS if k not in hf]
    if missing:
        raise UserError(f"{source}: missing required fields {missing}")
    num_heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = _rope(hf, source)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 32_768),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **family_switches(family),
        **overrides,
    )


def to_hf_config(cfg: ModelConfig, *, torch_dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` of the family's HF architecture with our shapes. RoPE is written the
    transformers 4.x way (`rope_theta`, `rope_scaling` when set), which 5.x reads too. A Qwen2
    config is written exactly as before the other families existed (same keys, same order)."""
    scaling = {} if cfg.rope_scaling is None else {"rope_scaling": cfg.rope_scaling.to_hf()}
    switches = {
        "qwen2": {"use_sliding_window": False},  # q/k/v biases always on: no attention_bias field
        "qwen3": {"use_sliding_window": False, "attention_bias": False},
        "llama": {"attention_bias": False, "mlp_bias": False},
    }[cfg.family]
    return {
        "architectures": [FAMILIES[cfg.family].architecture],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        **scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        **switches,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype or cfg.param_dtype,
    }
