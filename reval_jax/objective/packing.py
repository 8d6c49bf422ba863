"""Packing trajectories into token-budget rows: what the update and the reference pass compute on.

A padded `Trajectories` batch [B, T] is mostly padding when responses are much shorter than the
length limit (Qwen2.5-Math-7B: ~600-token responses under a 3,072 limit). The packer lays each
trajectory's real tokens end to end into rows of `row_len` tokens:

    row r:  [ traj a (segment 1) | traj b (segment 2) | traj c (segment 3) | padding (0) ]

with per-token `segment_ids` (1, 2, ...; 0 = padding: attention never crosses a segment) and
per-segment `positions` (0.. in each trajectory, so RoPE sees what it sees unpacked). A segment is a
trajectory's whole span of real tokens: for a multi-turn trajectory the prompt, every policy turn and
the environment tokens between them, with its non-contiguous `response_mask` (policy tokens) carried
inside the segment as it is (reval_jax.data.batch). Per-trajectory
fields live in M slots per row ([R, M]); slot m holds segment m + 1. Rows are filled first-fit
decreasing, then grouped into micro-batches of `rows` rows each, a multiple of the data-parallel
device count so that a micro-batch always splits over the devices (the last one may be shorter,
still a multiple). A padded batch is one special case: `pack_rows` keeps one trajectory per row.

    plan = plan_rows(lengths, row_len, max_segments)          # host, numpy: which rows hold what
    micro, layout = pack(batch, ...)                          # list of Packed micro-batches
    per_traj = layout.gather(values [R, M] of each micro-batch)  # back to the batch's order [B]
    per_token = layout.unpack_tokens(values [R, L] ...)        # back to the padded layout [B, T]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from reval_jax.data.batch import Array, Trajectories

TOKEN_FIELDS = ("tokens", "segment_ids", "positions", "response_mask", "ref_logp", "sampler_logp")
SLOT_FIELDS = ("valid", "s1", "reward", "raw_reward", "ref_v", "weight", "advantage", "group_id")
DTYPES = {
    "tokens": np.int32, "segment_ids": np.int32, "positions": np.int32, "response_mask": np.bool_,
    "ref_logp": np.float32, "sampler_logp": np.float32, "valid": np.bool_, "s1": np.int32,
    "reward": np.float32, "raw_reward": np.float32, "ref_v": np.float32, "weight": np.float32,
    "advantage": np.float32, "group_id": np.int32,
}


@flax.struct.dataclass
class Packed:
    """R rows of L tokens holding up to M trajectories each (host numpy or device jax arrays)."""

    tokens: Array  # [R, L] int32
    segment_ids: Array  # [R, L] int32  slot m's tokens carry m + 1; 0 = padding
    positions: Array  # [R, L] int32  position inside the trajectory
    response_mask: Array  # [R, L] bool  policy tokens (loss targets; not contiguous in a multi-turn trajectory)
    ref_logp: Array  # [R, L] f32  log π_ref of the token, 0 where not response
    sampler_logp: Array  # [R, L] f32  the sampler's log q of the token, 0 where not response
    valid: Array  # [R, M] bool  the slot holds a trajectory
    s1: Array  # [R, M] int32  index in the row of the trajectory's last prompt token (predicts a_1)
    reward: Array  # [R, M] f32  transformed reward
    raw_reward: Array  # [R, M] f32
    ref_v: Array  # [R, M] f32  V_ref(s_1)
    weight: Array  # [R, M] f32  importance weight (1 = none)
    advantage: Array  # [R, M] f32  GRPO advantage of the whole update batch's groups
    group_id: Array  # [R, M] int32

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, L, M)."""
        return (*self.tokens.shape, self.valid.shape[1])


def segment_sums(x: jax.Array, segment_ids: jax.Array, num_slots: int) -> jax.Array:
    """Σ_t x[r, t] over the tokens of each slot: [R, L] -> [R, M], a plain float32 reduction
    (no scatter, no matmul: exact sums on every backend)."""
    import jax.numpy as jnp

    slots = jnp.arange(1, num_slots + 1, dtype=segment_ids.dtype)  # [M]
    member = segment_ids[:, :, None] == slots  # [R, L, M]
    return jnp.sum(jnp.where(member, x[:, :, None], 0.0), axis=1)  # [R, M]


