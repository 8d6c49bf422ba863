"""The decoder of the Qwen2, Qwen3 and Llama 3 families in Flax NNX, with stacked (scanned) layers and
a KV-cache path.

    tokens [B, T] --embed--> x [B, T, D] --L x Block (lax.scan)--> RMSNorm --unembed--> logits [B, T, V]

Block = x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x)). Attention is grouped-query with RoPE and
no output bias. The family's switches (`ModelConfig`) add to it: q/k/v biases (`attention_bias`,
Qwen2), an RMSNorm over the head dim of every query and key head before RoPE (`qk_norm`, Qwen3),
Llama 3's scaled RoPE frequencies (`rope_scaling`); a parameter a family lacks is not created
(`layer_param_names`). Layer parameters carry a leading `layers` axis and one `lax.scan` runs them
all, so compile time does not grow with depth; each step can be rematerialised (`ModelConfig.remat`).
Logits are always float32, whatever the compute dtype. `Decoder` is the class of every family;
`Qwen2` is its historical name, kept as an alias (the same class).

Padding: `mask [B, T]` marks real tokens; positions default to `cumsum(mask) - 1`, so left- and
right-padded batches give the same logits at real tokens. Packing: `segment_ids [B, T]` (1, 2, ...;
0 = padding) with per-segment `positions` put several sequences in one row; none attends to another.
Attention is `reval_jax.model.attention.attention` with `ModelConfig.attention` (docs/attention.md).
Decoding: `init_cache` preallocates a `Cache`; calling the model with `cache=` writes the new
keys/values at slot `cache.index` and attends to every valid slot at or before each query's own slot
(prefill through the configured kernel, short decode steps through einsum over the cache).
Low-rank adapters (`reval_jax.model.lora`, docs/lora.md) hook in at two places: `layer_params`
adds a model's adapter arrays to the per-layer dict, and `_project` adds the rank-r path to a
projection that has one; a model without adapters computes exactly as it would without the hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from reval_jax.model.attention import SegmentMask, attention
from reval_jax.model.config import ModelConfig, RopeScaling
from reval_jax.parallel.sharding import constrain

Array = jax.Array
DECODE_EINSUM_MAX_T = 16  # cached steps of at most this many tokens attend by einsum over the cache

# name -> (shape, logical axes, init[, the ModelConfig switch that creates it]) of each stacked
# layer parameter; shapes use the alphabet. A parameter with a switch exists only where it is on.
LAYER_PARAMS = {
    "attn_norm": ("LD", ("layers", "norm"), "ones"),
    "q_proj": ("LDNH", ("layers", "embed", "heads", "head_dim"), "normal"),
    "q_bias": ("LNH", ("layers", "heads", "head_dim"), "zeros", "attention_bias"),
    "q_norm": ("LH", ("layers", "head_dim"), "ones", "qk_norm"),
    "k_proj": ("LDKH", ("layers", "embed", "kv_heads", "head_dim"), "normal"),
    "k_bias": ("LKH", ("layers", "kv_heads", "head_dim"), "zeros", "attention_bias"),
    "k_norm": ("LH", ("layers", "head_dim"), "ones", "qk_norm"),
    "v_proj": ("LDKH", ("layers", "embed", "kv_heads", "head_dim"), "normal"),
    "v_bias": ("LKH", ("layers", "kv_heads", "head_dim"), "zeros", "attention_bias"),
    "o_proj": ("LNHD", ("layers", "heads", "head_dim", "embed"), "normal"),
    "mlp_norm": ("LD", ("layers", "norm"), "ones"),
    "gate_proj": ("LDF", ("layers", "embed", "mlp"), "normal"),
    "up_proj": ("LDF", ("layers", "embed", "mlp"), "normal"),
    "down_proj": ("LFD", ("layers", "mlp", "embed"), "normal"),
}

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_param_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The LAYER_PARAMS entries this config has, in table order (Qwen2: the q/k/v biases; Qwen3:
    q_norm and k_norm; Llama: neither)."""
    return tuple(
        name for name, spec in LAYER_PARAMS.items() if len(spec) < 4 or getattr(cfg, spec[3])
    )


def dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "L": cfg.num_layers, "D": cfg.hidden_size, "N": cfg.num_heads, "K": cfg.num_kv_heads,
        "H": cfg.head_dim, "F": cfg.intermediate_size, "V": cfg.vocab_size,
    }


def lora_keys(name: str) -> tuple[str, str]:
    """The per-layer dict keys of the low-rank adapter of projection `name`: (A, B)."""
    return f"{name}.lora_a", f"{name}.lora_b"


