"""Low-rank adapters (LoRA) on the stacked decoder: the policy is W + s·A·B with the base W frozen.

    add_adapters(model, LoraConfig(rank=r, alpha=α))  ->  model.adapters: per target projection
        A [L, in..., r]  LoraParam, uniform ±1/sqrt(fan_in) (PEFT's default: Kaiming-uniform, a = √5)
        B [L, r, out...] LoraParam, zeros               (so the adapted model starts equal to the base)
        s []             LoraScale, α/r                  (0: the adapter is off, the model is the base)

    forward (decoder._project): x·W + (s·(x·A))·B   -- the merged weight is never formed
    merge(model):               W <- W + (α/r)·A·B in W's dtype, B <- 0 (A kept); MergeStats

ReVal's use (ALGORITHMS.md, "Low-rank adapters"): the reference policy is the base with the adapter
off, i.e. the same state with s = 0 (`with_adapter_scale(state, 0.0)`): the same compiled forward
program with a different argument, so π_θ = π_ref holds bit for bit whenever B = 0 (after `add_adapters`
and after every `merge`) and calibrated initialisation stays exact. A reference reset is a merge.

Shapes follow the projection: W [L, in..., out...] (q_proj [L, D, N, H], o_proj [L, N, H, D], down_proj
[L, F, D], ...) gives A the base's `layers` and input axes and B its `layers` and output axes, so the
adapters shard like their base weight (sharding.RULES) and the rank axis is replicated. A and B are
`LoraParam` (a subclass of nnx.Param): `nnx.state(model, LoraParam)` is what an optimizer takes, and
`BASE` selects the frozen rest. Design and status: docs/lora.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from reval_jax.errors import UserError
from reval_jax.model.config import ModelConfig
from reval_jax.model.decoder import LAYER_PARAMS, LORA_SCALE, Decoder, dims, lora_keys
from reval_jax.parallel.sharding import constrain, state_shardings

Array = jax.Array

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the input dims of each target's weight, which come first after `layers` (LAYER_PARAMS' shape strings)
IN_DIMS = {"q_proj": "D", "k_proj": "D", "v_proj": "D", "o_proj": "NH", "gate_proj": "D", "up_proj": "D",
           "down_proj": "F"}


class LoraParam(nnx.Param):
    """An adapter matrix (A or B): the only parameters a LoRA run trains."""


class LoraScale(nnx.Variable):
    """The multiplier s of the adapter path: α/r for the policy, 0 for the base (the reference)."""


BASE = nnx.All(nnx.Param, nnx.Not(LoraParam))  # filter: the frozen base parameters


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank r and α of the adapters (scale α/r, as PEFT without rsLoRA), the projections that get
    one, and optionally the dtype the frozen base is stored in (e.g. "bfloat16"; None: unchanged)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    base_dtype: str | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"lora rank={self.rank} must be >= 1")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise UserError(f"lora targets={self.targets}: give each projection once, at least one")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise UserError(f"lora targets {unknown} are not projections; choose from {TARGETS}")
        if self.base_dtype is not None and not jnp.issubdtype(jnp.dtype(self.base_dtype), jnp.floating):
            raise UserError(f"lora base_dtype={self.base_dtype!r} must be a floating dtype (e.g. 'bfloat16')")

    @property
    def scale(self) -> float:
        """s = α/r, the factor of A·B in the policy's effective weight."""
        return self.alpha / self.rank


def _adapter_layout(name: str, cfg: ModelConfig, rank: int):
    """((A shape, A axes), (B shape, B axes)) of the adapter of projection `name`: A takes the
    base's layers and input axes plus the rank, B the rank plus the base's output axes; the rank
    axis has no logical name (replicated)."""
    letters, axes = LAYER_PARAMS[name][:2]  # e.g. "LDNH", ("layers", "embed", "heads", "head_dim")
    n_in = len(IN_DIMS[name])
    assert letters[1:1 + n_in] == IN_DIMS[name], (name, letters)
    d = dims(cfg)
    shape = tuple(d[c] for c in letters)
    a = ((shape[0], *shape[1:1 + n_in], rank), (axes[0], *axes[1:1 + n_in], None))
    b = ((shape[0], rank, *shape[1 + n_in:]), (axes[0], None, *axes[1 + n_in:]))
    return a, b


