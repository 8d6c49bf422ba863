"""Multi-host runtime: JAX's own `jax.distributed`, and moving arrays between host and global mesh.

One process per host runs the same command. Every process reads the same (small) global prompt
batch and holds the same replay buffer, so host-side decisions (data order, replay sampling, reward
transforms) are identical everywhere without communication; the heavy work — generation, reference
and policy passes — is one SPMD program over the global mesh in which each host's devices compute
their shard of the batch. Rewards are scored by each process for its share of the rollouts and
gathered, so verifier time also splits across hosts.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Starts `jax.distributed` when this run spans several processes; returns whether it did.

    Explicit flags win. Otherwise JAX's cluster auto-detection is used on TPU pods (more than one
    worker) and under SLURM with more than one task; a single process needs nothing."""
    explicit = bool(coordinator_address)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if not (explicit or slurm or tpu_pod):
        return False
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes or None,
                                   process_id=None if process_id < 0 else process_id)
    else:
        jax.distributed.initialize()
    return True


def to_host(x) -> np.ndarray:
    """A (possibly multi-host, sharded) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_global(x: np.ndarray, sharding: Sharding) -> jax.Array:
    """A host array that every process holds whole, placed on a (possibly multi-host) sharding."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def process_share(n: int) -> slice:
    """This process's contiguous share of n items (for scoring rollouts)."""
    per = -(-n // jax.process_count())
    start = min(jax.process_index() * per, n)
    return slice(start, min(start + per, n))


def all_gather_rows(local: np.ndarray, n: int, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """Concatenates every process's `process_share(n)` rows into the full [n, ...] array.

    The gather runs on one device of each process, the first of `devices` (default: all devices)
    that the process owns: a two-group async run passes its training devices, so that a gather
    never queues behind the rollout group's decoding."""
    if jax.process_count() == 1:
        return local
    per = -(-n // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    devices = list(jax.devices() if devices is None else devices)
    owners = [next((d for d in devices if d.process_index == p), None) for p in range(jax.process_count())]
    if None in owners:
        raise ValueError(f"all_gather_rows: processes {[p for p, d in enumerate(owners) if d is None]} own none "
                         "of the devices given")
    mesh = Mesh(np.asarray(owners), ("processes",))
    mine = jax.device_put(padded[None], owners[jax.process_index()])  # [1, per, ...]
    stacked = jax.make_array_from_single_device_arrays(
        (len(owners), *padded.shape), NamedSharding(mesh, P("processes")), [mine])  # [processes, per, ...]
    whole = _replicate(NamedSharding(mesh, P()))(stacked)
    return np.asarray(whole.addressable_data(0)).reshape(-1, *local.shape[1:])[:n]


@functools.cache
def _replicate(sharding: NamedSharding):
    return jax.jit(lambda x: x, out_shardings=sharding)