LORA_SCALE = "lora.scale"  # the per-layer dict key of the adapter scale s (a scalar per layer)


def _project(eq: str, x: Array, p: dict[str, Array], name: str) -> Array:
    """x times the projection `name` of p by the einsum `eq` ("<x>,<w>-><y>", w's input dims
    first), in x's dtype. With a low-rank adapter on `name` (`lora_keys`; model/lora.py), plus
    (s·(x·A))·B: A [in..., R] and B [R, out...], so the rank-R path is two thin einsums and the
    merged weight W + s·A·B is never formed; s = 0 (adapter off) adds exact zeros."""
    dt = x.dtype
    y = jnp.einsum(eq, x, p[name].astype(dt))
    a_key, b_key = lora_keys(name)
    if a_key not in p:
        return y
    lhs, ys = eq.split("->")
    xs, ws = lhs.split(",")
    w_in = "".join(c for c in ws if c in xs)
    w_out, rows = ws[len(w_in):], "".join(c for c in xs if c not in ws)
    xa = jnp.einsum(f"{xs},{w_in}R->{rows}R", x, p[a_key].astype(dt)) * p[LORA_SCALE].astype(dt)
    return y + jnp.einsum(f"{rows}R,R{w_out}->{ys}", xa, p[b_key].astype(dt))


def _init(kind: str, rng: nnx.Rngs, shape: tuple[int, ...], dtype) -> Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(rng.params(), shape, jnp.float32)).astype(dtype)


