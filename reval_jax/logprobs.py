"""Sequence statistics of a trajectory batch without the [B, T, V] logits tensor.

For tokens x_1..x_T (prompt then response) the quantities the losses need are

    log π(x_t | x_<t) = logit(s_{t-1}, x_t) / τ − V(s_{t-1}),   V(s) = logsumexp_a logit(s, a) / τ,

summed later over response tokens, and V(s_1) at the last prompt position (ALGORITHMS.md, Notation).
The hidden states [B, T, D] are unembedded `chunk` tokens at a time inside a rematerialised
`lax.scan`, so only one [chunk, V] float32 block of logits is ever alive, in the forward pass and in
the backward pass alike.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from reval_jax.model import Qwen2

Array = jax.Array


@flax.struct.dataclass
class SequenceStats:
    logp: Array  # [B, T] f32: entry t = log π(token t | tokens < t); 0 where not a response token
    v0: Array  # [B] f32: V(s_1), logsumexp of the logits at the last prompt position


def _token_logprobs(h: Array, targets: Array, unembed, chunk: int, temperature: float) -> Array:
    """log-softmax(unembed(h))[target] for flat h [M, D], targets [M], in chunks of `chunk` rows."""
    M, D = h.shape
    pad = -M % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, D)  # [M/C, C, D]
    targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)  # [M/C, C]

    @jax.checkpoint
    def one(_, xs):
        hc, tc = xs
        logits = unembed(hc) / temperature  # [C, V] f32
        lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]  # [C]
        return None, picked - lse

    _, out = jax.lax.scan(one, None, (h, targets))
    return out.reshape(-1)[:M]


def sequence_stats(
    model: Qwen2, tokens: Array, attn_mask: Array, response_mask: Array, s1_index: Array, *,
    chunk: int = 1024, temperature: float = 1.0,
) -> SequenceStats:
    """Per-token response log-probs and V(s_1) of `model` on a padded batch (any padding layout).

    tokens, attn_mask, response_mask: [B, T]; s1_index: [B] index of the last prompt token."""
    B, T = tokens.shape
    h, _ = model.hidden_states(tokens, mask=attn_mask)  # [B, T, D]
    D = h.shape[-1]
    # position t-1 predicts token t: pair h[:, :-1] with tokens[:, 1:]
    flat_h = h[:, :-1].reshape(B * (T - 1), D)  # [B·(T-1), D]
    flat_t = tokens[:, 1:].reshape(-1)  # [B·(T-1)]
    logp = _token_logprobs(flat_h, flat_t, model.unembed, min(chunk, flat_h.shape[0]), temperature)
    logp = jnp.pad(logp.reshape(B, T - 1), ((0, 0), (1, 0)))  # [B, T], aligned with tokens
    logp = jnp.where(response_mask, logp, 0.0)

    h1 = jnp.take_along_axis(h, s1_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, D]
    v0 = jax.nn.logsumexp(model.unembed(h1) / temperature, axis=-1)  # [B]
    return SequenceStats(logp=logp, v0=v0)


def naive_sequence_stats(
    model: Qwen2, tokens: Array, attn_mask: Array, response_mask: Array, s1_index: Array, *,
    temperature: float = 1.0,
) -> SequenceStats:
    """Reference implementation through the full [B, T, V] logits (tests and debugging only)."""
    logits = model(tokens, mask=attn_mask) / temperature  # [B, T, V]
    logsm = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logsm, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    logp = jnp.where(response_mask, jnp.pad(picked, ((0, 0), (1, 0))), 0.0)
    v0 = jax.nn.logsumexp(logits[jnp.arange(tokens.shape[0]), s1_index], axis=-1)
    return SequenceStats(logp=logp, v0=v0)
