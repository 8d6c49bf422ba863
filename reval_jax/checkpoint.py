"""Checkpoints of the whole experiment with Orbax, and exact resume.

A checkpoint at iteration i holds everything the rest of the run depends on:
  state   TrainState: policy, optimizer, reference parameters and version, update/skip counters
  buffer  the replay buffer (trajectories, priorities, use counts, its RNG state)
  meta    JSON: iteration, the grain data-iterator state, reward-verifier counters, the config
Sampling seeds derive from (seed, iteration), so nothing else is random.

Saves are asynchronous (Orbax copies device arrays to host, then writes in a background thread) and
atomic (a step directory appears only once complete), keeping the last `keep`. Restoring walks from
the newest step to older ones and skips, with a report, any step that fails to load (partial or
corrupt). Restoring takes the *current* run's shardings as target, so a checkpoint written on one
mesh loads onto another.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass
class Restored:
    iteration: int
    state: Any
    buffer: dict[str, np.ndarray]
    meta: dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says where, why, and what is still intact."""


def _abstract(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)  # numpy leaves restore as numpy

    return jax.tree.map(one, tree)


class Checkpointer:
    """Orbax CheckpointManager for one workdir's `checkpoints/` directory."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, iteration: int, state, buffer: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Starts writing checkpoint `iteration`; returns once the arrays are copied off device.

        A failed write (full disk, permissions) raises CheckpointError naming the directory; the
        earlier complete checkpoints are left as they are."""
        try:
            self.manager.wait_until_finished()  # surfaces an error of the previous async save
            self.manager.save(
                iteration,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    buffer=ocp.args.StandardSave(buffer),
                    meta=ocp.args.JsonSave({**meta, "iteration": iteration}),
                ),
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(self._save_failed(iteration, e)) from e

    def _save_failed(self, iteration: int, e: Exception) -> str:
        kept = self.steps()
        return (
            f"saving checkpoint {iteration} to {self.directory} failed: {type(e).__name__}: {e}. "
            f"Earlier checkpoints are intact ({kept or 'none'}); free disk space or fix the "
            "directory, then rerun the same command to resume from the latest of them."
        )

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(self._save_failed(self.manager.latest_step() or -1, e)) from e

    def restore_latest(self, state_like, buffer_like: dict[str, np.ndarray], log=print) -> Restored | None:
        """The newest checkpoint that loads, onto the shardings of `state_like`; None if there is none.
        Steps that fail to load are reported and skipped."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(state_like)),
                        buffer=ocp.args.StandardRestore(_abstract(buffer_like)),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 — any failure to read means: not usable
                log(f"checkpoint {step} in {self.directory} is corrupt or partial and is skipped "
                    f"({type(e).__name__}: {str(e)[:300]})")
                continue
            return Restored(iteration=int(out.meta["iteration"]), state=out.state,
                            buffer=dict(out.buffer), meta=dict(out.meta))
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between a checkpoint's config and the current one."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def load_policy(checkpoint_dir: str | os.PathLike, config, mesh):
    """The policy model of a training checkpoint (a step directory `checkpoints/<i>`, or a
    `checkpoints/` directory whose newest loadable step is taken), placed on `mesh`, with its
    tokenizer from `config.model.path`."""
    from flax import nnx

    from reval_jax import train
    from reval_jax.train_step import OptimizerConfig, init_state, make_optimizer, state_sharding

    path = Path(checkpoint_dir).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (path / "state").exists():  # a step directory
        only = int(path.name)
        path = path.parent
    else:
        only = None
    model, tokenizer = train.load_policy(config, mesh)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(OptimizerConfig(**config.optimizer.to_dict()))
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, ref_dtype=config.model.ref_dtype or None), params)
    shardings = state_sharding(abstract, optimizer, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps()) if only is None else [only]
    if not steps:
        raise FileNotFoundError(f"{path}: no complete checkpoint found")
    out = manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return nnx.merge(graphdef, out.state.params), tokenizer
