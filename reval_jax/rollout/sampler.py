"""Generation's front door: `generate` samples N responses to each prompt with the rollout engine.

    prompts --left-pad to a bucket P (the Rollout's layout)--> Engine.run (engine.py: continuous
    batching over decode slots on a paged KV cache; each prompt prefilled once for its N samples)
      --> per sample its tokens, log-probs and policy versions --> Rollout [B·N, P] / [B·N, A]

Usage:

    config = SamplingConfig(max_new_tokens=512, num_samples=8, stop_ids=(eos, im_end))
    rollout = generate(model, prompt_token_lists, config, seed=step, prompt_ids=dataset_indices)
    batch = rollout.to_trajectories(iteration=step)  # reval_jax.data.batch.Trajectories

The Rollout's layout, the key rule (a sample's tokens depend on the seed, its prompt id, its index
and the model only) and the log-probs are sampling.py's. `generate_static` (static_sampler.py, a
dense cache of P + A slots per row, one while loop over all rows) is the reference the engine is
tested against: the same seed gives the same tokens.

Every name below is importable from here: SamplingConfig, Rollout, bucket_length, pad_prompts,
sample_logits (sampling.py) and generate_static (static_sampler.py) as well as `generate` and its
`Pickup` (asynchronous training's policy version and weight pickup).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from reval_jax.model.decoder import Qwen2
from reval_jax.rollout.engine import NO_PICKUP, Engine, EngineConfig, Pickup, Turns
from reval_jax.rollout.sampling import (
    Rollout,
    SamplingConfig,
    bucket_length,
    pad_prompts,
    padded_prompts,
    sample_logits,
)
from reval_jax.rollout.static_sampler import generate_static

__all__ = ["Pickup", "Rollout", "SamplingConfig", "bucket_length", "generate", "generate_static", "pad_prompts",
           "sample_logits"]


def generate(
    model: Qwen2, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, seed: int = 0,
    prompt_ids: Sequence[int] | None = None, engine: EngineConfig | None = None,
    max_new_tokens: Sequence[int] | None = None, pickup: Pickup = NO_PICKUP, turns: Turns | None = None,
) -> Rollout:
    """Samples `config.num_samples` responses to each prompt (a list of token ids) with the rollout
    engine (`reval_jax.rollout.engine`: continuous batching on a paged KV cache).

    `prompt_ids` (default 0..B-1) identify the prompts, e.g. their dataset indices: they seed each
    prompt's samples together with `seed` and become the rollouts' `group_id`. `engine` is an
    `EngineConfig` (default: every sample in a slot of its own, pages of 16 tokens);
    `max_new_tokens` per prompt (default: config.max_new_tokens for all; none may exceed it).
    The Rollout's layout is the static sampler's: prompts left-padded to the bucket, A =
    config.max_new_tokens response columns.

    Asynchronous training (reval_jax.run.pipeline): `pickup` is the policy version of `model` and
    the newer weights that may come in between decode calls; `Rollout.version` records each token's
    version.

    Multi-turn episodes (`turns`, e.g. reval_jax.env.rollout.EnvTurns): each response is the
    episode's policy turns and observations after the prompt, and `response_mask` marks its policy
    tokens only (observation tokens have log-prob 0)."""
    B, N, A = len(prompts), config.num_samples, config.max_new_tokens
    P, tokens, mask, ids = padded_prompts(model.cfg.max_position_embeddings, prompts, config, prompt_ids)
    limits = np.full(B, A, np.int32) if max_new_tokens is None else np.asarray(max_new_tokens, np.int32)
    if limits.shape != (B,) or limits.min() < 1 or limits.max() > A:
        raise ValueError(f"max_new_tokens must be {B} values in 1..{A} (config.max_new_tokens)")
    if engine is None:
        engine = EngineConfig.one_slot_per_sample(B, N)
    out = Engine(model, config, engine, prompt_bucket=P, version=pickup.version).run(
        prompts, seed=seed, prompt_ids=ids, limits=limits, pickup=pickup, turns=turns)
    response = np.full((B * N, A), config.pad_id, np.int32)
    logp = np.zeros((B * N, A), np.float32)
    versions = np.full((B * N, A), -1, np.int32)
    policy = np.zeros((B * N, A), bool)
    length = np.zeros(B * N, np.int32)
    stopped = np.zeros(B * N, bool)
    stops = set(config.stop_ids)
    for b in range(B):
        for n, (tok, lp, ver, *own) in enumerate(out[b]):  # own: the policy mask of a multi-turn episode
            r = b * N + n
            response[r, : len(tok)], logp[r, : len(tok)], length[r] = tok, lp, len(tok)
            versions[r, : len(tok)] = ver
            policy[r, : len(tok)] = own[0] if own else True
            stopped[r] = len(tok) > 0 and int(tok[-1]) in stops
    return Rollout(
        prompt_tokens=jnp.asarray(np.repeat(tokens, N, 0)), prompt_mask=jnp.asarray(np.repeat(mask, N, 0)),
        response_tokens=jnp.asarray(response), response_mask=jnp.asarray(policy),
        response_length=jnp.asarray(length), truncated=jnp.asarray(~stopped), logp=jnp.asarray(logp),
        group_id=jnp.asarray(np.repeat(ids, N)), version=jnp.asarray(versions),
    )
