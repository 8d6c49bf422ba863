"""Host-side replay buffer of trajectories (Algorithm 1 and §4.3 of the ReVal paper).

`ReplayBuffer` stores up to `capacity` trajectories padded to a fixed length `seq_len` in numpy
arrays, in a ring: `add` writes the newest entries over the oldest (FIFO eviction). `sample`
draws distinct entries (without replacement), uniformly or, in prioritised mode, with
P(i) ∝ p_i^α. Entries remember the reference version that produced their reference quantities;
`sample(..., ref_version=v, recompute_fn=f)` recomputes the stale ones through `f` before they
are used and writes them back. All sampling decisions come from one numpy Generator whose state
is part of `state_dict`, so a restored buffer draws exactly the samples the original would have.
Multi-turn trajectories are stored as they are: one span of tokens with a non-contiguous policy mask
(reval_jax.data.batch); recomputed reference log-probs are kept on the policy tokens only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from reval_jax.data.batch import FIELD_DEFAULTS, FIELD_DTYPES, TOKEN_FIELDS, Trajectories

# recompute_fn(stale entries) -> (ref_logp [k, T], ref_v [k]) under the current reference.
RecomputeFn = Callable[[Trajectories], tuple[np.ndarray, np.ndarray]]

_SCALARS = (
    "next",
    "size",
    "num_added",
    "num_evicted",
    "evicted_uses",
    "num_recomputed",
    "max_priority",
    "latest_iteration",
    "last_age_mean",
    "last_age_max",
)
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class ReplaySample:
    """Entries drawn from the buffer."""

    batch: Trajectories  # [n] host arrays; reference quantities current if ref_version was given
    indices: np.ndarray  # [n] int64  buffer slots (for update_priorities)
    weights: np.ndarray  # [n] f32  importance weights (all ones in uniform mode)
    ages: np.ndarray  # [n] int64  current iteration − generation iteration
    num_recomputed: int  # entries whose reference quantities were recomputed


class ReplayBuffer:
    """FIFO buffer of `capacity` trajectories of length `seq_len`, optionally prioritised.

    Prioritised mode (Schaul et al. 2016): p_i = |δ_i| + priority_eps, new entries get the
    largest priority seen so far, P(i) = p_i^α / Σ_j p_j^α, and importance weights
    w_i = (N·P(i))^(−β_IS) / max_j (N·P(j))^(−β_IS), the max over all N buffered entries, so
    that w ≤ 1.
    """

    def __init__(
        self,
        capacity: int,
        seq_len: int,
        *,
        seed: int = 0,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta_is: float = 0.4,
        priority_eps: float = 1e-6,
        pad_id: int = 0,
    ):
        if capacity <= 0 or seq_len <= 0:
            raise ValueError(f"capacity ({capacity}) and seq_len ({seq_len}) must be positive")
        self.capacity = capacity
        self.seq_len = seq_len
        self.prioritized = prioritized
        self.alpha = alpha
        self.beta_is = beta_is
        self.priority_eps = priority_eps
        self.pad_id = pad_id
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._data = {
            name: np.zeros(
                (capacity, seq_len) if name in TOKEN_FIELDS else (capacity,), dtype=dtype
            )
            for name, dtype in FIELD_DTYPES.items()
        }
        self._uses = np.zeros(capacity, np.int64)
        self._priorities = np.zeros(capacity, np.float64)
        self._next = 0  # slot the next entry is written to
        self._size = 0
        self._num_added = 0
        self._num_evicted = 0
        self._evicted_uses = 0  # Σ uses of the evicted entries
        self._num_recomputed = 0
        self._max_priority = 1.0
        self._latest_iteration = -1
        self._last_age_mean = 0.0
        self._last_age_max = 0

    # ------------------------------------------------------------------------- contents

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def _ordered_slots(self) -> np.ndarray:
        """Occupied slots from the oldest to the newest entry."""
        start = (self._next - self._size) % self.capacity
        return (start + np.arange(self._size)) % self.capacity

    def contents(self) -> Trajectories:
        """All buffered entries, oldest first (a copy)."""
        return self._gather(self._ordered_slots())

    def uses(self) -> np.ndarray:
        """How often each buffered entry was sampled, oldest first."""
        return self._uses[self._ordered_slots()].copy()

    def _gather(self, slots: np.ndarray) -> Trajectories:
        return Trajectories.from_numpy({name: a[slots] for name, a in self._data.items()})

    def add(self, batch: Trajectories) -> np.ndarray:
        """Appends `batch`, right-padded to `seq_len`, evicting the oldest entries when full.

        Returns the slots written. New entries start with zero uses and, in prioritised mode,
        the largest priority seen so far.
        """
        n = batch.batch_size
        if batch.length > self.seq_len:
            raise ValueError(
                f"batch length {batch.length} exceeds the replay buffer's seq_len {self.seq_len}; "
                "build the buffer with seq_len >= prompt length + max response length"
            )
        if n > self.capacity:
            raise ValueError(f"cannot add {n} trajectories to a buffer of capacity {self.capacity}")
        arrays = batch.pad_to(self.seq_len, self.pad_id).to_numpy()
        slots = (self._next + np.arange(n)) % self.capacity
        # The first capacity − size written slots are empty, the rest hold the oldest entries.
        evicted = max(0, self._size + n - self.capacity)
        if evicted:
            self._num_evicted += evicted
            self._evicted_uses += int(self._uses[slots[n - evicted :]].sum())
        for name, a in arrays.items():
            self._data[name][slots] = a
        self._uses[slots] = 0
        self._priorities[slots] = self._max_priority
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)
        self._num_added += n
        if n:
            self._latest_iteration = max(self._latest_iteration, int(arrays["iteration"].max()))
        return slots

    def flush(self) -> None:
        """Drops every entry (the "flush on reference reset" option); counted as evictions."""
        slots = self._ordered_slots()
        self._num_evicted += len(slots)
        self._evicted_uses += int(self._uses[slots].sum())
        self._uses[:] = 0
        self._priorities[:] = 0.0
        self._next = 0
        self._size = 0

    # ------------------------------------------------------------------------- sampling

    def _probabilities(self) -> np.ndarray:
        scaled = self._priorities[: self._size] ** self.alpha  # [N]
        return scaled / scaled.sum()

    def sample(
        self,
        n: int,
        *,
        iteration: int | None = None,
        ref_version: int | None = None,
        recompute_fn: RecomputeFn | None = None,
    ) -> ReplaySample:
        """Draws `n` distinct entries (without replacement).

        iteration: the current generation iteration, for the ages (default: the newest
          iteration added).
        ref_version: when given, entries whose ref_version differs are stale: their ref_logp and
          ref_v are recomputed by `recompute_fn(stale entries) -> (ref_logp [k, T], ref_v [k])`
          (called once, with the stale entries only) and written back into the buffer with
          version `ref_version`.
        """
        if n > self._size:
            raise ValueError(
                f"cannot sample {n} distinct trajectories from a replay buffer holding "
                f"{self._size} (capacity {self.capacity})"
            )
        if n < 0:
            raise ValueError(f"sample size must be non-negative, got {n}")
        if self.prioritized:
            probs = self._probabilities()
            slots = self._rng.choice(self._size, size=n, replace=False, p=probs)
            max_weight = (self._size * probs.min()) ** (-self.beta_is)
            weights = (self._size * probs[slots]) ** (-self.beta_is) / max_weight
        else:
            slots = self._rng.choice(self._size, size=n, replace=False)
            weights = np.ones(n)
        slots = np.asarray(slots, np.int64)
        self._uses[slots] += 1

        arrays = {name: a[slots] for name, a in self._data.items()}
        num_recomputed = 0
        if ref_version is not None:
            stale = np.flatnonzero(arrays["ref_version"] != ref_version)
            num_recomputed = len(stale)
            if num_recomputed:
                self._recompute(arrays, slots, stale, ref_version, recompute_fn)

        current = self._latest_iteration if iteration is None else iteration
        ages = current - arrays["iteration"].astype(np.int64)
        if n:
            self._last_age_mean = float(ages.mean())
            self._last_age_max = int(ages.max())
        return ReplaySample(
            batch=Trajectories.from_numpy(arrays),
            indices=slots,
            weights=weights.astype(np.float32),
            ages=ages,
            num_recomputed=num_recomputed,
        )

    def _recompute(
        self,
        arrays: dict[str, np.ndarray],
        slots: np.ndarray,
        stale: np.ndarray,
        ref_version: int,
        recompute_fn: RecomputeFn | None,
    ) -> None:
        """Recomputes the reference quantities of rows `stale` of `arrays`, in place and in the
        buffer."""
        if recompute_fn is None:
            raise ValueError(
                f"{len(stale)} sampled trajectories have reference quantities from another "
                f"reference version than {ref_version}, and no recompute_fn was given"
            )
        sub = Trajectories.from_numpy({name: a[stale] for name, a in arrays.items()})
        ref_logp, ref_v = recompute_fn(sub)
        ref_logp = np.asarray(ref_logp, np.float32)
        ref_v = np.asarray(ref_v, np.float32)
        k = len(stale)
        if ref_logp.shape != (k, self.seq_len) or ref_v.shape != (k,):
            raise ValueError(
                f"recompute_fn returned ref_logp {ref_logp.shape} and ref_v {ref_v.shape}, "
                f"expected {(k, self.seq_len)} and {(k,)}"
            )
        ref_logp = np.where(sub.response_mask, ref_logp, 0.0).astype(np.float32)  # policy tokens only
        for name, value in (("ref_logp", ref_logp), ("ref_v", ref_v), ("ref_version", ref_version)):
            arrays[name][stale] = value
            self._data[name][slots[stale]] = value
        self._num_recomputed += k

    def update_priorities(self, indices: np.ndarray, abs_delta: np.ndarray) -> None:
        """Sets p_i = |δ_i| + priority_eps for the slots `indices` of a previous sample."""
        if not self.prioritized:
            raise ValueError("update_priorities needs a buffer built with prioritized=True")
        indices = np.asarray(indices, np.int64)
        priorities = np.abs(np.asarray(abs_delta, np.float64)) + self.priority_eps
        if indices.shape != priorities.shape:
            raise ValueError(f"indices {indices.shape} and abs_delta {priorities.shape} differ")
        if np.any((indices < 0) | (indices >= self._size)):
            raise ValueError(f"priority indices out of range [0, {self._size})")
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priorities must be finite")
        self._priorities[indices] = priorities
        if len(priorities):
            self._max_priority = max(self._max_priority, float(priorities.max()))

    def priorities(self) -> np.ndarray:
        """Priorities p_i of the buffered entries, oldest first."""
        return self._priorities[self._ordered_slots()].copy()

    # ------------------------------------------------------------------------- statistics

    def stats(self) -> dict[str, float]:
        """Size, ages of the last sample, and how often entries were used."""
        current_uses = self._uses[self._ordered_slots()]
        return {
            "size": float(self._size),
            "num_added": float(self._num_added),
            "num_evicted": float(self._num_evicted),
            "num_recomputed": float(self._num_recomputed),
            "sample_age_mean": self._last_age_mean,
            "sample_age_max": float(self._last_age_max),
            "uses_mean_current": float(current_uses.mean()) if self._size else 0.0,
            "uses_mean_evicted": (
                self._evicted_uses / self._num_evicted if self._num_evicted else 0.0
            ),
        }

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The full state as numpy arrays (scalars as 0-d arrays), sampler state included."""
        state = {f"data/{name}": a.copy() for name, a in self._data.items()}
        state["uses"] = self._uses.copy()
        state["priorities"] = self._priorities.copy()
        for name in _SCALARS:
            state[name] = np.asarray(getattr(self, f"_{name}"))
        state["capacity"] = np.asarray(self.capacity)
        state["seq_len"] = np.asarray(self.seq_len)
        state["prioritized"] = np.asarray(self.prioritized)
        state["rng_state"] = _encode_rng(self._rng)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restores `state_dict()`; the buffer must have the same capacity, seq_len and mode."""
        saved = (int(state["capacity"]), int(state["seq_len"]), bool(state["prioritized"]))
        if saved != (self.capacity, self.seq_len, self.prioritized):
            raise ValueError(
                f"replay state has (capacity, seq_len, prioritized) = {saved}, this buffer "
                f"{(self.capacity, self.seq_len, self.prioritized)}"
            )
        for name, dtype in FIELD_DTYPES.items():
            if f"data/{name}" not in state and name in FIELD_DEFAULTS:  # saved before the field existed
                self._data[name] = np.full_like(self._data[name], FIELD_DEFAULTS[name])
                continue
            self._data[name] = np.array(state[f"data/{name}"], dtype=dtype)
        self._uses = np.array(state["uses"], np.int64)
        self._priorities = np.array(state["priorities"], np.float64)
        for name in _SCALARS:
            value = np.asarray(state[name]).item()
            setattr(self, f"_{name}", value)
        self._rng = _decode_rng(np.asarray(state["rng_state"]))


def _encode_rng(rng: np.random.Generator) -> np.ndarray:
    """PCG64 state as uint64 [state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger]."""
    s = rng.bit_generator.state
    if s["bit_generator"] != "PCG64":
        raise ValueError(f"unsupported bit generator {s['bit_generator']}")
    state, inc = s["state"]["state"], s["state"]["inc"]
    words = [state >> 64, state & _MASK64, inc >> 64, inc & _MASK64, s["has_uint32"], s["uinteger"]]
    return np.array(words, dtype=np.uint64)


def _decode_rng(words: np.ndarray) -> np.random.Generator:
    w = [int(x) for x in words]
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
        "has_uint32": w[4],
        "uinteger": w[5],
    }
    return np.random.Generator(bit_generator)