class Adapters(nnx.Module):
    """The adapters of one model: `<target>_a`, `<target>_b` (LoraParam) for each target and the
    scale (LoraScale). A decoder with an `adapters` attribute adds `layer_params()` to the arrays
    its layers scan over (decoder.Decoder.layer_params)."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig, *, rngs: nnx.Rngs):
        self.config = lora
        pdt = jnp.dtype(cfg.param_dtype)
        for name in lora.targets:
            (a_shape, a_axes), (b_shape, b_axes) = _adapter_layout(name, cfg, lora.rank)
            bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))  # 1/sqrt(fan_in) of one layer's A
            a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
            setattr(self, f"{name}_a", LoraParam(a.astype(pdt), axes=a_axes))
            setattr(self, f"{name}_b", LoraParam(jnp.zeros(b_shape, pdt), axes=b_axes))
        self.scale = LoraScale(jnp.asarray(lora.scale, jnp.float32))

    def layer_params(self) -> dict[str, Array]:
        """Each target's A and B under `decoder.lora_keys`, and s broadcast over the layers
        (LORA_SCALE) so that the layer scan hands every layer the same scalar."""
        out = {}
        for name in self.config.targets:
            a_key, b_key = lora_keys(name)
            out[a_key], out[b_key] = getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...]
        layers = out[lora_keys(self.config.targets[0])[0]].shape[0]
        out[LORA_SCALE] = jnp.broadcast_to(self.scale[...], (layers,))
        return out


def add_adapters(model: Decoder, lora: LoraConfig, seed: int = 0) -> Decoder:
    """Gives `model` (in place; also returned) the adapters of `lora`, initialised from `seed`, B = 0,
    s = α/r; with `lora.base_dtype`, the base parameters are cast to it first. On a model with a mesh
    the adapters are created directly in their sharded layout (as `create_model` does)."""
    if getattr(model, "adapters", None) is not None:
        raise UserError("the model already has adapters: merge them or start from the base model")
    cfg, mesh = model.cfg, model.mesh
    make = lambda: Adapters(cfg, lora, rngs=nnx.Rngs(seed))  # noqa: E731 (the Rngs are made inside each trace)
    if mesh is None:
        adapters = make()
    else:
        graphdef, abstract = nnx.split(nnx.eval_shape(make))
        state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh))()
        adapters = nnx.merge(graphdef, state)
    if lora.base_dtype is not None:
        _cast_base(model, jnp.dtype(lora.base_dtype))
    model.adapters = adapters
    return model


def _cast_base(model: Decoder, dtype: jnp.dtype) -> None:
    """Every floating base parameter of `model` stored in `dtype` (sharding kept)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not isinstance(node, LoraParam):
            if jnp.issubdtype(node[...].dtype, jnp.floating):
                node.set_value(node[...].astype(dtype))


def lora_config(model: Decoder) -> LoraConfig | None:
    """The LoraConfig of a model's adapters; None for a model without."""
    adapters = getattr(model, "adapters", None)
    return None if adapters is None else adapters.config


def set_adapter_scale(model: Decoder, value: float) -> None:
    """s <- value in place (α/r: the policy; 0: the base)."""
    _adapters(model).scale.set_value(jnp.asarray(value, jnp.float32))


def with_adapter_scale(state: nnx.State, value: float | Array) -> nnx.State:
    """The model state `state` with its adapter scale s set to `value`, every other leaf shared
    (not copied). `with_adapter_scale(params, 0.0)` is the reference of a LoRA run: a forward
    program jitted over the state computes the policy and the reference with one compilation."""

    def one(v):
        if isinstance(v, LoraScale):
            return v.replace(jnp.full_like(v.get_value(), value))
        return v

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _adapters(model: Decoder) -> Adapters:
    adapters = getattr(model, "adapters", None)
    if adapters is None:
        raise UserError("the model has no adapters (lora.add_adapters)")
    return adapters


@flax.struct.dataclass
class MergeStats:
    """What a merge did, per target projection (float32 scalars): `update` = max |(α/r)·A·B|, the
    change the merge meant to make; `rounding` = max |W_new - (W + (α/r)·A·B)|, the error of storing
    the sum in W's dtype (measured against the float32 sum: 0 for a float32 base; for a bfloat16
    base up to half a bfloat16 ulp of the largest changed entry)."""

    update: dict[str, Array]
    rounding: dict[str, Array]

    def metrics(self) -> dict[str, float]:
        """Host floats: the maxima over targets, then each target's."""
        out = {"lora/merge_update": max(float(v) for v in self.update.values()),
               "lora/merge_rounding": max(float(v) for v in self.rounding.values())}
        out.update({f"lora/merge_update/{k}": float(v) for k, v in self.update.items()})
        out.update({f"lora/merge_rounding/{k}": float(v) for k, v in self.rounding.items()})
        return out


def _layer_delta(a_l: Array, b_l: Array, scale: Array) -> Array:
    """scale·A·B of one layer in float32 at the highest matmul precision, whatever the platform's
    default: what a merge adds to W (and the sampler's merged copy holds)."""
    return scale * jnp.tensordot(a_l.astype(jnp.float32), b_l.astype(jnp.float32), axes=1,
                                 precision=jax.lax.Precision.HIGHEST)


