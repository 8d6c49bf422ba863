"""Sharding as data: logical axis names, one rules table onto the mesh, and the mesh itself.

Modules tag every parameter with logical axes (`nnx.Param(x, axes=("embed", "mlp"))`) and
constrain activations with logical axes too. `RULES` maps each logical name to mesh axes: the
training (FSDP) layout; the sampler's layout is another table over the same names
(`reval_jax.rollout.layout.ROLLOUT_RULES`). A mesh always has the three axes `data`, `fsdp` and
`tensor` (size 1 where unused), built from config.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry of `shape` may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    size = int(np.prod(shape))
    if size > len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {size} devices, only {len(devices)} are visible "
            f"(platform {devices[0].platform}); change the mesh shape in the config"
        )
    return Mesh(np.asarray(devices[:size]).reshape(shape), MESH_AXES)


def _mesh_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
    rules=RULES,
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. With `shape` and `mesh`, a dimension that the mesh axis does
    not divide evenly (e.g. 2 kv heads on a tensor axis of 4) is replicated instead; a mesh axis is
    used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to sharding.RULES "
                           "(and to reval_jax.rollout.layout.ROLLOUT_RULES)")
        axis = table.get(name) if name is not None else None
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape[n] > 1 and n not in used)
            if shape is not None and shape[i] % _mesh_size(mesh, names):
                names = ()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules=RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """NamedShardings for every array of an (abstract or concrete) nnx.State from its `axes` metadata
    under the rules table `rules` (the training layout by default; reval_jax.rollout.layout has the
    rollout one). Arrays without `axes` metadata (e.g. scalars, RNG counters) are replicated."""

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("axes")
            shape = v.get_value().shape
            spec = logical_to_spec(axes, shape, mesh, rules) if axes else PartitionSpec()
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; the identity when the model runs without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))
