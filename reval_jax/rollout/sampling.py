"""What both samplers share: the sampling config, the Rollout they return, prompt padding, the
sampling rule and the key rule.

Layout. Prompts are LEFT-padded to a bucket length P (`SamplingConfig.buckets`), so every prompt's
last token sits at index P-1. Sample n of prompt b is row b·N + n. Response arrays have A =
`max_new_tokens` columns; the response mask includes the stop token and nothing after it; tokens
after it are `pad_id` with log-prob 0.

Randomness (the key rule). The noise of sample n of a prompt at response step h (h = 0 draws a_1)
comes from the key fold_in(fold_in(fold_in(key(seed), prompt id), n), h): `sample_keys` gives the
first three folds, `step_keys` the last. A prompt's samples depend on the seed, its id, the model and
their own tokens, never on the other prompts of the batch, the padding, the slot or the pages.

Log-probs. `Rollout.logp` is log q(a_h | s_h) in float32 under the distribution the token was
actually drawn from: softmax(logits / temperature) restricted to the top-k / top-p set and
renormalised (`sample_logits`). Greedy decoding draws from a point mass, so its log-probs are 0.

On a mesh. The engine's decode step draws with `sample_logits_on_mesh`: each data replica samples
its own rows, and top-k / top-p rank a row's vocabulary across its tensor shards (a two-stage top-k,
or the rows dealt out whole over the shards) instead of gathering every slot's logits onto every
device; the tokens and log-probs are `sample_logits`' bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from reval_jax.parallel.sharding import logical_to_spec

Array = jax.Array


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
class Rollout:
    """B·N sampled responses; row b·N + n is sample n of prompt b."""

    prompt_tokens: Array  # [B·N, P] int32  left-padded
    prompt_mask: Array  # [B·N, P] bool
    response_tokens: Array  # [B·N, A] int32  pad_id after the stop token
    response_mask: Array  # [B·N, A] bool  policy tokens: includes the stop token, nothing after it
    # [B·N] int32  tokens after the prompt: = response_mask.sum(-1) for one turn; a multi-turn
    # episode's observation tokens are among them, not in response_mask
    response_length: Array
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
        seen = np.arange(rmask.shape[1])[None] < to_host(self.response_length)[:, None]  # observations included
        return Trajectories.from_numpy({
            "tokens": np.concatenate([prompt, np.where(seen, response, pad_id)], 1),  # [R, P + A]
            "attn_mask": np.concatenate([pmask, seen], 1),
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


# ----------------------------------------------------------------------------- prompts


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


def padded_prompts(max_positions: int, prompts: Sequence[Sequence[int]], config: SamplingConfig, prompt_ids):
    """Both samplers' inputs: the bucket P, left-padded tokens / mask [B, P] and prompt ids [B]
    (default 0..B-1), checked against the model's `max_positions` and the batch size."""
    B = len(prompts)
    P = bucket_length(max(len(p) for p in prompts), config.buckets)
    if P + config.max_new_tokens > max_positions:
        raise ValueError(
            f"prompt bucket {P} + max_new_tokens {config.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={max_positions}"
        )
    tokens, mask = pad_prompts(prompts, P, config.pad_id)
    ids = np.arange(B, dtype=np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
    if ids.shape != (B,):
        raise ValueError(f"prompt_ids has shape {ids.shape}; expected ({B},)")
    return P, tokens, mask, ids


# ----------------------------------------------------------------------------- keys and draws


def sample_keys(seed, prompt_ids: Array, samples: Array) -> Array:
    """[n] keys fold_in(fold_in(key(seed), prompt_ids[i]), samples[i]): one per (prompt, sample)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, n: jax.random.fold_in(jax.random.fold_in(base, p), n))(prompt_ids, samples)


def step_keys(keys: Array, step: Array) -> Array:
    """[n] keys of response step `step` (a scalar, or [n]: one step per row) from `sample_keys`."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))


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
    if not _truncates(config):
        logq = jax.nn.log_softmax(scaled, -1)  # [B, V]
        tokens = _gumbel_max(keys, logq)
        return tokens.astype(jnp.int32), jnp.take_along_axis(logq, tokens[:, None], -1)[:, 0]
    k = min(config.top_k or scaled.shape[-1], scaled.shape[-1])
    values, index = jax.lax.top_k(scaled, k)  # [B, k] in decreasing order
    return _draw_candidates(values, index, keys, config)


def _truncates(config: SamplingConfig) -> bool:
    """Whether the rule keeps only some tokens (top-k or top-p): then it ranks the vocabulary."""
    return not config.greedy and (config.top_k > 0 or config.top_p < 1.0)


def _gumbel_max(keys: Array, logq: Array) -> Array:
    """A draw from each row of logq [B, n] (log-probs): argmax(logq + Gumbel noise of its key)."""
    gumbel = jax.vmap(jax.random.gumbel, (0, None))  # one noise row per key
    return _argmax(logq + gumbel(keys, logq.shape[1:]))


def _draw_candidates(values: Array, index: Array, keys: Array, config: SamplingConfig) -> tuple[Array, Array]:
    """The draw from the top-k candidates of each row: values [B, k] f32 (scaled logits, decreasing;
    ties in increasing token order, `jax.lax.top_k`'s) and their tokens index [B, k]; the top-p
    cut, the renormalised log-probs and the Gumbel draw over the k ranks."""
    if config.top_p < 1.0:
        probs = jax.nn.softmax(values, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the strictly more likely candidates
        values = jnp.where(before < config.top_p, values, -jnp.inf)  # the first one always stays
    logq = jax.nn.log_softmax(values, -1)  # [B, k]
    choice = _gumbel_max(keys, logq)[:, None]  # [B, 1]
    tokens = jnp.take_along_axis(index, choice, -1)[:, 0]
    return tokens.astype(jnp.int32), jnp.take_along_axis(logq, choice, -1)[:, 0]


# ----------------------------------------------------------------------------- the rule on a mesh


def sample_logits_on_mesh(logits: Array, keys: Array, config: SamplingConfig, *, mesh, rows) -> tuple[Array, Array]:
    """`sample_logits` where every data replica draws its own rows: logits [B, V] (rows split over
    the mesh axes `rows`, None = every device all rows; the vocabulary over `act_vocab`'s axis, as
    the model's unembedding leaves it), keys [B] likewise by rows. The same tokens and log-probs,
    bit for bit, as `sample_logits` on the whole array: each row's candidates are the same values in
    the same order, and the rest of the rule runs on them unchanged.

    Only top-k / top-p rank the vocabulary, which a row's vocabulary shard cannot do alone; greedy
    and plain sampling (max and sums over the vocabulary, left to XLA) and a run without a mesh are
    `sample_logits` itself. With the vocabulary split over tp tensor shards:
      top_k = k < V / tp    two stages: each shard's own top k (token ids made global), gathered
                            over the tensor group ([b, tp·k] values and ids), then the top k of those
      otherwise (top-p on   the rows are dealt out over the tensor group (an all-to-all: each shard
        the whole vocab)    gets b / tp rows of the whole vocabulary), each samples its rows, and the
                            tokens and log-probs are gathered back ([b] each)
    So a step moves at most b·V·4 / tp bytes per device (b = B / replicas), never the B·V·4 of
    every slot's logits, which gathering them for a whole-vocabulary top_k did."""
    if mesh is None or not _truncates(config):
        return sample_logits(logits, keys, config)
    V = logits.shape[-1]
    vocab = logical_to_spec(("act_vocab",), (V,), mesh)[0]
    if vocab is not None and not isinstance(vocab, str):
        raise ValueError(f"act_vocab must map to one mesh axis, not {vocab}")
    tp = 1 if vocab is None else mesh.shape[vocab]

    def local(logits, keys):  # [b, V / tp], [b]
        if tp == 1:
            return sample_logits(logits, keys, config)
        if 0 < config.top_k < logits.shape[-1]:
            scaled = logits.astype(jnp.float32) / config.temperature
            return _draw_candidates(*_top_k_over_shards(scaled, config.top_k, vocab), keys, config)
        return _sample_dealt_rows(logits, keys, config, vocab, tp)

    spec = P(rows)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, vocab), spec), out_specs=(spec, spec),
                         check_vma=False)(logits, keys)