@jax.jit
def merge_weight(w: Array, a: Array, b: Array, scale: Array) -> tuple[Array, Array, Array]:
    """W + scale·A·B stored in W's dtype, for stacked W [L, in..., out...], A [L, in..., r], B [L,
    r, out...]: (new W, max rounding, max |scale·A·B|) as in MergeStats. One layer at a time
    (lax.map), so the float32 update of one layer is the only temporary; float32 products at the
    highest matmul precision whatever the platform's default."""

    def one(wab):
        w_l, a_l, b_l = wab
        delta = _layer_delta(a_l, b_l, scale)  # [in..., out...]
        exact = w_l.astype(jnp.float32) + delta
        new = exact.astype(w_l.dtype)
        return new, jnp.max(jnp.abs(new.astype(jnp.float32) - exact)), jnp.max(jnp.abs(delta))

    new, rounding, update = jax.lax.map(one, (w, a, b))
    return new, jnp.max(rounding), jnp.max(update)


def merge(model: Decoder) -> MergeStats:
    """W <- W + (α/r)·A·B for every target (in W's dtype and sharding), then B <- 0; A and s are
    kept. Afterwards the policy (s = α/r) and the base (s = 0) are the same function, bit for bit
    through one compiled program. Works eagerly and inside a traced function (e.g. on
    `nnx.merge(graphdef, state)` in a jitted reference reset)."""
    adapters = _adapters(model)
    lora = adapters.config
    scale = jnp.asarray(lora.scale, jnp.float32)
    update, rounding = {}, {}
    for name in lora.targets:
        w, a, b = getattr(model, name), getattr(adapters, f"{name}_a"), getattr(adapters, f"{name}_b")
        new, rounding[name], update[name] = merge_weight(w[...], a[...], b[...], scale)
        w.set_value(constrain(new, model.mesh, w.get_metadata()["axes"]))
        b.set_value(jnp.zeros_like(b[...]))
    return MergeStats(update=update, rounding=rounding)


# ----------------------------------------------------------------------------- a LoRA run's state


ADAPTERS = "adapters"  # the key of the adapters in a model state (Decoder.adapters)


def is_adapted(state: nnx.State) -> bool:
    """Whether a model state (or a tree of its shardings / shapes) holds adapters."""
    return ADAPTERS in state


def split_trainable(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(what a run trains, the rest) of a model state: (A and B, the base and s) with adapters,
    (everything, nothing) without. `join` puts them back together."""
    if not is_adapted(state):
        return state, nnx.State({})
    return nnx.split_state(state, LoraParam, ...)


def join(*parts: nnx.State) -> nnx.State:
    """The model state made of disjoint parts (`split_trainable`'s, `split_base`'s); a single
    non-empty part is returned as it is."""
    parts = [p for p in parts if len(p)]
    return parts[0] if len(parts) == 1 else nnx.merge_state(*parts)


def split_base(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the frozen base, the adapters with their scale) of an adapted model state."""
    return nnx.split_state(state, BASE, ...)


def reference_state(state: nnx.State) -> nnx.State:
    """The reference policy of a LoRA run: the same state with the adapter off (s = 0)."""
    return with_adapter_scale(state, 0.0)


def _merged(w: Array, a: Array, b: Array, scale: Array, dtype) -> Array:
    def one(wab):
        w_l, a_l, b_l = wab
        return (w_l.astype(jnp.float32) + _layer_delta(a_l, b_l, scale)).astype(dtype)

    return jax.lax.map(one, (w, a, b))


@functools.cache
def merged_weight_fn(sharding, dtype):
    """jit of W, A, B, scale -> W + scale·A·B in `dtype` on `sharding` (W's, or None: XLA's choice),
    for stacked W [L, in..., out...], one layer at a time in float32 at the highest precision as
    `merge_weight` computes it: what the sampler's copy of an adapted policy holds (no adapter
    arithmetic in the decode loop)."""
    return jax.jit(functools.partial(_merged, dtype=dtype), out_shardings=sharding)


def merged_leaves(state: nnx.State, dtype) -> dict[str, callable]:
    """{target name: thunk giving W + s·A·B in `dtype`} of an adapted model state, with s the
    state's own scale (α/r for the policy): computed when called, one target at a time, so that a
    caller moving weights holds one merged target at once."""
    adapters = state[ADAPTERS]
    scale = adapters["scale"].get_value()
    out = {}
    for key in adapters:
        if key.endswith("_a"):
            name = key[:-2]
            w = state[name].get_value()
            fn = merged_weight_fn(getattr(w, "sharding", None), jnp.dtype(dtype))
            out[name] = functools.partial(fn, w, adapters[key].get_value(), adapters[f"{name}_b"].get_value(), scale)
    return out
