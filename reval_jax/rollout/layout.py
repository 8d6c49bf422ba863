"""The rollout layout: the policy in the sampler's dtype, whole on every tensor-parallel group.

    master params  float32, FSDP (sharding.RULES on the training mesh (data, fsdp, tensor))
      --cast where each shard lives (no device holds more float32 than its own master shard)-->
      --jax.device_put, `chunk_bytes` at a time, into a preallocated target written in place-->
    rollout params  rollout dtype, ROLLOUT_RULES on the rollout mesh (dp, 1, tp) of the same devices
      --nnx.merge--> Qwen2 whose `.mesh` is the rollout mesh: what `sampler.generate` takes

Why. The trainer splits its float32 master weights over every device (FSDP), so each forward
all-gathers every layer's weights. Once per micro-batch that is the price of FSDP; in the sampler,
whose decode loop runs one forward per token, it gathered every weight for every token (~26 GB per
device per 7B step, docs/scale.md). In the rollout layout rows (`act_batch`) are split over `data`;
heads, kv heads, the MLP and the vocabulary over `tensor`; the model dimension is replicated. A
decode step then moves activations only (the partial sums of o_proj / down_proj over `tensor`, the
vocabulary of the logits), never a weight; with tp = 1 nothing but the loop's stop test.

    layout = run.config.rollout_layout(config, train_mesh, model_cfg)  # validates config.rollout.*
    model = layout(graphdef, state.params)   # once per round, after the previous round's updates
    rollout = generate(model, prompts, sampling, seed=..., prompt_ids=...)
    del model                                # before the updates: the copy lives for one round

Meshes and rules. The rollout mesh is (data, fsdp, tensor) = (dp, 1, tp) over the training mesh's
devices. Parameter shardings come from ROLLOUT_RULES. The model's activation constraints
(`sharding.constrain` in model.py and sampler.py) look their logical axes up in the training table
sharding.RULES; on a mesh with fsdp = 1 that table names the same mesh axes as ROLLOUT_RULES for
every logical axis (act_batch -> (data, fsdp) -> data, embed -> fsdp -> replicated), so the rollout
model needs no second set of constraints. `rollout_mesh` checks that agreement on every mesh it
builds (a bug, not a user error, if the tables ever drift apart).

Memory, per device, while a rollout copy exists: the master shard (unchanged) + the rollout copy
(7B in bfloat16: 15.2 GB at tp 1, 15.2 / tp GB with tensor parallelism) + one chunk in transit. A
leaf of more than `chunk_bytes` (in the rollout dtype) moves along an axis that neither layout
splits (the leading `layers` axis of the stacked layer weights): each chunk is sliced and cast in
the training layout, put onto the rollout sharding and written into the donated target. Leaves with
no such axis (the embedding / lm_head when tp > 1: vocab over `tensor` in one layout, embed over
`fsdp` in the other) move whole. A leaf already in the rollout dtype and sharding (e.g. a
single-device float32 run sampling in float32) is used as it is, not copied.

Across processes (two-group async on several processes, reval_jax.run.pipeline): the rollout mesh is
over this process's own devices, the master weights span every process. Each chunk is then cast
and gathered whole onto every training device (one collective of all processes; a chunk in transit
is at most `chunk_bytes` per device, a leaf that cannot be chunked moves whole) and this process's
copy is put onto its rollout devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from reval_jax.errors import UserError
from reval_jax.model import lora
from reval_jax.model.config import DTYPES, ModelConfig
from reval_jax.model.decoder import Qwen2
from reval_jax.parallel.sharding import RULES, logical_to_spec, make_mesh, state_shardings

Array = jax.Array

# logical axis -> mesh axis of the rollout layout (the same names as sharding.RULES)
ROLLOUT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters: whole on every data replica, split over the tensor-parallel group
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations: rows over the data replicas
    ("act_batch", "data"),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
DEFAULT_CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- mesh and config


def check_tensor(tensor: int, devices: int, cfg: ModelConfig | None = None) -> None:
    """Refuses a tensor-parallel size that does not divide the devices or the model's heads."""
    def bad(msg: str):
        raise UserError(f"config.rollout.tensor: {tensor} {msg}")

    if tensor < 1:
        bad("must be >= 1 (1 = no tensor parallelism: a whole model per device)")
    if devices % tensor:
        bad(f"does not divide the {devices} devices of the mesh; use one of {_divisors(devices)}")
    if cfg is None:
        return
    for n, what in ((cfg.num_heads, "attention heads"), (cfg.num_kv_heads, "key/value heads")):
        if n % tensor:
            fits = [t for t in _divisors(devices) if cfg.num_heads % t == 0 and cfg.num_kv_heads % t == 0]
            bad(f"does not divide the model's {n} {what}; use one of {fits}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rollout_mesh(
    devices: Mesh | Sequence[jax.Device], tensor: int, cfg: ModelConfig | None = None
) -> Mesh:
    """The (data, fsdp, tensor) = (devices / tensor, 1, tensor) mesh over the devices of a training
    mesh (or a device list), in their order. With `cfg`, `tensor` must divide its heads too."""
    devices = list(devices.devices.flat) if isinstance(devices, Mesh) else list(devices)
    check_tensor(tensor, len(devices), cfg)
    mesh = make_mesh((len(devices) // tensor, 1, tensor), devices=devices)
    for name, _ in ROLLOUT_RULES:  # the model constrains activations with RULES: same axes here
        ours, theirs = (logical_to_spec((name,), None, mesh, r) for r in (ROLLOUT_RULES, RULES))
        if ours != theirs:
            raise AssertionError(f"logical axis {name!r}: ROLLOUT_RULES give {ours}, sharding.RULES "
                                 f"{theirs} on the rollout mesh {dict(mesh.shape)}; keep them in step")
    return mesh


def rollout_model_config(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """The sampler's model config: parameters stored and computed in `dtype`; no rematerialisation
    (nothing is differentiated)."""
    if dtype not in DTYPES:
        raise UserError(f"config.rollout.dtype: {dtype!r} is not one of {DTYPES} ('' = model.dtype)")
    return cfg.replace(param_dtype=dtype, dtype=dtype, remat="none")


@functools.cache
def abstract_rollout(cfg: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The rollout model's graphdef and its parameters as ShapeDtypeStructs carrying their rollout
    NamedShardings (`cfg` already in the rollout dtype, see `rollout_model_config`). Cached: every
    round gets the same graphdef, so the sampler's compiled programs are reused."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, ROLLOUT_RULES)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, params


# ----------------------------------------------------------------------------- moving the weights


def to_rollout(
    graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh, dtype: str = "bfloat16",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Qwen2:
    """The policy `nnx.merge(graphdef, params)` (master weights in any layout) as the sampler's
    model: parameters in `dtype` with the ROLLOUT_RULES shardings of `mesh` (a `rollout_mesh`),
    `.mesh` = `mesh`, cfg.dtype = cfg.param_dtype = `dtype`. The values are the master's cast to
    `dtype`, moved at most `chunk_bytes` at a time where an axis is unsplit in both layouts, whole
    otherwise (module docstring); `params` is not changed."""
    cfg = rollout_model_config(nnx.merge(graphdef, params).cfg, dtype)
    rollout_graphdef, target = abstract_rollout(cfg, mesh)
    if not lora.is_adapted(params):
        moved = jax.tree.map(lambda x, t: _move(x, t.sharding, t.dtype, chunk_bytes), params, target)
        return nnx.merge(rollout_graphdef, moved)
    # an adapted policy: its targets' W + s·A·B, merged where W lives one target at a time, then moved
    return _merged_model(rollout_graphdef, params, target, chunk_bytes)


def _merged_model(rollout_graphdef: nnx.GraphDef, state: nnx.State, target: nnx.State, chunk_bytes: int) -> Qwen2:
    """The rollout model of an adapted state: each target's W + s·A·B computed where W lives (one
    target at a time), every weight then moved onto `target`'s sharding and dtype (`_move`: not
    copied when already there)."""
    merged = lora.merged_leaves(state, jax.tree.leaves(target)[0].dtype)
    base, _ = lora.split_base(state)

    def one(path, x, t):
        name = path[0].key
        return _move(merged[name]() if name in merged else x, t.sharding, t.dtype, chunk_bytes)

    return nnx.merge(rollout_graphdef, jax.tree_util.tree_map_with_path(one, base, target))


def _move(x: Array, dst: NamedSharding, dtype, chunk_bytes: int) -> Array:
    """x cast to `dtype` on the sharding `dst`: cast where x lives, then device_put, in chunks of
    at most `chunk_bytes` along an axis that neither sharding splits (`chunking`)."""
    same_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == dst.mesh
    if x.dtype == dtype and same_mesh and x.sharding.is_equivalent_to(dst, x.ndim):
        return x  # already the rollout array (a program takes all its arrays on one mesh): not copied
    src = x.sharding
    plan = chunking(x.shape, src, dst, dtype, chunk_bytes)
    # a multi-process trainer pushing to a rollout group on this process's own devices (two-group
    # async on several processes): each piece is first gathered whole onto every training device
    # (a collective of all processes), then this process's copy is put onto the rollout devices
    across = not x.is_fully_addressable and dst.is_fully_addressable
    here = NamedSharding(src.mesh, PartitionSpec()) if across else src  # where each piece is cast
    put = (lambda piece: jax.device_put(piece.addressable_data(0), dst)) if across else \
        (lambda piece: jax.device_put(piece, dst))
    if plan is None:
        return put(_cast_fn(here, dtype)(x))
    axis, size = plan
    n = x.shape[axis]
    target = _zeros_fn(x.shape, dtype, dst)()
    for start in range(0, n, size):
        start = min(start, n - size)  # the last chunk overlaps the one before: one shape only
        piece = _slice_cast_fn(here, dtype, axis, size)(x, start)  # in the training layout (or whole)
        target = _write_fn(dst, axis)(target, put(piece), start)
    return target


def chunking(
    shape: Sequence[int], src: Sharding, dst: Sharding, dtype, chunk_bytes: int
) -> tuple[int, int] | None:
    """(axis, indices per chunk) that moves an array of `shape` (`dtype` bytes) from `src` to `dst`
    at most `chunk_bytes` at a time (one index at least), or None: it moves whole, because it is
    small enough or because every axis is split by one sharding or the other."""
    axis = _unsplit_axis(src, dst, len(shape))
    total = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    if axis is None or total <= chunk_bytes or shape[axis] == 1:
        return None
    row_bytes = total // shape[axis]  # bytes of one index along `axis`
    return axis, int(np.clip(chunk_bytes // row_bytes, 1, shape[axis]))


def _spec(sharding: Sharding, ndim: int) -> tuple | None:
    """The per-axis mesh axes of a sharding (None = unsplit), or None when it has no spec."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (ndim - len(spec))
    return (None,) * ndim if sharding.is_fully_replicated else None


def _unsplit_axis(src: Sharding, dst: Sharding, ndim: int) -> int | None:
    """The first axis that neither sharding splits: a chunk along it keeps both layouts' other
    splits, so the slice is local in the source and lands whole on its owners in the target."""
    a, b = _spec(src, ndim), _spec(dst, ndim)
    if a is None or b is None:
        return None
    return next((i for i in range(ndim) if a[i] is None and b[i] is None), None)


@functools.cache
def _cast_fn(sharding: Sharding, dtype):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.cache
def _slice_cast_fn(sharding: Sharding, dtype, axis: int, size: int):
    # x [..., n, ...] -> [..., size, ...] from `start` along `axis`, cast, in x's own layout
    return jax.jit(
        lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, size, axis).astype(dtype),
        out_shardings=sharding,
    )


@functools.cache
def _zeros_fn(shape: tuple[int, ...], dtype, sharding: Sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _write_fn(sharding: Sharding, axis: int):
    # target [..., n, ...] with piece [..., size, ...] written at `start` along `axis`, in place
    return jax.jit(
        lambda target, piece, start: jax.lax.dynamic_update_slice_in_dim(target, piece, start, axis),
        out_shardings=sharding, donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------- from a run config


@dataclasses.dataclass(frozen=True)
class RolloutLayout:
    """Where and in what dtype the sampler's model lives; `layout(graphdef, params)` builds it."""

    mesh: Mesh  # (dp, 1, tp) over the training mesh's devices
    dtype: str  # float32 | bfloat16
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __call__(self, graphdef: nnx.GraphDef, params: nnx.State) -> Qwen2:
        return to_rollout(graphdef, params, self.mesh, self.dtype, self.chunk_bytes)

    def abstract(self, cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
        """The rollout graphdef and abstract parameters of a model `cfg` (for reval_jax.tools.scale)."""
        return abstract_rollout(rollout_model_config(cfg, self.dtype), self.mesh)


# ----------------------------------------------------------------------------- LoRA pushes to a rollout group


@dataclasses.dataclass(frozen=True)
class Pending:
    """A pushed model that is built where and when the rollout side takes it (`build()`)."""

    build: Callable[[], Qwen2]


class AdapterPush:
    """The weight push of an adapted (LoRA) policy to a rollout device group of its own (async, two
    groups): the adapters only, merged on the rollout devices.

        push = AdapterPush(layout, graphdef)
        pending = push(state.params, int(state.ref_version))  # trainer: moves A, B and s (the base once
        model = pending.build()                              # per merge); rollout side, when taken:
                                                            # W + s·A·B into the rollout copy

    The base only changes at a merge (a reference reset), so it is moved to the rollout devices once
    per reference version and kept there in the master's dtype (each push holds a reference to its
    base: a push taken after the next merge still finds its own). A push is then the adapters (for
    qwen7b_lora.py 0.65 GB of float32 against 15.2 GB of merged bfloat16 weights) and the pushes
    waiting for the rollout group hold no model copy; `build()` computes W + s·A·B where the rollout
    copy lives, exactly as `to_rollout` does where the master lives (same float32 computation per
    layer, cast to the rollout dtype). docs/lora.md, "Sampling", has the measurement."""

    def __init__(self, layout: RolloutLayout, graphdef: nnx.GraphDef):
        self.layout, self.graphdef = layout, graphdef
        self._base: tuple[int, nnx.State] | None = None  # (reference version, the base on the rollout devices)

    def __call__(self, params: nnx.State, ref_version: int) -> Pending:
        layout = self.layout
        cfg = rollout_model_config(nnx.merge(self.graphdef, params).cfg, layout.dtype)
        rollout_graphdef, target = abstract_rollout(cfg, layout.mesh)
        base, adapters = lora.split_base(params)
        if self._base is None or self._base[0] != ref_version:
            moved = jax.tree.map(lambda x, t: _move(x, t.sharding, x.dtype, layout.chunk_bytes), base, target)
            self._base = (ref_version, moved)
        rollout_base = self._base[1]
        shardings = state_shardings(adapters, layout.mesh, ROLLOUT_RULES)
        moved_adapters = jax.tree.map(lambda x, s: _move(x, s, x.dtype, layout.chunk_bytes), adapters, shardings)

        state = lora.join(rollout_base, moved_adapters)
        return Pending(lambda: _merged_model(rollout_graphdef, state, target, layout.chunk_bytes))


def push_bytes(params: nnx.State, dtype: str) -> dict[str, int]:
    """Bytes one push moves to a rollout group: `merged` (every weight in the rollout dtype) and
    `adapters` (A, B and s as stored), with `base` (the master's base, moved once per merge)."""
    size = lambda tree, itemsize=None: sum(x.size * (itemsize or x.dtype.itemsize) for x in jax.tree.leaves(tree))
    base, adapters = lora.split_base(params)
    return {"merged": size(base, jnp.dtype(dtype).itemsize), "adapters": size(adapters), "base": size(base)}
