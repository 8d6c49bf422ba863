"""Sequence statistics of packed trajectories without the [R, L, V] logits tensor.

For the tokens x_1..x_n of one trajectory (prompt then response) the quantities the losses need are

    log π(x_t | x_<t) = logit(s_{t-1}, x_t) / τ − V(s_{t-1}),   V(s) = logsumexp_a logit(s, a) / τ,

summed later over the policy tokens (the response mask), and V(s_1) at the last prompt position
(ALGORITHMS.md, Notation). In a multi-turn trajectory the environment tokens between the policy's turns
are context: the forward pass attends to them, but their log-probs are masked to 0 here and V is read
at s_1 only, so the logits at the positions that predict them get an exactly zero gradient.

Chunking is per row: the hidden states [R, L, D] are unembedded C positions of every row at a time
inside a `lax.scan` whose chunks have a written-out gradient (`_chunk_logprobs`: the backward pass
rebuilds a chunk's logits from its hidden states and logsumexp), so one [R, C, V] float32 block of
logits is alive at a time, forward and backward; a single chunk keeps its block for the backward
pass instead (3 unembedding dots per step, not 4). Each row stays on the device that holds it
(rows are split over the data axes), so the unembedding never splits its contraction across
devices and no logits-sized all-reduce exists; the unembedding weight is gathered once per call,
before the scan.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from reval_jax.model.decoder import Qwen2
from reval_jax.objective.packing import Packed

Array = jax.Array


@flax.struct.dataclass
class SequenceStats:
    logp: Array  # [B, T] f32: entry t = log π(token t | tokens < t); 0 where not a policy token
    v0: Array  # [B] f32: V(s_1), logsumexp of the logits at the last prompt position (s1_index)


def _chunk_logprobs(hc: Array, tc: Array, w: Array, temperature: float, tensor_axis: str | None,
                    keep: bool) -> Array:
    """log-softmax(hc @ w / τ)[tc] of one chunk, hc [R, C, D], tc [R, C] (global vocabulary ids;
    with `tensor_axis`, w [D, V_local] is this device's slice). Its gradient is written out, for
    an incoming g [R, C]:

        dlogits = g (onehot(tc) − p) / τ,   p = exp(logits − lse),   dh = dlogits wᵀ,   dw = hcᵀ dlogits

    one fused elementwise pass, no scatter into a zero [R, C, V] block and no max / exp / sum
    chain to differentiate. `keep`: the logits are saved for the backward pass (one chunk: the
    forward's block is the one the backward would rebuild); else the backward recomputes them
    from hc (one chunk of a scan: only hc, tc and the [R, C] lse are saved)."""
    return _chunk_vjp(hc, tc, w, temperature, tensor_axis, keep)


def _chunk_forward(hc, tc, w, temperature, tensor_axis):
    """(logp [R, C], logits [R, C, V_local], lse [R, C]) of one chunk."""
    V_local = w.shape[1]
    offset = 0 if tensor_axis is None else jax.lax.axis_index(tensor_axis) * V_local
    logits = jnp.einsum("RCD,DV->RCV", hc, w, preferred_element_type=jnp.float32) / temperature
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [R, C, 1]
    if tensor_axis is not None:
        top = jax.lax.pmax(top, tensor_axis)
    total = jnp.sum(jnp.exp(logits - top), axis=-1)  # [R, C]
    local = tc - offset
    inside = (local >= 0) & (local < V_local)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, V_local - 1)[..., None], axis=-1)[..., 0]
    picked = jnp.where(inside, picked, 0.0)  # [R, C]
    if tensor_axis is not None:
        total, picked = jax.lax.psum(total, tensor_axis), jax.lax.psum(picked, tensor_axis)
    lse = top[..., 0] + jnp.log(total)
    return picked - lse, logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunk_vjp(hc, tc, w, temperature, tensor_axis, keep):
    return _chunk_forward(hc, tc, w, temperature, tensor_axis)[0]


def _chunk_vjp_fwd(hc, tc, w, temperature, tensor_axis, keep):
    logp, logits, lse = _chunk_forward(hc, tc, w, temperature, tensor_axis)
    return logp, (hc, tc, w, lse, logits if keep else None)


def _chunk_vjp_bwd(temperature, tensor_axis, keep, res, g):
    hc, tc, w, lse, logits = res
    V_local = w.shape[1]
    if logits is None:
        logits = jnp.einsum("RCD,DV->RCV", hc, w, preferred_element_type=jnp.float32) / temperature
    offset = 0 if tensor_axis is None else jax.lax.axis_index(tensor_axis) * V_local
    vocab = offset + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    onehot = (vocab == tc[..., None]).astype(jnp.float32)
    dlogits = (g[..., None] / temperature) * (onehot - jnp.exp(logits - lse[..., None]))  # [R, C, V]
    # the dots see R·C as one axis: contracting over (R, C) made XLA copy dlogits to [C, R, V] first
    R, C, D = hc.shape
    dlogits, h2 = dlogits.reshape(R * C, -1), hc.reshape(R * C, D)
    dh = jnp.einsum("NV,DV->ND", dlogits.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if tensor_axis is not None:
        dh = jax.lax.psum(dh, tensor_axis)
    dw = jnp.einsum("ND,NV->DV", h2, dlogits.astype(hc.dtype), preferred_element_type=jnp.float32)
    return dh.reshape(R, C, D).astype(hc.dtype), None, dw.astype(w.dtype)


_chunk_vjp.defvjp(_chunk_vjp_fwd, _chunk_vjp_bwd)


def _row_logprobs(h: Array, targets: Array, w: Array, chunk: int, temperature: float,
                  tensor_axis: str | None = None, row_axes=None) -> Array:
    """log-softmax(h @ w)[target] for h [R, L, D], targets [R, L], C = `chunk` positions of every
    row at a time (`_chunk_logprobs`). Returns [R, L] f32. With `tensor_axis` (inside shard_map), w
    holds this device's slice of the vocabulary and the logsumexp and the picked logit are combined
    over that axis; `row_axes` are the axes the rows are split over: w is marked as varying over
    them once, before the loop, so its gradient is summed over devices once, not in every chunk.
    One chunk (L <= C) is one direct call that keeps its logits for the backward pass; several
    chunks run in a `lax.scan` whose backward rebuilds each chunk's logits."""
    R, L, D = h.shape
    C = min(chunk, L)
    if row_axes:
        w = jax.lax.pcast(w, row_axes, to="varying")
    if C == L:
        return _chunk_logprobs(h, targets, w, temperature, tensor_axis, keep=True)
    pad = -L % C
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(R, -1, C, D).swapaxes(0, 1)  # [L/C, R, C, D]
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(R, -1, C).swapaxes(0, 1)  # [L/C, R, C]

    def one(_, xs):
        hc, tc = xs
        return None, _chunk_logprobs(hc, tc, w, temperature, tensor_axis, keep=False)

    _, out = jax.lax.scan(one, None, (h, targets))  # [L/C, R, C]
    return out.swapaxes(0, 1).reshape(R, -1)[:, :L]


def _sharded_row_logprobs(h, targets, w, mesh, chunk: int, temperature: float) -> Array:
    """`_row_logprobs` with each device working on its own rows (shard_map over the data axes): the
    replicated unembedding's gradient is summed over devices once, after the chunk loop, instead of
    the compiler all-reducing a [D, V] or [rows, C, V] block for every chunk."""
    from jax.sharding import PartitionSpec as P

    from reval_jax.parallel.sharding import logical_to_spec

    rows = logical_to_spec(("act_batch",), None, mesh)[0]
    vocab = logical_to_spec(("act_vocab",), None, mesh)[0]
    row_axes = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
    fn = functools.partial(_row_logprobs, chunk=chunk, temperature=temperature, tensor_axis=vocab,
                           row_axes=row_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(rows, None, None), P(rows, None), P(None, vocab)),
                         out_specs=P(rows, None))(h, targets, w)


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """How `packed_stats` computes: `chunk` positions of every row per unembedding block, the
    sampling temperature τ, and `max_segment_len` > 0, a promise that no trajectory is longer (the
    attention then reads only the keys it can reach)."""

    chunk: int = 512
    temperature: float = 1.0
    max_segment_len: int = 0


def packed_stats(
    model: Qwen2, tokens: Array, segment_ids: Array, positions: Array, response_mask: Array, s1: Array,
    config: StatsConfig = StatsConfig(),
) -> tuple[Array, Array]:
    """(log π per token [R, L], V(s_1) per slot [R, M]) of `model` on packed rows (packing.Packed's
    fields of the same names; s1 [R, M] indexes each slot's last prompt token in its row).

    logp[r, t] = log π(tokens[r, t] | earlier tokens of its segment), 0 where not a policy token
    (response_mask, which may have gaps: environment tokens are attended to, never targets)."""
    chunk, temperature = config.chunk, config.temperature
    h, _ = model.hidden_states(tokens, positions=positions, mask=segment_ids > 0,
                               segment_ids=segment_ids, max_segment_len=config.max_segment_len)  # [R, L, D]
    w = model.unembed_weight()  # [D, V], gathered once for every chunk
    # position t predicts token t + 1: the pair (h[t], tokens[t + 1]) lands at t + 1. Pairs that
    # straddle two segments land on a segment's first token, a prompt token: masked below.
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [R, L]
    mesh = model.mesh
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if mesh is not None and tokens.shape[0] % dp == 0 and model.cfg.vocab_size % mesh.shape["tensor"] == 0:
        logp = _sharded_row_logprobs(h, next_tokens, w, mesh, chunk, temperature)
    else:
        logp = _row_logprobs(h, next_tokens, w, chunk, temperature)
    logp = jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))  # [R, L], aligned with tokens
    logp = jnp.where(response_mask, logp, 0.0)

    h1 = jnp.take_along_axis(h, s1[..., None].astype(jnp.int32), axis=1)  # [R, M, D]
    v = jax.nn.logsumexp(model.unembed(h1, w) / temperature, axis=-1)  # [R, M]
    return logp, v