def _top_k_over_shards(scaled: Array, k: int, axis: str) -> tuple[Array, Array]:
    """The top k of rows whose vocabulary is split over the mesh axis `axis` (scaled [b, V / tp],
    this shard's tokens): values [b, k] decreasing and their global token ids. Each shard's top k,
    gathered in shard order, holds the row's top k; ties stay in increasing token order (top_k puts
    the lower position first, and shard s's tokens precede shard s + 1's)."""
    Vl = scaled.shape[-1]
    values, index = jax.lax.top_k(scaled, k)  # [b, k] this shard's
    index = index + jax.lax.axis_index(axis) * Vl  # global token ids
    values = jax.lax.all_gather(values, axis, axis=1, tiled=True)  # [b, tp·k]
    index = jax.lax.all_gather(index, axis, axis=1, tiled=True)
    values, pick = jax.lax.top_k(values, k)  # [b, k]
    return values, jnp.take_along_axis(index, pick, -1)


def _sample_dealt_rows(logits: Array, keys: Array, config: SamplingConfig, axis: str, tp: int):
    """`sample_logits` of rows whose vocabulary is split over the tp shards of `axis` (logits
    [b, V / tp]): an all-to-all gives shard t rows t·b/tp .. (t + 1)·b/tp − 1 whole (rows padded to
    a multiple of tp), it samples them, and the tokens and log-probs [b] are gathered back."""
    b = logits.shape[0]
    per = -(-b // tp)
    fill = jnp.minimum(jnp.arange(per * tp), b - 1)  # padding rows repeat the last row
    whole = jax.lax.all_to_all(logits[fill], axis, 0, 1, tiled=True)  # [per, V]: this shard's rows
    mine = jax.lax.dynamic_slice_in_dim(keys[fill], jax.lax.axis_index(axis) * per, per)
    tokens, logp = sample_logits(whole, mine, config)  # [per]
    gather = lambda x: jax.lax.all_gather(x, axis, axis=0, tiled=True)[:b]
    return gather(tokens), gather(logp)