@flax.struct.dataclass
class Cache:
    """Preallocated keys/values of every layer, and which slots hold real tokens."""

    k: Array  # [L, B, S, K, H]
    v: Array  # [L, B, S, K, H]
    valid: Array  # [B, S] bool
    index: Array  # [] int32, next slot to write


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    dtype = dtype or cfg.dtype
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return Cache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32),
    )


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 as in Hugging Face."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_frequencies(H: int, theta: float, scaling: RopeScaling | None = None) -> Array:
    """The H/2 rotary frequencies f_j = theta^(-2j/H), float32 as in Hugging Face.

    With Llama 3's `scaling` (transformers' `_compute_llama3_parameters`): wavelength λ_j = 2π/f_j,
    s = factor, C = original_max_position_embeddings, λ_lo = C / low_freq_factor, λ_hi = C /
    high_freq_factor; f_j is kept where λ_j < λ_hi, becomes f_j / s where λ_j > λ_lo, and in
    between (1 - a_j) f_j / s + a_j f_j with a_j = (C / λ_j - low_freq_factor) /
    (high_freq_factor - low_freq_factor)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))  # [H/2]
    if scaling is None:
        return inv_freq
    s, C = scaling.factor, scaling.original_max_position_embeddings
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [H/2]
    scaled = jnp.where(wavelen > C / lo, inv_freq / s, inv_freq)
    a = (C / wavelen - lo) / (hi - lo)
    smoothed = (1 - a) * scaled / s + a * scaled
    medium = ~(wavelen < C / hi) & ~(wavelen > C / lo)
    return jnp.where(medium, smoothed, scaled)


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary embedding, half-split layout of Hugging Face. x [B, T, n, H], positions [B, T];
    frequencies from `rope_frequencies`."""
    H = x.shape[-1]
    inv_freq = rope_frequencies(H, theta, scaling)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]  # [B, T, 1, H]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _qkv(h: Array, p: dict[str, Array], cfg: ModelConfig) -> tuple[Array, Array, Array]:
    """Query, key and value heads of h [B, T, D], before RoPE: q = h W_q (+ b_q), likewise k and v;
    with `qk_norm` (Qwen3) q and k are then RMS-normalised over H, head by head, as in
    transformers' Qwen3Attention (norm of the projection, then RoPE)."""
    dt = h.dtype
    q = _project("BTD,DNH->BTNH", h, p, "q_proj")
    k = _project("BTD,DKH->BTKH", h, p, "k_proj")
    v = _project("BTD,DKH->BTKH", h, p, "v_proj")
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if cfg.qk_norm:  # weights [H], broadcast over B, T and the heads
        q = rms_norm(q, p["q_norm"].astype(dt), cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"].astype(dt), cfg.rms_norm_eps)
    return q, k, v


def _block(
    x: Array, p: dict[str, Array], kv: tuple[Array | None, Array | None], layer: Array, *,
    cfg: ModelConfig, mesh: Mesh | None, positions: Array, attend,
):
    """One decoder layer on x [B, T, D]; p holds this layer's slice of LAYER_PARAMS. `attend(q, k,
    v, k_cache, v_cache, layer) -> (out [B, T, N, H], k_cache, v_cache)` is the attention of this
    call (plain, contiguous KV cache, or the rollout engine's paged cache); the caches kv = (k, v),
    when given, are the stacked ones of every layer and travel through it. Returns (x, k, v)."""
    dt = x.dtype

    h = rms_norm(x, p["attn_norm"].astype(dt), cfg.rms_norm_eps)
    q, k, v = _qkv(h, p, cfg)  # [B, T, N, H], [B, T, K, H], [B, T, K, H]
    q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
    k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
    q = constrain(q, mesh, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, mesh, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, mesh, ("act_batch", "act_length", "act_kv_heads", None))
    out, k_cache, v_cache = attend(q, k, v, *kv, layer)  # [B, T, N, H]
    x = x + _project("BTNH,NHD->BTD", out, p, "o_proj")
    x = constrain(x, mesh, ("act_batch", "act_length", "act_embed"))

    h = rms_norm(x, p["mlp_norm"].astype(dt), cfg.rms_norm_eps)
    gate = _project("BTD,DF->BTF", h, p, "gate_proj")
    up = _project("BTD,DF->BTF", h, p, "up_proj")
    hidden = constrain(jax.nn.silu(gate) * up, mesh, ("act_batch", "act_length", "act_mlp"))
    x = x + _project("BTF,FD->BTD", hidden, p, "down_proj")
    x = constrain(x, mesh, ("act_batch", "act_length", "act_embed"))
    return x, k_cache, v_cache


@dataclasses.dataclass(frozen=True)
class _Attend:
    """The `attend` hook of `hidden_states`: attention without a cache, or over a contiguous `Cache`
    (`mask.q_offset` = the cache index, where this step's keys/values are written)."""

    cfg: ModelConfig
    mesh: Mesh | None
    mask: SegmentMask

    def __call__(self, q, k, v, k_cache, v_cache, layer):
        """This step's keys/values are written at [layer, :, index] in place (a decode step writes
        its T slots, it never copies the cache) and the queries attend over all S slots."""
        cfg, T, dt = self.cfg, q.shape[1], q.dtype
        if k_cache is not None:
            at = (layer, 0, self.mask.q_offset, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
            k = jax.lax.dynamic_index_in_dim(k_cache, layer, keepdims=False).astype(dt)  # [B, S, K, H]
            v = jax.lax.dynamic_index_in_dim(v_cache, layer, keepdims=False).astype(dt)
        # training and prefill: the configured kernel; a short decode step: einsum, scores [B, N, T, S]
        impl = "einsum" if k_cache is not None and T <= DECODE_EINSUM_MAX_T else cfg.attention
        out = attention(q, k, v, self.mask, implementation=impl, mesh=self.mesh, block_q=cfg.attention_block,
                        block_kv=cfg.attention_block)
        return out, k_cache, v_cache


class Decoder(nnx.Module):
    """Causal LM of any family of `config.FAMILIES` (`Qwen2` is the same class under its historical
    name). `model(tokens [B, T]) -> logits [B, T, V]` (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh
        d = dims(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(_init("normal", rngs, (d["V"], d["D"]), pdt), axes=("vocab", "embed"))
        for name in layer_param_names(cfg):
            shape, axes, kind = LAYER_PARAMS[name][:3]
            value = _init(kind, rngs, tuple(d[c] for c in shape), pdt)
            setattr(self, name, nnx.Param(value, axes=axes))
        self.final_norm = nnx.Param(jnp.ones((d["D"],), pdt), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_init("normal", rngs, (d["D"], d["V"]), pdt), axes=("embed", "vocab"))

    def layer_params(self) -> dict[str, Array]:
        """The stacked arrays `run_layers` scans over: LAYER_PARAMS, plus the adapters' arrays
        (`lora_keys`, LORA_SCALE) on a model that `lora.add_adapters` gave an `adapters` module."""
        p = {name: getattr(self, name)[...] for name in layer_param_names(self.cfg)}
        adapters = getattr(self, "adapters", None)
        return p if adapters is None else {**p, **adapters.layer_params()}

    def hidden_states(
        self, tokens: Array, *, positions: Array | None = None, mask: Array | None = None,
        segment_ids: Array | None = None, cache: Cache | None = None, max_segment_len: int = 0,
    ) -> tuple[Array, Cache | None]:
        """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache.

        segment_ids [B, T] int32 (0 = padding) packs several sequences per row: a token attends
        only to earlier tokens of its own segment; pass per-segment positions with them. Without
        them the segments are `mask` (one per row). With a cache, keys are the valid slots.
        `max_segment_len` > 0 promises no segment is longer: attention then reads only the keys a
        query block can reach (attention.banding), the same result for less work on packed rows."""
        cfg, mesh = self.cfg, self.mesh
        B, T = tokens.shape
        mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are not supported with a KV cache")
        if positions is None:
            start = 0 if cache is None else jnp.sum(cache.valid, axis=-1, keepdims=True)
            positions = start + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        positions = positions.astype(jnp.int32)

        if cache is None:  # causal over this call's tokens, within each segment
            q_seg = mask.astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            kv_seg, index = q_seg, None
        else:  # queries sit at slots index..index+T-1 of the cache; keys are its valid slots
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
            q_seg, kv_seg = mask.astype(jnp.int32), valid.astype(jnp.int32)  # [B, T], [B, S]

        segments = SegmentMask(q_seg, kv_seg, q_offset=0 if index is None else index, max_segment_len=max_segment_len)
        attend = _Attend(cfg, mesh, segments)
        kv = (None, None) if cache is None else (cache.k, cache.v)
        x, (k, v) = self.run_layers(self.embed_tokens(tokens), positions, attend, kv)
        if cache is not None:
            cache = Cache(k=k, v=v, valid=valid, index=index + T)
        return x, cache

    def embed_tokens(self, tokens: Array) -> Array:
        """tokens [B, T] -> x [B, T, D] in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, self.mesh, ("act_batch", "act_length", "act_embed"))

    def run_layers(self, x: Array, positions: Array, attend, kv=(None, None)):
        """Every layer (one lax.scan, unrolled unless `cfg.scan_layers`) on x [B, T, D] at `positions`
        [B, T], then the final norm.
        `attend` is the attention of `_block`; kv = the stacked (k, v) caches it updates, carried
        through the scan so that XLA updates them in place. Returns (h [B, T, D], (k, v))."""
        cfg = self.cfg
        block = functools.partial(_block, cfg=cfg, mesh=self.mesh, positions=positions, attend=attend)

        def step(carry, layer):
            x, kc, vc = carry
            p, i = layer
            return block(x, p, (kc, vc), i), None

        if cfg.remat != "none":
            step = jax.checkpoint(step, policy=REMAT[cfg.remat], prevent_cse=False)
        layers = (self.layer_params(), jnp.arange(cfg.num_layers))
        (x, k, v), _ = jax.lax.scan(step, (x, *kv), layers, unroll=not cfg.scan_layers)
        x = rms_norm(x, self.final_norm[...].astype(x.dtype), cfg.rms_norm_eps)
        return x, (k, v)

    def unembed_weight(self) -> Array:
        """The unembedding [D, V] in the compute dtype, gathered over the FSDP axis (vocabulary
        still split over `tensor`): callers that unembed many chunks take it once, outside the
        loop, so the weight is not re-gathered for every chunk."""
        return constrain(self._unembed_matrix(), self.mesh, ("act_embed", "act_vocab"))

    def _unembed_matrix(self) -> Array:
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]  # [D, V]
        return w.astype(jnp.dtype(self.cfg.dtype))

    def unembed(self, h: Array, w: Array | None = None) -> Array:
        """Logits [..., V] in float32 from hidden states [..., D] (`w`: a prefetched
        `unembed_weight()`)."""
        w = self._unembed_matrix() if w is None else w
        logits = jnp.einsum("...D,DV->...V", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, self.mesh, ("act_batch", "act_length", "act_vocab"))
        return logits

    def __call__(
        self, tokens: Array, *, positions: Array | None = None, mask: Array | None = None,
        segment_ids: Array | None = None, cache: Cache | None = None,
    ):
        """logits [B, T, V] float32; with `cache`, returns (logits, updated cache)."""
        h, new_cache = self.hidden_states(
            tokens, positions=positions, mask=mask, segment_ids=segment_ids, cache=cache
        )
        logits = self.unembed(h)
        return logits if cache is None else (logits, new_cache)


Qwen2 = Decoder  # the historical name of the class, kept: users and other modules import it


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Decoder:
    """A randomly initialised model. With a mesh, each parameter is created directly in its sharded
    layout (jit with out_shardings), never whole on one device; the values do not depend on the mesh."""
    from reval_jax.parallel.sharding import state_shardings

    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed), mesh=mesh))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None if mesh is None else state_shardings(abstract_state, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed), mesh=mesh))

    return nnx.merge(graphdef, init())