def batch_stats(model: Qwen2, batch: Packed, *, chunk: int = 512, temperature: float = 1.0, max_segment_len: int = 0):
    """`packed_stats` of a Packed batch; empty slots get V = 0."""
    logp, v = packed_stats(model, batch.tokens, batch.segment_ids, batch.positions, batch.response_mask,
                           batch.s1, StatsConfig(chunk, temperature, max_segment_len))
    return logp, jnp.where(batch.valid, v, 0.0)


def sequence_stats(
    model: Qwen2, tokens: Array, attn_mask: Array, response_mask: Array, s1_index: Array, *,
    chunk: int = 512, temperature: float = 1.0,
) -> SequenceStats:
    """`packed_stats` of a padded batch [B, T] (any padding layout), one trajectory per row."""
    mask = attn_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
    logp, v = packed_stats(model, tokens, mask.astype(jnp.int32), positions, response_mask, s1_index[:, None],
                           StatsConfig(chunk, temperature))
    return SequenceStats(logp=logp, v0=v[:, 0])


def naive_sequence_stats(
    model: Qwen2, tokens: Array, attn_mask: Array, response_mask: Array, s1_index: Array, *,
    temperature: float = 1.0,
) -> SequenceStats:
    """Reference implementation through the full [B, T, V] logits (tests and debugging only)."""
    return stats_from_logits(model(tokens, mask=attn_mask), tokens, response_mask, s1_index, temperature=temperature)


def stats_from_logits(logits: Array, tokens: Array, response_mask: Array, s1_index: Array, *,
                      temperature: float = 1.0) -> SequenceStats:
    """The same statistics from given logits [B, T, V] of a padded batch (tests and debugging: a loss
    can be differentiated with respect to the logits themselves):

        logp[b, t] = logits[b, t−1, tokens[b, t]] / τ − V(s_{t−1}) where response_mask, else 0
        v0[b]      = V(s_1) = logsumexp(logits[b, s1_index[b]] / τ)"""
    logits = logits / temperature  # [B, T, V]
    logsm = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logsm, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    logp = jnp.where(response_mask, jnp.pad(picked, ((0, 0), (1, 0))), 0.0)
    v0 = jax.nn.logsumexp(logits[jnp.arange(tokens.shape[0]), s1_index], axis=-1)
    return SequenceStats(logp=logp, v0=v0)
