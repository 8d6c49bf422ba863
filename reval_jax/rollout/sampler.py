"""Generation: N samples per prompt from a jitted prefill and a jitted `lax.while_loop` decode.

    prompts --left-pad to a bucket P--> prefill [B, P] once --pad the cache to P + A slots, repeat
    it N times--> sample a_1 from the logits at P-1 --while some row has not stopped and h < A:
    one decode step for all B·N rows (KV cache updated in place, state donated)--> Rollout

Usage:

    config = SamplingConfig(max_new_tokens=512, num_samples=8, stop_ids=(eos, im_end))
    rollout = generate(model, prompt_token_lists, config, seed=step, prompt_ids=dataset_indices)
    batch = rollout.to_trajectories(iteration=step)  # reval_jax.data.batch.Trajectories

Layout. Prompts are LEFT-padded to a bucket length P (`SamplingConfig.buckets`), so every prompt's
last token sits at index P-1 and one scalar cache slot serves the whole batch. Sample n of prompt b
is row b·N + n. Response arrays have A = `max_new_tokens` columns; the response mask includes the
stop token and nothing after it; tokens after it are `pad_id` with log-prob 0.

Randomness. The noise of row (prompt b, sample n) at response step h comes from the key
fold_in(fold_in(fold_in(key(seed), prompt_ids[b]), n), h): a prompt's samples depend on the seed,
its id, the model and its own tokens, never on the other prompts of the batch or on the padding.

Log-probs. `Rollout.logp` is log q(a_h | s_h) in float32 under the distribution the token was
actually drawn from: softmax(logits / temperature) restricted to the top-k / top-p set and
renormalised. Greedy decoding draws from a point mass, so its log-probs are 0.

Sharding. With a model built on a mesh, the B·N rows (and the KV cache's batch axis) are split over
the logical axis `act_batch`, the cache's kv heads over `act_kv_heads` (see sharding.RULES).
"""

from __future__ import annotations

import dataclasses
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

Array = jax.Array

CACHE_AXES = (None, "act_batch", "act_length", "act_kv_heads", None)  # [L, B, S, K, H]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What to sample; hashable, a static argument of the compiled functions."""

    max_new_tokens: int  # A: response columns; a row that has not stopped by then is truncated
    num_samples: int = 1  # N samples per prompt
    temperature: float = 1.0  # logits are divided by it (ignored when greedy)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # then the smallest set of mass >= top_p (nucleus); 1.0 keeps all
    greedy: bool = False  # argmax instead of sampling (log-probs are then 0)
    stop_ids: tuple[int, ...] = ()  # e.g. (<|endoftext|>, <|im_end|>) for Qwen chat models
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)  # prompt lengths compiled for
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and "
                             f"num_samples={self.num_samples} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (greedy=True: argmax)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if not self.buckets or any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets={self.buckets}: expected a non-empty tuple of lengths >= 1")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))


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


@flax.struct.dataclass
class Rollout:
    """B·N sampled responses; row b·N + n is sample n of prompt b."""

    prompt_tokens: Array  # [B·N, P] int32  left-padded
    prompt_mask: Array  # [B·N, P] bool
    response_tokens: Array  # [B·N, A] int32  pad_id after the stop token
    response_mask: Array  # [B·N, A] bool  includes the stop token, nothing after it
    response_length: Array  # [B·N] int32  = response_mask.sum(-1)
    truncated: Array  # [B·N] bool  reached A tokens without a stop token
    logp: Array  # [B·N, A] f32  log q(a_h | s_h) of the sampling distribution, 0 where masked
    group_id: Array  # [B·N] int32  the prompt id of the sample
    version: Array  # [B·N, A] int32  policy version each token was sampled under, -1 where masked

    def to_trajectories(self, *, iteration: int = 0, pad_id: int = 0):
        """The trainer's host batch: tokens = prompt ++ response ([B·N, P + A]), masks and
        `sampler_logp` aligned with the tokens, s1_index = P - 1. The reward and reference fields
        are zero (ref_version -1): the caller fills them in."""
        from reval_jax.data.batch import Trajectories
        from reval_jax.parallel.distributed import to_host  # gathers arrays that span several hosts

        prompt, pmask = to_host(self.prompt_tokens), to_host(self.prompt_mask)
        response, rmask = to_host(self.response_tokens), to_host(self.response_mask)
        R, P = prompt.shape
        none = np.zeros_like(pmask)
        zeros = np.zeros((R,), np.float32)
        return Trajectories.from_numpy({
            "tokens": np.concatenate([prompt, np.where(rmask, response, pad_id)], 1),  # [R, P + A]
            "attn_mask": np.concatenate([pmask, rmask], 1),
            "response_mask": np.concatenate([none, rmask], 1),
            "s1_index": np.full((R,), P - 1),
            "group_id": to_host(self.group_id),
            "reward": zeros,
            "raw_reward": zeros,
            "ref_logp": np.zeros((R, P + rmask.shape[1]), np.float32),
            "ref_v": zeros,
            "ref_version": np.full((R,), -1),
            "sampler_logp": np.concatenate([none, np.where(rmask, to_host(self.logp), 0.0)], 1),
            "sampler_version": np.concatenate([np.full(pmask.shape, -1), np.where(rmask, to_host(self.version), -1)],
                                              1),
            "iteration": np.full((R,), iteration),
        })