def token_slots(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The per-slot `values` [R, M] spread onto the tokens of each slot: [R, L] (0 on padding)."""
    import jax.numpy as jnp

    index = jnp.maximum(segment_ids - 1, 0)  # [R, L]
    return jnp.where(segment_ids > 0, jnp.take_along_axis(values, index, axis=1), 0)


# ----------------------------------------------------------------------------- planning


def real_spans(batch: Trajectories) -> tuple[np.ndarray, np.ndarray]:
    """(start [B], length [B]) of each trajectory's real tokens, which must be contiguous (any
    left/right padding layout). A multi-turn trajectory is one span too (environment tokens are real
    tokens, attended to as context); only its response_mask has gaps."""
    mask = np.asarray(batch.attn_mask)
    length = mask.sum(axis=1).astype(np.int64)
    start = np.argmax(mask, axis=1).astype(np.int64)
    inside = np.arange(mask.shape[1])[None, :] - start[:, None]
    contiguous = (mask == ((inside >= 0) & (inside < length[:, None]))).all(axis=1)
    if not contiguous.all() or (length == 0).any():
        bad = int(np.flatnonzero(~contiguous | (length == 0))[0])
        raise ValueError(f"trajectory {bad}: its real tokens (attn_mask) are empty or not contiguous; "
                         "the packer needs each trajectory as one span of prompt + response")
    return start, length


def plan_rows(lengths: np.ndarray, row_len: int, max_segments: int) -> list[list[int]]:
    """First-fit decreasing: rows of at most `row_len` tokens and `max_segments` trajectories.
    Deterministic (ties keep the batch order); each row lists its trajectories in placement order."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > row_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"trajectory {i} has {lengths[i]} tokens, more than a packed row ({row_len}); "
                         "rows must hold the longest trajectory (prompt bucket + max_new_tokens)")
    order = np.argsort(-lengths, kind="stable")
    room = np.zeros(0, np.int64)  # free tokens of each open row
    count = np.zeros(0, np.int64)
    rows: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero((room >= lengths[i]) & (count < max_segments))
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            room, count = np.append(room, row_len), np.append(count, 0)
        rows[r].append(int(i))
        room[r] -= lengths[i]
        count[r] += 1
    return rows


