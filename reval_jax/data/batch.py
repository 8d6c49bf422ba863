"""The trajectory batch shared by the sampler, the replay buffer, the losses and the train step.

A `Trajectories` holds B sampled trajectories (prompt followed by response) padded to a common
length T. Per-token arrays are aligned with `tokens`: entry t is about token t, i.e. it was
predicted from position t − 1. The leaves are either all numpy arrays (host side: sampler output,
replay buffer) or all jax arrays (device side: train step); the helpers here work on both where
that makes sense and say so otherwise.

A multi-turn trajectory (ALGORITHMS.md, "Multi-turn trajectories") is still ONE span of real tokens,
the prompt and everything after it; inside it the response interleaves policy turns with
environment tokens (a tool's output, appended between turns):

    attn_mask      . . p p p a a a o o o o a a a . .     (. padding, p prompt, a policy, o environment)
    response_mask  . . . . . 1 1 1 . . . . 1 1 1 . .     policy tokens only: not contiguous
    s1_index             ^ the position whose logits predict the first policy token

Every loss sums over `response_mask` only and reads V(s_1) at `s1_index` (the first policy decision
state); environment tokens are context, never loss targets. `check_masks` states the layout the
packer and the losses rely on; the single-turn case is one policy turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.struct
import jax
import numpy as np

Array = jax.Array | np.ndarray

# Storage dtype of every field; `from_numpy` casts to these.
FIELD_DTYPES: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "attn_mask": np.dtype(np.bool_),
    "response_mask": np.dtype(np.bool_),
    "s1_index": np.dtype(np.int32),
    "group_id": np.dtype(np.int32),
    "reward": np.dtype(np.float32),
    "raw_reward": np.dtype(np.float32),
    "ref_logp": np.dtype(np.float32),
    "ref_v": np.dtype(np.float32),
    "ref_version": np.dtype(np.int32),
    "sampler_logp": np.dtype(np.float32),
    "iteration": np.dtype(np.int32),
    "sampler_version": np.dtype(np.int32),
}
# Fields `from_numpy` fills when they are missing (batches built before the field existed).
FIELD_DEFAULTS: dict[str, int] = {"sampler_version": -1}
# Fields with a time axis ([B, T]); the others are per trajectory ([B]).
TOKEN_FIELDS: tuple[str, ...] = (
    "tokens",
    "attn_mask",
    "response_mask",
    "ref_logp",
    "sampler_logp",
    "sampler_version",
)


@flax.struct.dataclass
class Trajectories:
    """B trajectories padded to length T (see the module docstring for the alignment)."""

    tokens: Array  # [B, T] int32  prompt followed by response, padded (left or right)
    attn_mask: Array  # [B, T] bool   real tokens, one span (prompt + every turn + environment tokens)
    response_mask: Array  # [B, T] bool   policy tokens incl. each turn's stop token (not contiguous)
    s1_index: Array  # [B] int32  index of the LAST prompt token (its logits predict a_1, the first policy token)
    group_id: Array  # [B] int32  which prompt this sample came from
    reward: Array  # [B] f32  transformed reward used by the loss
    raw_reward: Array  # [B] f32  verifier reward (0/1)
    ref_logp: Array  # [B, T] f32  log π_ref of token t, 0 where not response
    ref_v: Array  # [B] f32  V_ref(s_1)
    ref_version: Array  # [B] int32  reference version of ref_logp/ref_v (-1 = not computed)
    sampler_logp: Array  # [B, T] f32  sampler's log-prob of token t, 0 where not a policy token
    iteration: Array  # [B] int32  generation iteration that produced the sample
    sampler_version: Array  # [B, T] int32  policy version (updates) token t was sampled under, -1 where not policy

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def to_numpy(self) -> dict[str, np.ndarray]:
        """A dict field name → numpy array (copies device arrays to host)."""
        return {name: np.asarray(getattr(self, name)) for name in FIELD_DTYPES}

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, Array]) -> Trajectories:
        """Builds a host batch from a dict of arrays, casting each field to its storage dtype.

        Missing or unknown fields and inconsistent shapes raise ValueError.
        """
        if FIELD_DEFAULTS.keys() - arrays.keys() and "tokens" in arrays:
            shape = np.shape(arrays["tokens"])
            arrays = {**{k: np.full(shape if k in TOKEN_FIELDS else shape[:1], v)
                         for k, v in FIELD_DEFAULTS.items()}, **arrays}
        missing = sorted(set(FIELD_DTYPES) - set(arrays))
        unknown = sorted(set(arrays) - set(FIELD_DTYPES))
        if missing or unknown:
            raise ValueError(f"Trajectories fields: missing {missing}, unknown {unknown}")
        fields = {name: np.asarray(arrays[name], dtype=FIELD_DTYPES[name]) for name in FIELD_DTYPES}
        b, t = fields["tokens"].shape
        for name, value in fields.items():
            expected = (b, t) if name in TOKEN_FIELDS else (b,)
            if value.shape != expected:
                raise ValueError(f"field {name!r} has shape {value.shape}, expected {expected}")
        return cls(**fields)

    def take(self, index: np.ndarray) -> Trajectories:
        """Rows `index` (an integer or boolean numpy index array) of every field."""
        return jax.tree.map(lambda x: x[index], self)

    def pad_to(self, length: int, pad_id: int = 0) -> Trajectories:
        """Right-pads the time axis to `length` (host arrays): pad tokens, masks False, log-probs 0,
        versions -1.

        Indices (s1_index) are unchanged by right padding. A batch longer than `length` raises.
        """
        if self.length > length:
            raise ValueError(f"batch has length {self.length} > target length {length}")
        extra = length - self.length
        if extra == 0:
            return self
        fields = self.to_numpy()
        for name in TOKEN_FIELDS:
            fill = pad_id if name == "tokens" else FIELD_DEFAULTS.get(name, 0)
            fields[name] = np.pad(fields[name], ((0, 0), (0, extra)), constant_values=fill)
        return Trajectories.from_numpy(fields)

    def num_response_tokens(self) -> int:
        """Total number of response tokens (loss targets: policy tokens only) in the batch."""
        return int(np.asarray(self.response_mask).sum())

    def response_lengths(self) -> np.ndarray:
        """[B] int64 policy tokens of each trajectory (environment tokens not counted): the response
        length of the metrics and of length-based reward shaping (DAPO's overlong penalty)."""
        return np.asarray(self.response_mask).sum(axis=1).astype(np.int64)

    def policy_turns(self) -> np.ndarray:
        """[B] int64 policy turns of each trajectory: the runs of consecutive policy tokens (1 for
        a single-turn trajectory, 0 for an empty response)."""
        mask = np.asarray(self.response_mask)
        starts = mask & ~np.pad(mask[:, :-1], ((0, 0), (1, 0)))  # [B, T] first token of each run
        return starts.sum(axis=1).astype(np.int64)

    def check_masks(self) -> None:
        """Raises ValueError naming the first trajectory that breaks the layout of the module
        docstring: policy tokens (response_mask) outside its real tokens (attn_mask), a policy token
        first in its span (nothing to predict it from), or an `s1_index` other than the position
        just before its first policy token (V(s_1) is read at the first policy decision state).
        Host side (numpy); a trajectory without policy tokens is not checked for s1."""
        attn, resp = np.asarray(self.attn_mask, bool), np.asarray(self.response_mask, bool)
        first_real = np.argmax(attn, axis=1)
        first_policy = np.argmax(resp, axis=1)
        has_policy = resp.any(axis=1)
        rows = np.arange(attn.shape[0])
        problems = [
            ((resp & ~attn).any(axis=1), "has policy tokens (response_mask) outside its real tokens (attn_mask)"),
            (resp[rows, first_real] & attn[rows, first_real], "starts with a policy token: no prompt token before it"),
            (has_policy & (np.asarray(self.s1_index) != first_policy - 1),
             "has s1_index != (first policy token − 1): V(s_1) must be read where a_1 is predicted"),
        ]
        for bad, what in problems:
            if bad.any():
                raise ValueError(f"trajectory {int(np.flatnonzero(bad)[0])} {what}")


def concatenate(batches: Sequence[Trajectories]) -> Trajectories:
    """Concatenates host batches along the batch axis (all must share the same length T)."""
    if not batches:
        raise ValueError("concatenate needs at least one batch")
    lengths = {b.length for b in batches}
    if len(lengths) != 1:
        raise ValueError(f"cannot concatenate batches of different lengths {sorted(lengths)}")
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *batches)