# ----------------------------------------------------------------------------- host-side helpers


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; beyond the largest bucket, the next multiple of it."""
    for b in sorted(buckets):
        if b >= n:
            return b
    top = max(buckets)
    return -(-n // top) * top


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Left-pads token lists to `length`: tokens [B, length] int32, mask [B, length] bool."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for b, p in enumerate(prompts):
        if not 0 < len(p) <= length:
            raise ValueError(f"prompt {b} has {len(p)} tokens; expected 1..{length}")
        tokens[b, length - len(p):] = p
        mask[b, length - len(p):] = True
    return tokens, mask


# ----------------------------------------------------------------------------- model steps


def prefill(model: Qwen2, tokens: Array, mask: Array) -> tuple[Array, Cache]:
    """Left-padded prompts [B, P] through the model into a fresh cache of length P. Returns the
    float32 logits [B, V] at index P-1 (they predict a_1) and the cache (index P)."""
    B, P = tokens.shape
    h, cache = model.hidden_states(tokens, mask=mask, cache=init_cache(model.cfg, B, P))  # [B,P,D]
    return model.unembed(h[:, -1]), cache


def decode_step(model: Qwen2, tokens: Array, positions: Array, cache: Cache) -> tuple[Array, Cache]:
    """One token per row, tokens [B] at `positions` [B], written at slot `cache.index`. Returns the
    float32 logits [B, V] of the next token and the updated cache."""
    h, cache = model.hidden_states(tokens[:, None], positions=positions[:, None], cache=cache)
    return model.unembed(h[:, 0]), cache  # [B, V]


def _argmax(x: Array) -> Array:
    """argmax over the last axis (first index of the maximum) as two plain reductions: XLA's CPU
    argmax (a variadic value-index reduce) is ~8x slower on [B, V] logits."""
    top = jnp.max(x, -1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), -1)


def sample_logits(logits: Array, keys: Array, config: SamplingConfig) -> tuple[Array, Array]:
    """Draws one token per row from logits [B, V] with per-row keys [B]. Returns tokens [B] int32
    and their log-probs [B] f32 under the distribution drawn from:
        q = softmax(logits / temperature) on the top-k tokens, then on the smallest prefix (by
        decreasing probability) whose mass reaches top_p, renormalised; log q = 0 when greedy."""
    if config.greedy:
        return _argmax(logits), jnp.zeros(logits.shape[:1], jnp.float32)
    scaled = logits.astype(jnp.float32) / config.temperature  # [B, V]
    gumbel = jax.vmap(jax.random.gumbel, (0, None))  # one noise row per key
    draw = lambda keys, logq: _argmax(logq + gumbel(keys, logq.shape[1:]))  # Gumbel-max
    if config.top_k == 0 and config.top_p == 1.0:
        logq = jax.nn.log_softmax(scaled, -1)  # [B, V]
        tokens = draw(keys, logq)
        return tokens.astype(jnp.int32), jnp.take_along_axis(logq, tokens[:, None], -1)[:, 0]
    k = min(config.top_k or scaled.shape[-1], scaled.shape[-1])
    values, index = jax.lax.top_k(scaled, k)  # [B, k] in decreasing order
    if config.top_p < 1.0:
        probs = jax.nn.softmax(values, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the strictly more likely candidates
        values = jnp.where(before < config.top_p, values, -jnp.inf)  # the first one always stays
    logq = jax.nn.log_softmax(values, -1)  # [B, k]
    choice = draw(keys, logq)[:, None]  # [B, 1]
    tokens = jnp.take_along_axis(index, choice, -1)[:, 0]
    return tokens.astype(jnp.int32), jnp.take_along_axis(logq, choice, -1)[:, 0]


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


def _step_keys(keys: Array, step: Array) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


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
    base = jax.random.key(seed)
    keys = jax.vmap(lambda p, n: jax.random.fold_in(jax.random.fold_in(base, p), n))(
        jnp.repeat(prompt_ids, N), jnp.tile(jnp.arange(N), prompt_ids.shape[0]))  # [B·N]
    R = keys.shape[0]
    state = SamplerState(
        step=jnp.zeros((), jnp.int32), cache=cache,
        tokens=jnp.full((R, A), config.pad_id, jnp.int32), logp=jnp.zeros((R, A), jnp.float32),
        length=jnp.zeros((R,), jnp.int32), done=jnp.zeros((R,), bool),
        prompt_length=jnp.repeat(jnp.sum(mask, -1, dtype=jnp.int32), N), keys=keys,
    )
    first, logp = sample_logits(jnp.repeat(logits, N, 0), _step_keys(keys, state.step), config)
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
        tokens, logp = sample_logits(logits, _step_keys(s.keys, s.step), config)
        return _constrain_state(_record(s.replace(cache=cache), tokens, logp, config), model.mesh)

    return jax.lax.while_loop(cond, body, state)


def _padded_prompts(model: Qwen2, prompts: Sequence[Sequence[int]], config: SamplingConfig, prompt_ids):
    """Both samplers' inputs: the bucket P, left-padded tokens / mask [B, P] and prompt ids [B]
    (default 0..B-1), checked against the model's positions and the batch size."""
    B = len(prompts)
    P = bucket_length(max(len(p) for p in prompts), config.buckets)
    if P + config.max_new_tokens > model.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt bucket {P} + max_new_tokens {config.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={model.cfg.max_position_embeddings}"
        )
    tokens, mask = pad_prompts(prompts, P, config.pad_id)
    ids = np.arange(B, dtype=np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
    if ids.shape != (B,):
        raise ValueError(f"prompt_ids has shape {ids.shape}; expected ({B},)")
    return P, tokens, mask, ids


def generate(
    model: Qwen2, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, seed: int = 0,
    prompt_ids: Sequence[int] | None = None, engine=None, max_new_tokens: Sequence[int] | None = None,
    version: int = 0, weights=None, max_steps: int = 0, in_flight: str = "continue",
) -> Rollout:
    """Samples `config.num_samples` responses to each prompt (a list of token ids) with the rollout
    engine (`reval_jax.rollout.engine`: continuous batching on a paged KV cache).

    `prompt_ids` (default 0..B-1) identify the prompts, e.g. their dataset indices: they seed each
    prompt's samples together with `seed` and become the rollouts' `group_id`. `engine` is an
    `EngineConfig` (default: every sample in a slot of its own, pages of 16 tokens);
    `max_new_tokens` per prompt (default: config.max_new_tokens for all; none may exceed it).
    The Rollout's layout is the static sampler's: prompts left-padded to the bucket, A =
    config.max_new_tokens response columns.

    Asynchronous training (reval_jax.run.pipeline): `version` is the policy version of `model`;
    `weights`, `max_steps` and `in_flight` let newer weights in between decode calls
    (`Engine.run`); `Rollout.version` records each token's version."""
    from reval_jax.rollout.engine import Engine, EngineConfig

    B, N, A = len(prompts), config.num_samples, config.max_new_tokens
    P, tokens, mask, ids = _padded_prompts(model, prompts, config, prompt_ids)
    limits = np.full(B, A, np.int32) if max_new_tokens is None else np.asarray(max_new_tokens, np.int32)
    if limits.shape != (B,) or limits.min() < 1 or limits.max() > A:
        raise ValueError(f"max_new_tokens must be {B} values in 1..{A} (config.max_new_tokens)")
    if engine is None:  # every sample in a slot of its own, the static sampler's cache size
        engine = EngineConfig(slots=B * N, prefill_rows=B)
    out = Engine(model, config, engine, prompt_bucket=P, version=version).run(
        prompts, seed=seed, prompt_ids=ids, limits=limits, weights=weights, max_steps=max_steps, in_flight=in_flight)
    response = np.full((B * N, A), config.pad_id, np.int32)
    logp = np.zeros((B * N, A), np.float32)
    versions = np.full((B * N, A), -1, np.int32)
    length = np.zeros(B * N, np.int32)
    stopped = np.zeros(B * N, bool)
    stops = set(config.stop_ids)
    for b in range(B):
        for n, (tok, lp, ver) in enumerate(out[b]):
            r = b * N + n
            response[r, : len(tok)], logp[r, : len(tok)], length[r] = tok, lp, len(tok)
            versions[r, : len(tok)] = ver
            stopped[r] = len(tok) > 0 and int(tok[-1]) in stops
    return Rollout(
        prompt_tokens=jnp.asarray(np.repeat(tokens, N, 0)), prompt_mask=jnp.asarray(np.repeat(mask, N, 0)),
        response_tokens=jnp.asarray(response), response_mask=jnp.asarray(np.arange(A) < length[:, None]),
        response_length=jnp.asarray(length), truncated=jnp.asarray(~stopped), logp=jnp.asarray(logp),
        group_id=jnp.asarray(np.repeat(ids, N)), version=jnp.asarray(versions),
    )


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
    _, tokens, mask, ids = _padded_prompts(model, prompts, config, prompt_ids)
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