def micro_batch_rows(num_rows: int, *, devices: int, rows_per_micro_batch: int = 0,
                     micro_batches: int = 0) -> list[int]:
    """Rows of each micro-batch for `num_rows` packed rows: `rows_per_micro_batch` each (a token
    budget), or `micro_batches` about equal ones; every entry a multiple of `devices`."""
    if micro_batches:
        per = -(-num_rows // micro_batches)
        rows_per_micro_batch = -(-per // devices) * devices
    if rows_per_micro_batch < devices or rows_per_micro_batch % devices:
        raise ValueError(f"{rows_per_micro_batch} rows per micro-batch do not split over {devices} devices")
    sizes = []
    left = num_rows
    while left > 0:
        take = min(rows_per_micro_batch, -(-left // devices) * devices)
        sizes.append(take)
        left -= take
    return sizes or [devices]


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class Budget:
    """How trajectories are packed and split into micro-batches (the typed slice of the run config).

    row_len: tokens per row, at least the longest trajectory (prompt bucket + max_new_tokens).
    tokens_per_device: tokens each device holds in one forward/backward: a micro-batch has
      devices × max(1, tokens_per_device // row_len) rows. 0 = use `micro_batches`.
    micro_batches: an explicit number of micro-batches per call instead (0 = from the budget).
    devices: the data-parallel devices (data × fsdp) that split a micro-batch's rows.
    max_segments: trajectories per row at most (M, the slot count of per-trajectory arrays).
    max_segment_len: the longest trajectory packed (0 = unchecked): the update's attention reads
      only the keys within this reach (StepConfig.max_segment_len), so `pack` refuses a longer one."""

    row_len: int
    tokens_per_device: int = 0
    micro_batches: int = 0
    devices: int = 1
    max_segments: int = 16
    max_segment_len: int = 0

    def __post_init__(self):
        if self.row_len < 1 or self.max_segments < 1 or self.devices < 1:
            raise ValueError(f"{self}: row_len, max_segments and devices must be >= 1")
        if not (self.tokens_per_device or self.micro_batches):
            raise ValueError(f"{self}: set tokens_per_device or micro_batches")

    @property
    def rows_per_micro_batch(self) -> int:
        if self.micro_batches:
            return 0
        return self.devices * max(1, self.tokens_per_device // self.row_len)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each trajectory of the packed batch went: micro-batch, row, slot, offset in the row."""

    micro: np.ndarray  # [B] int64
    row: np.ndarray  # [B] int64  row within its micro-batch
    slot: np.ndarray  # [B] int64
    offset: np.ndarray  # [B] int64  first token in the row
    src_start: np.ndarray  # [B] int64  first real token in the padded batch
    length: np.ndarray  # [B] int64
    padded_length: int  # T of the padded batch
    tokens_processed: int  # R·L summed over the micro-batches

    def gather(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Per-slot values [R, M, ...] of each micro-batch -> [B, ...] in the batch's order."""
        values = [np.asarray(v) for v in values]
        return np.stack([values[j][r, m] for j, r, m in zip(self.micro, self.row, self.slot, strict=True)]) \
            if len(self.micro) else np.zeros((0,))

    def unpack_tokens(self, values: Sequence[np.ndarray], fill=0.0) -> np.ndarray:
        """Per-token values [R, L] of each micro-batch -> the padded layout [B, T]."""
        values = [np.asarray(v) for v in values]
        out = np.full((len(self.micro), self.padded_length), fill, values[0].dtype)
        for i, (j, r, o, s, n) in enumerate(zip(self.micro, self.row, self.offset, self.src_start,
                                                self.length, strict=True)):
            out[i, s : s + n] = values[j][r, o : o + n]
        return out


def pack(
    batch: Trajectories, budget: Budget, *, weights: np.ndarray | None = None,
    advantages: np.ndarray | None = None,
) -> tuple[list[Packed], Layout]:
    """Packs a host batch into micro-batches of `budget.row_len`-token rows (module docstring).

    weights [B] (default 1) and advantages [B] (default 0) travel with their trajectories."""
    fields = batch.to_numpy()
    B = batch.batch_size
    row_len, max_segments = budget.row_len, budget.max_segments
    start, length = real_spans(batch)
    batch.check_masks()  # policy tokens inside the span, after its first token; s1 predicts a_1
    if budget.max_segment_len and length.max(initial=0) > budget.max_segment_len:
        raise ValueError(f"a trajectory of {int(length.max())} tokens exceeds max_segment_len "
                         f"{budget.max_segment_len}, the reach of the update's banded attention")
    rows = plan_rows(length, row_len, max_segments)
    sizes = micro_batch_rows(len(rows), devices=budget.devices, rows_per_micro_batch=budget.rows_per_micro_batch,
                             micro_batches=budget.micro_batches)
    per_traj = {
        "reward": fields["reward"], "raw_reward": fields["raw_reward"], "ref_v": fields["ref_v"],
        "group_id": fields["group_id"],
        "weight": np.ones(B, np.float32) if weights is None else np.asarray(weights, np.float32),
        "advantage": np.zeros(B, np.float32) if advantages is None else np.asarray(advantages, np.float32),
    }
    lay = {k: np.zeros(B, np.int64) for k in ("micro", "row", "slot", "offset")}
    micro: list[Packed] = []
    first = 0
    for j, R in enumerate(sizes):
        L, M = row_len, max_segments
        arrays = {n: np.zeros((R, L), DTYPES[n]) for n in TOKEN_FIELDS}
        arrays.update({n: np.zeros((R, M), DTYPES[n]) for n in SLOT_FIELDS})
        for r, members in enumerate(rows[first : first + R]):
            offset = 0
            for m, i in enumerate(members):
                s, n = start[i], length[i]
                dst, src = slice(offset, offset + n), slice(s, s + n)
                for name in ("tokens", "response_mask", "ref_logp", "sampler_logp"):
                    arrays[name][r, dst] = fields[name][i, src]
                arrays["segment_ids"][r, dst] = m + 1
                arrays["positions"][r, dst] = np.arange(n)
                arrays["valid"][r, m] = True
                arrays["s1"][r, m] = offset + fields["s1_index"][i] - s
                for name, value in per_traj.items():
                    arrays[name][r, m] = value[i]
                lay["micro"][i], lay["row"][i], lay["slot"][i], lay["offset"][i] = j, r, m, offset
                offset += n
        first += R
        micro.append(Packed(**arrays))
    layout = Layout(**lay, src_start=start, length=length, padded_length=batch.length,
                    tokens_processed=int(sum(sizes)) * row_len)
    return micro, layout


def pack_rows(batch: Trajectories, *, weights=None, advantages=None) -> Packed:
    """The padded batch as it is, one trajectory per row (M = 1), on host or device: for the
    losses' tests and for comparing packed with unpacked results."""
    import jax.numpy as jnp

    xp = np if isinstance(batch.tokens, np.ndarray) else jnp
    B = batch.tokens.shape[0]
    mask = xp.asarray(batch.attn_mask)
    col = lambda x: xp.asarray(x)[:, None]
    return Packed(
        tokens=batch.tokens, segment_ids=mask.astype(xp.int32),
        positions=xp.maximum(xp.cumsum(mask, axis=1) - 1, 0).astype(xp.int32),
        response_mask=batch.response_mask, ref_logp=batch.ref_logp, sampler_logp=batch.sampler_logp,
        valid=xp.ones((B, 1), bool), s1=col(batch.s1_index), reward=col(batch.reward),
        raw_reward=col(batch.raw_reward), ref_v=col(batch.ref_v),
        weight=col(xp.ones(B, xp.float32) if weights is None else weights),
        advantage=col(xp.zeros(B, xp.float32) if advantages is None else advantages),
        group_id=col(batch.group_id),
    )
