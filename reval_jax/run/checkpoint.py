"""Checkpoints of the whole experiment with Orbax, and exact resume.

A checkpoint at iteration i holds everything the rest of the run depends on:
  state   TrainState: policy, optimizer, reference parameters and version, update/skip counters
          (a LoRA run: the adapters A, B, s and their optimizer state; no reference copy exists)
  base    a LoRA run's frozen base, only once a merge (a reference reset) has changed it: before the
          first merge the base is the model the run starts from, which the restore loads anyway
  buffer  the replay buffer (trajectories, priorities, use counts, its RNG state)
  meta    JSON: iteration, the grain data-iterator state, reward-verifier counters, the config,
          and `checksums`: one fingerprint per array leaf of state and buffer (see `fingerprints`)
Sampling seeds derive from (seed, iteration), so nothing else is random.

Saves are asynchronous (Orbax copies device arrays to host, then writes in a background thread) and
atomic (a step directory appears only once complete), keeping the last `keep`. Before a save the
state is fingerprinted on device (one jitted pass that also checks that params and optimizer state
are finite: a non-finite state is never saved). Restoring walks from the newest step to older ones
and skips, with a report naming the step, any step that fails to load (partial, truncated, missing
files) or whose restored values do not match its checksums (bit flips inside array data); the
training run moves such a step aside to `checkpoints.corrupt/` so that the run can write that step
again. The report is one line (the innermost cause, not Orbax's TensorStore spec dump), and a read
that fails leaves nothing behind: the other reads of the step are awaited before Orbax's event loop
closes (`_SettlingLoop`), so no coroutine or TensorStore callback meets a closed loop later. A step
written before checksums existed is accepted with a warning. Restoring takes the
*current* run's shardings as target, so a checkpoint written on one mesh loads onto another (the
fingerprints do not depend on the sharding).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from reval_jax.model import lora

CHECKSUM_FORMAT = 1


def _split_state(state) -> tuple[Any, Any]:
    """(the `state` item, the `base` item or None): a LoRA run's frozen base is saved apart."""
    params = getattr(state, "params", None)
    if params is None or not lora.is_adapted(params):
        return state, None
    base, rest = lora.split_base(params)
    return state.replace(params=rest), base


@dataclasses.dataclass
class _Items:
    state: Any
    buffer: Any
    meta: Any


