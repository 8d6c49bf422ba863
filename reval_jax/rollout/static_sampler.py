"""The static sampler: the reference the engine is tested against (and the benchmarks' baseline).

    prompts --left-pad to a bucket P--> prefill [B, P] once --pad the cache to P + A slots, repeat
    it N times--> sample a_1 from the logits at P-1 --while some row has not stopped and h < A:
    one decode step for all B·N rows (KV cache updated in place, state donated)--> Rollout

`generate` (sampler.py) runs the engine, not this; this is the plain program whose tokens and
log-probs the engine must reproduce: one dense KV cache of P + A slots per row, no slots, no pages.
Layout, randomness and log-probs are sampling.py's; one scalar cache slot serves the whole batch
because every prompt ends at index P-1.

Sharding. With a model built on a mesh, the B·N rows (and the KV cache's batch axis) are split over
the logical axis `act_batch`, the cache's kv heads over `act_kv_heads` (see sharding.RULES).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reval_jax.model.decoder import Cache, Qwen2, init_cache
from reval_jax.parallel.sharding import constrain, named_sharding
from reval_jax.rollout.sampling import Rollout, SamplingConfig, padded_prompts, sample_keys, sample_logits, step_keys

Array = jax.Array

CACHE_AXES = (None, "act_batch", "act_length", "act_kv_heads", None)  # [L, B, S, K, H]


@flax.struct.dataclass
class SamplerState:
    """The decode loop's carry; `step` = h, the number of response tokens sampled so far."""

    step: Array  # [] int32
    cache: Cache  # k, v [L, B·N, P + A, K, H]; slots 0..P-1 hold the prompt
    tokens: Array  # [B·N, A] int32  sampled tokens, pad_id after the stop token
    logp: Array  # [B·N, A] f32  log q of each sampled token, 0 after the stop token
    length: Array  # [B·N] int32  response tokens so far, stop token included
    done: Array  # [B·N] bool  the row has produced a stop token
    prompt_length: Array  # [B·N] int32  real prompt tokens: the position of a_1
    keys: Array  # [B·N] PRNG keys of (seed, prompt id, sample index)


# ----------------------------------------------------------------------------- model steps


def prefill(model: Qwen2, tokens: Array, mask: Array) -> tuple[Array, Cache]:
    """Left-padded prompts [B, P] through the model into a fresh cache of length P. Returns the
    float32 logits [B, V] at index P-1 (they predict a_1) and the cache (index P)."""
    B, P = tokens.shape
    hidden, cache = model.hidden_states(tokens, mask=mask, cache=init_cache(model.cfg, B, P))  # [B, P, D]
    return model.unembed(hidden[:, -1]), cache


def decode_step(model: Qwen2, tokens: Array, positions: Array, cache: Cache) -> tuple[Array, Cache]:
    """One token per row, tokens [B] at `positions` [B], written at slot `cache.index`. Returns the
    float32 logits [B, V] of the next token and the updated cache."""
    hidden, cache = model.hidden_states(tokens[:, None], positions=positions[:, None], cache=cache)  # [B, 1, D]
    return model.unembed(hidden[:, 0]), cache  # [B, V]


# ----------------------------------------------------------------------------- compiled loop


def _constrain_state(state: SamplerState, mesh: Mesh | None) -> SamplerState:
    if mesh is None:
        return state
    row = lambda x: constrain(x, mesh, ("act_batch",) + (None,) * (x.ndim - 1))
    cache = state.cache.replace(
        k=constrain(state.cache.k, mesh, CACHE_AXES), v=constrain(state.cache.v, mesh, CACHE_AXES),
        valid=row(state.cache.valid),
    )
    return state.replace(
        cache=cache, tokens=row(state.tokens), logp=row(state.logp), length=row(state.length),
        done=row(state.done), prompt_length=row(state.prompt_length), keys=row(state.keys),
    )


def _record(state: SamplerState, tokens: Array, logp: Array, config: SamplingConfig):
    """Writes the tokens [B·N] sampled at step h into column h; stopped rows write padding."""
    active = ~state.done
    tokens = jnp.where(active, tokens, config.pad_id)
    logp = jnp.where(active, logp, 0.0)
    stop = jnp.zeros_like(active)
    for s in config.stop_ids:
        stop = stop | (tokens == s)
    return state.replace(
        step=state.step + 1,
        tokens=jax.lax.dynamic_update_slice(state.tokens, tokens[:, None], (0, state.step)),
        logp=jax.lax.dynamic_update_slice(state.logp, logp[:, None], (0, state.step)),
        length=state.length + active,
        done=state.done | (active & stop),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _prefill(graphdef, params, tokens, mask, prompt_ids, seed, *, config: SamplingConfig):
    """Prefills the B prompts once, repeats the cache to B·N rows and samples a_1."""
    model = nnx.merge(graphdef, params)
    N, A = config.num_samples, config.max_new_tokens
    logits, cache = prefill(model, tokens, mask)  # [B, V]
    grow = lambda x: jnp.repeat(jnp.pad(x, [(0, 0), (0, 0), (0, A), (0, 0), (0, 0)]), N, 1)
    cache = Cache(  # k, v [L, B·N, P + A, K, H]
        k=grow(cache.k), v=grow(cache.v), index=cache.index,
        valid=jnp.repeat(jnp.pad(cache.valid, [(0, 0), (0, A)]), N, 0),  # [B·N, P + A]
    )
    keys = sample_keys(seed, jnp.repeat(prompt_ids, N), jnp.tile(jnp.arange(N), prompt_ids.shape[0]))  # [B·N]
    R = keys.shape[0]
    state = SamplerState(
        step=jnp.zeros((), jnp.int32), cache=cache,
        tokens=jnp.full((R, A), config.pad_id, jnp.int32), logp=jnp.zeros((R, A), jnp.float32),
        length=jnp.zeros((R,), jnp.int32), done=jnp.zeros((R,), bool),
        prompt_length=jnp.repeat(jnp.sum(mask, -1, dtype=jnp.int32), N), keys=keys,
    )
    first, logp = sample_logits(jnp.repeat(logits, N, 0), step_keys(keys, state.step), config)
    return _constrain_state(_record(state, first, logp, config), model.mesh)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("state",)
)
def _decode(graphdef, params, state: SamplerState, *, config: SamplingConfig) -> SamplerState:
    """Steps the state until every row has stopped or A tokens are sampled."""
    model = nnx.merge(graphdef, params)

    def cond(s: SamplerState):
        return (s.step < config.max_new_tokens) & ~jnp.all(s.done)

    def body(s: SamplerState):
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, 1, keepdims=False)  # [B·N]
        logits, cache = decode_step(model, last, s.prompt_length + s.step - 1, s.cache)
        tokens, logp = sample_logits(logits, step_keys(s.keys, s.step), config)
        return _constrain_state(_record(s.replace(cache=cache), tokens, logp, config), model.mesh)

    return jax.lax.while_loop(cond, body, state)


def generate_static(
    model: Qwen2, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, seed: int = 0,
    prompt_ids: Sequence[int] | None = None,
) -> Rollout:
    """The static sampler the engine replaced (kept as its reference and benchmark baseline):
    samples `config.num_samples` responses to each prompt (a list of token ids).

    `prompt_ids` (default 0..B-1) identify the prompts, e.g. their dataset indices: they seed each
    prompt's samples together with `seed` and become the rollouts' `group_id`. Prompts are
    left-padded to `bucket_length(longest prompt, config.buckets)`, so the compiled prefill and
    decode are reused across batches of the same size, bucket and config."""
    _, tokens, mask, ids = padded_prompts(model.cfg.max_position_embeddings, prompts, config, prompt_ids)
    if model.mesh is not None:
        put = lambda x: jax.device_put(x, named_sharding(
            model.mesh, ("act_batch",) + (None,) * (x.ndim - 1), x.shape))
        tokens, mask, ids = put(tokens), put(mask), put(ids)
    graphdef, params = nnx.split(model)
    state = _prefill(graphdef, params, tokens, mask, ids, np.uint32(seed), config=config)
    state = _decode(graphdef, params, state, config=config)
    N, A = config.num_samples, config.max_new_tokens
    response_mask = jnp.arange(A) < state.length[:, None]
    return Rollout(
        prompt_tokens=jnp.repeat(tokens, N, 0), prompt_mask=jnp.repeat(mask, N, 0),
        response_tokens=state.tokens, response_mask=response_mask,
        response_length=state.length, truncated=~state.done, logp=state.logp,
        group_id=jnp.repeat(ids, N), version=jnp.where(response_mask, 0, -1).astype(jnp.int32),
    )