@dataclasses.dataclass
class Restored:
    iteration: int
    state: Any
    buffer: dict[str, np.ndarray]
    meta: dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says where, why, and what is still intact."""


class CorruptCheckpoint(ValueError):
    """A checkpoint step loaded but its values do not match the checksums it was saved with."""


def _abstract(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)  # numpy leaves restore as numpy

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- checksums


def _mix(h):
    """murmur3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x) -> jax.Array:
    """The bits of `x` as uint32 words (one per element; 8-byte dtypes give a trailing [2])."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _device_checksum(x) -> jax.Array:
    """[2] uint32 of an array, independent of its sharding (integer sums mod 2^32 do not depend on
    the order of the reduction): a = Σ_i w_i·x_i with odd weights w_i = mix(i)|1, so that changing any
    one word always changes `a`; b = Σ_i mix(x_i + mix(i ^ φ)), a non-linear second lane."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)  # flat position of each word
    stride = 1
    for d in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    a = jnp.sum(w * (_mix(index) | jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(w + _mix(index ^ jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([a, b])


@jax.jit
def _device_fingerprints(leaves: list) -> tuple[list, jax.Array]:
    sums = [_device_checksum(x) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sums, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def fingerprints(tree) -> tuple[dict[str, str], bool]:
    """Per-leaf checksums `{key path: hex}` of a tree of arrays, and whether every floating leaf is
    finite. jax.Array leaves (sharded, on any number of hosts) are reduced on device in one jitted
    pass, so a multi-host state never leaves its devices; numpy leaves are hashed on host (blake2b)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    device = [(n, x) for n, (_, x) in zip(names, flat, strict=True) if isinstance(x, jax.Array)]
    out: dict[str, str] = {}
    finite = True
    if device:
        sums, ok = _device_fingerprints([x for _, x in device])
        finite = bool(ok)
        for (name, x), s in zip(device, sums, strict=True):
            a, b = (int(v) for v in np.asarray(s))
            out[name] = f"{x.dtype}{list(x.shape)}:{a:08x}{b:08x}"
    for name, (_, x) in zip(names, flat, strict=True):
        if not isinstance(x, jax.Array):
            x = np.asarray(x)
            digest = hashlib.blake2b(x.tobytes(), digest_size=8)
            out[name] = f"{x.dtype}{list(x.shape)}:{digest.hexdigest()}"
            if np.issubdtype(x.dtype, np.inexact):
                finite = finite and bool(np.isfinite(x).all())
    return out, finite


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksums"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def verify(meta: dict, **items) -> list[str] | None:
    """The names of the restored leaves whose values do not match the checksums stored in `meta`
    (an empty list: all match); None if the checkpoint predates checksums. `items` are the restored
    trees by item name (state=..., buffer=...); items not given are not checked."""
    saved = meta.get("checksums")
    if saved is None:
        return None
    bad = [] if saved.get("meta") == _meta_checksum(meta) else ["meta"]
    for item, tree in items.items():
        want = saved.get(item, {})
        got, _ = fingerprints(tree)
        bad += [f"{item}{k}" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    return bad


def _saved_numpy_tree(sums: dict[str, str] | None) -> dict[str, np.ndarray] | None:
    """A flat dict of zero numpy arrays with the keys, dtypes and shapes recorded in a buffer's
    checksums (`fingerprints` of a flat dict of numpy arrays), or None when there are none."""
    if not sums:
        return None
    tree = {}
    for path, value in sums.items():
        match = re.fullmatch(r"\['(.+)'\]", path)
        spec = re.fullmatch(r"(\w+)(\[[\d, ]*\]):[0-9a-f]+", value)
        if match is None or spec is None:
            return None  # not a flat dict of numpy arrays: restore onto the caller's template
        tree[match.group(1)] = np.zeros(json.loads(spec.group(2)), np.dtype(spec.group(1)))
    return tree


# ----------------------------------------------------------------------------- quiet failed restores


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets the tasks still pending on it finish before it closes.

    Orbax runs a restore in a fresh event loop (`run_until_complete`, then `close`). When one array
    read fails, the gather that awaits the reads raises at once and the loop is closed under the
    other reads: their coroutines are destroyed mid-await ("Exception ignored in: <coroutine ...>"
    with a TensorStore spec each) and TensorStore's threads, finishing them, call into the closed
    loop ("RuntimeError: Event loop is closed"). Awaiting them first, as `asyncio.run` would, ends
    every read before the loop goes (their errors are collected: the first one is already raised)."""

    def close(self) -> None:
        while not self.is_closed() and not self.is_running() and (pending := asyncio.all_tasks(self)):
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingLoop()


@contextlib.contextmanager
def _settling_event_loops():
    """The event loops created inside (Orbax's, for a restore) settle their tasks before closing."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def failure_reason(e: BaseException, limit: int = 200) -> str:
    """One line saying why a step did not load: the innermost cause's first line (Orbax wraps a
    TensorStore read error in a message that dumps the store's whole spec)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def _without_log_lines(*fragments: str):
    """Orbax's log records (absl's logger) holding any of `fragments` are dropped inside."""
    logger, drop = logging.getLogger("absl"), _DropLines(fragments)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Orbax CheckpointManager for one workdir's `checkpoints/` directory."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        if read_only:  # every option a read-only manager would otherwise reset, with a warning each
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   create=True, cleanup_tmp_directories=True)
        with _without_log_lines("Given directory is read only"):  # Orbax's unconditional warning
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.writing: int | None = None  # the step whose (async) write is under way or last done

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, iteration: int, state, buffer: dict[str, np.ndarray], meta: dict[str, Any],
             log=print) -> bool:
        """Starts writing checkpoint `iteration`; returns once the arrays are copied off device.

        The state is fingerprinted first; a state whose params or optimizer state are not finite is
        not saved (returns False, and says so). A failed write (full disk, permissions) raises
        CheckpointError naming the step and the directory; the earlier complete checkpoints are left
        as they are."""
        self.wait()  # surfaces an error of the previous async save, naming its step
        state, base = _split_state(state)
        if base is not None and int(state.ref_version) == 0:
            base = None  # no merge yet: the base is the model the run starts from
        state_sums, finite = fingerprints(state)
        if not finite:
            log(f"not saving checkpoint {iteration}: the parameters or optimizer state are not finite; "
                f"the checkpoints kept in {self.directory} are {self.steps() or 'none'}")
            return False
        buffer_sums, _ = fingerprints(buffer)
        meta = {**meta, "iteration": iteration}
        meta["checksums"] = {"format": CHECKSUM_FORMAT, "meta": _meta_checksum(meta),
                             "state": state_sums, "buffer": buffer_sums}
        items = {"state": ocp.args.StandardSave(state), "buffer": ocp.args.StandardSave(buffer)}
        if base is not None:
            meta["checksums"]["base"] = fingerprints(base)[0]
            items["base"] = ocp.args.StandardSave(base)
        try:
            self.writing = iteration
            written = self.manager.save(iteration, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(self._save_failed(iteration, e)) from e
        if not written:  # Orbax writes no step that is not newer than the newest on disk
            log(f"checkpoint {iteration} not written: {self.directory} already holds {self.steps()}")
        return bool(written)

    def _save_failed(self, iteration: int | None, e: Exception) -> str:
        kept = [s for s in self.steps() if s != iteration]
        return (
            f"saving checkpoint {iteration} to {self.directory} failed: {type(e).__name__}: {e}. "
            f"Earlier checkpoints are intact ({kept or 'none'}); free disk space or fix the "
            "directory, then rerun the same command to resume from the latest of them."
        )

    def poll(self) -> None:
        """Raises CheckpointError if the background write of the last save has ended in an error,
        without waiting for a write still under way. On several processes it does nothing (they
        could see the end of the write at different iterations and part ways); there the next save
        or the end of the run reports the failure, naming the same step."""
        if self.writing is None or jax.process_count() > 1 or self.manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        """Waits for the last save to be written; raises CheckpointError naming it if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._abandon()
            raise CheckpointError(self._save_failed(self.writing, e)) from e

    def _abandon(self) -> None:
        """After a failed write: nothing is left to wait for (so closing does not wait again), and
        what the write left of its step is moved aside, so that the kept steps are all complete."""
        with contextlib.suppress(Exception):  # the error is being reported by the caller
            self.manager.wait_until_finished()
        if self.writing is not None and (self.directory / str(self.writing)).exists():
            self._quarantine(self.writing, print)

    def last_good(self) -> int | None:
        """The newest step that is complete on disk (every step is saved from a finite, checksummed
        state, and restore verifies it)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int, state_like, buffer_like: dict[str, np.ndarray] | None = None):
        """Step `step` onto the shardings of `state_like`, verified against its checksums. Raises
        (CorruptCheckpoint on a checksum mismatch) if it is not usable; returns the restored items
        (.state, .buffer, .meta) and whether checksums were verified (False: a checkpoint older than
        checksums). A LoRA state's base comes from the step when a merge had changed it, else it is
        `state_like`'s (which must then hold the base's arrays: the model the run starts from)."""
        like, like_base = _split_state(state_like)
        has_base = like_base is not None and (self.directory / str(step) / "base").exists()
        items = {"state": ocp.args.StandardRestore(_abstract(like)), "meta": ocp.args.JsonRestore()}
        if has_base:
            items["base"] = ocp.args.StandardRestore(_abstract(like_base))
        with _settling_event_loops():
            if buffer_like is not None:
                # the buffer item as it was saved (its keys, shapes and dtypes are in the checksums):
                # entries added to the buffer state since, or that vary between runs (the queued rounds
                # of an asynchronous run), restore as saved; the caller fills in what is missing
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                saved = _saved_numpy_tree(meta.get("checksums", {}).get("buffer"))
                items["buffer"] = ocp.args.StandardRestore(_abstract(buffer_like if saved is None else saved))
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        trees = {"state": out.state, **({"buffer": out.buffer} if buffer_like is not None else {}),
                 **({"base": out.base} if has_base else {})}
        bad = verify(dict(out.meta), **trees)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CorruptCheckpoint(f"values do not match the checksums saved with them: {shown}")
        state = out.state
        if like_base is not None:
            if not has_base and int(state.ref_version) > 0:
                raise CorruptCheckpoint(f"the merged base of reference version {int(state.ref_version)} is missing")
            state = state.replace(params=lora.join(out.base if has_base else like_base, state.params))
        return _Items(state, out.buffer if buffer_like is not None else None, out.meta), bad is not None

    def restore_latest(self, state_like, buffer_like: dict[str, np.ndarray], log=print) -> Restored | None:
        """The newest checkpoint that loads and matches its checksums, onto the shardings of
        `state_like`; None if there is none. Steps that do not are reported and moved aside to
        `checkpoints.corrupt/` (so that the run can write those steps again)."""
        for step in reversed(self.steps()):
            try:
                out, verified = self.restore(step, state_like, buffer_like)
            except Exception as e:  # noqa: BLE001 — any failure to read means: not usable
                log(f"checkpoint {step} in {self.directory} is corrupt or partial and is skipped "
                    f"({failure_reason(e)})")
                self._quarantine(step, log)
                continue
            if not verified:
                log(f"warning: checkpoint {step} in {self.directory} predates checksums; restored unverified")
            return Restored(iteration=int(out.meta["iteration"]), state=out.state,
                            buffer=dict(out.buffer), meta=dict(out.meta))
        return None

    def _quarantine(self, step: int, log) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".corrupt") / str(step)
            if aside.exists():
                shutil.rmtree(aside)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), aside)
            log(f"moved checkpoint {step} aside to {aside}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"reval_jax quarantine {step}")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


def find_checkpoints(path: str | os.PathLike) -> tuple[Path, int | None]:
    """`(checkpoints directory, step or None)` of a path given by a user: a step directory
    `checkpoints/<i>`, a `checkpoints/` directory, or a workdir holding `checkpoints/`."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (path / "state").exists() and path.name.isdigit():  # a step directory
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():  # a workdir
        return path / "checkpoints", None
    return path, None


def newest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in a checkpoints/ directory (None: none, or no directory), read
    without opening a manager and without checking the step."""
    path = Path(directory)
    steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
    return max(steps) if steps else None
