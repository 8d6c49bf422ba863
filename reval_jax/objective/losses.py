"""Loss functions of ReVal and its baselines, and the reward transforms they use.

Every loss is a pure, jittable function of the policy's per-token log-probs `logp` [R, L] and
per-trajectory values `v` [R, M] = V_θ(s_1) on a `Packed` batch (reval_jax.objective.packing: R rows of L
tokens, up to M trajectories per row; entry t of `logp` is log π_θ(token t | earlier tokens of its
trajectory)). A padded batch is the case M = 1 (`packing.pack_rows`). It returns
`(loss_contribution, metrics)`.

Every sum, count and mean runs over the policy tokens only, `batch.response_mask`, which in a
multi-turn trajectory has gaps (ALGORITHMS.md, "Multi-turn trajectories"): the environment tokens
between turns are never loss targets and their log-probs never enter δ, a ratio or a token count,
and V_θ(s_1) is read at the first policy decision state only (the shaping terms telescope over the
policy's decision states). GRPO and the other baselines apply the same mask.

Gradient accumulation is exact: a loss is normalised by the counts of the WHOLE update batch,
given in `LossNorm`, so the contributions of its micro-batches sum to the full-batch loss.
In `metrics`, scalars are contributions too (sum them over micro-batches) and arrays of
shape [R, M] are per-trajectory values (0 in empty slots).

All sums run in float32, as reductions (never matmuls). `LOSSES` maps a loss name to its function;
which loss an algorithm uses, with which options, advantages and reward shaping, is its record in
reval_jax.objective.algorithms. The host-side reward and advantage math of the algorithms is here
too (group statistics on numpy arrays): reward transforms, GRPO and RLOO advantages, DAPO's overlong
penalty and its dynamic-sampling filter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reval_jax.data.batch import Array, Trajectories
from reval_jax.objective.packing import Packed, segment_sums, token_slots

GRPO_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
REWARD_TRANSFORMS = ("binary", "centered", "plus_minus_one")


@flax.struct.dataclass
class LossNorm:
    """Global counts of one update batch (all micro-batches, all devices together)."""

    num_sequences: Array  # [] f32  trajectories in the update batch
    num_tokens: Array  # [] f32  policy tokens (response_mask) in the update batch
    max_response_length: Array  # [] f32  constant divisor of the Dr. GRPO aggregation

    @classmethod
    def for_batch(cls, batch: Trajectories | Packed, max_response_length: int | None = None) -> LossNorm:
        """The counts of `batch` (padded or packed) taken as the whole update batch.

        `max_response_length` defaults to the padded length T; pass the configured constant
        generation limit to get the Dr. GRPO normalisation of the paper.
        """
        xp = np if isinstance(batch.response_mask, np.ndarray) else jnp
        mask = batch.response_mask
        if isinstance(batch, Packed):
            sequences = xp.sum(batch.valid)
            if max_response_length is None:
                raise ValueError("LossNorm.for_batch of a packed batch needs max_response_length")
        else:
            sequences = mask.shape[0]
        length = mask.shape[1] if max_response_length is None else max_response_length
        # numpy in -> numpy out: a host norm is the same value on every process of a multi-host run
        return cls(
            num_sequences=xp.asarray(sequences, xp.float32),
            num_tokens=xp.asarray(xp.sum(mask), xp.float32),
            max_response_length=xp.asarray(length, xp.float32),
        )


# ----------------------------------------------------------------------------- value losses


def _log_ratio_sum(logp: Array, batch: Packed) -> jax.Array:
    """Σ_h [log π_θ − log π_ref] over each trajectory's policy tokens (response_mask, gaps and all),
    differences first, in float32: [R, L] -> [R, M]."""
    mask = jnp.asarray(batch.response_mask)
    ref_logp = jax.lax.stop_gradient(jnp.asarray(batch.ref_logp, jnp.float32))
    diff = jnp.where(mask, jnp.asarray(logp, jnp.float32) - ref_logp, 0.0)  # [R, L]
    return segment_sums(diff, jnp.asarray(batch.segment_ids), batch.valid.shape[1])  # [R, M]


def _squared_residual_loss(delta: jax.Array, norm: LossNorm, batch: Packed) -> jax.Array:
    """Σ_i w_i δ_i² / num_sequences over the filled slots (w_i = batch.weight, 1 by default)."""
    w = jax.lax.stop_gradient(jnp.asarray(batch.weight, jnp.float32))
    sq = jnp.where(batch.valid, w * jnp.square(delta), 0.0)
    return jnp.sum(sq) / jnp.maximum(norm.num_sequences, 1.0)


def _value_metrics(delta: jax.Array, kl: jax.Array, v: jax.Array, batch: Packed) -> dict[str, jax.Array]:
    ref_v = jnp.asarray(batch.ref_v, jnp.float32)
    slot = lambda x: jax.lax.stop_gradient(jnp.where(batch.valid, x, 0.0))
    return {
        "delta": slot(delta),  # [R, M]
        "kl": slot(kl),  # [R, M]  Σ_h (log π_θ − log π_ref)
        "v_diff": slot(v - ref_v),  # [R, M]  V_θ(s_1) − V_ref(s_1)
    }


def _constants(batch: Packed) -> tuple[jax.Array, jax.Array]:
    ref_v = jax.lax.stop_gradient(jnp.asarray(batch.ref_v, jnp.float32))
    reward = jax.lax.stop_gradient(jnp.asarray(batch.reward, jnp.float32))
    return ref_v, reward


def reval_loss(
    logp: Array, v: Array, batch: Packed, norm: LossNorm, *, beta: float, stop_grad_v: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ReVal loss (paper Eq. 2).

        δ(τ) = [V_θ(s_1) − V_ref(s_1)] + Σ_h [log π_θ(a_h|s_h) − log π_ref(a_h|s_h)] − r(τ)/β
        L    = (1/N) Σ_i w_i δ(τ_i)²,      N = norm.num_sequences, w_i = batch.weight

    with h over the policy tokens only (a multi-turn trajectory's environment tokens are skipped) and
    s_1 the first policy decision state.

    Its gradient (Eq. 4) is −(2/N) Σ_i w_i (r/β − (V_θ − V_ref + log π_θ/π_ref)) ∇log π_θ(τ_i)
    plus the V_θ(s_1) term (dropped with `stop_grad_v`). Reference terms, reward and weights
    are constants. With π_θ = π_ref and r = 0 the loss and its gradient are exactly zero.
    """
    v = jnp.asarray(v, jnp.float32)
    if stop_grad_v:
        v = jax.lax.stop_gradient(v)
    kl = _log_ratio_sum(logp, batch)  # [R, M]
    ref_v, reward = _constants(batch)
    delta = (v - ref_v) + kl - reward / beta  # [R, M]
    return _squared_residual_loss(delta, norm, batch), _value_metrics(delta, kl, v, batch)


def tbrm_loss(
    logp: Array, v: Array, batch: Packed, norm: LossNorm, *, beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TBRM loss (Yuan et al. 2025), the baseline without the V_ref(s_1) term.

        δ(τ) = V_θ(s_1) + log π_θ(τ) − r(τ)/β − log π_ref(τ)
        L    = (1/N) Σ_i w_i δ(τ_i)²

    Unlike ReVal it is not zero when π_θ = π_ref and r = 0: δ = V_θ(s_1) then.
    """
    v = jnp.asarray(v, jnp.float32)
    kl = _log_ratio_sum(logp, batch)  # [R, M]
    _, reward = _constants(batch)
    delta = v + kl - reward / beta  # [R, M]
    return _squared_residual_loss(delta, norm, batch), _value_metrics(delta, kl, v, batch)


def regression_loss(
    logp: Array, v: Array, batch: Packed, norm: LossNorm, *, beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Regression variant (paper Eq. 8; close to Kimi k1.5 / OAPL).

        δ(τ) = log π_θ(τ) − log π_ref(τ) − r̂(τ)/β,    r̂ = r − mean_group(r) (batch.reward)
        L    = (1/N) Σ_i w_i δ(τ_i)²

    `v` takes no part in the loss; V_θ − V_ref is only reported.
    """
    v = jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
    kl = _log_ratio_sum(logp, batch)  # [R, M]
    _, reward = _constants(batch)
    delta = kl - reward / beta  # [R, M]
    return _squared_residual_loss(delta, norm, batch), _value_metrics(delta, kl, v, batch)


# ----------------------------------------------------------------------------- GRPO


@dataclasses.dataclass(frozen=True)
class GrpoClip:
    """GRPO's clipping settings (StepConfig's clip_low, clip_high, dual_clip, is_cap): the ratio is
    clipped to [1 − clip_low, 1 + clip_high], a negative-advantage token's loss is capped at
    −A·dual_clip, and the truncated importance weight at is_cap."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    is_cap: float = 2.0


@flax.struct.dataclass
class _GrpoTokens:
    """GRPO's per-token terms [R, L] (see `grpo_loss`)."""

    log_ratio: Array  # clamp(log π_θ − log π_old, −20, 20), 0 where not a policy token
    ratio: Array  # ρ_t
    unclipped: Array  # −A ρ_t
    clipped_term: Array  # −A clip(ρ_t, 1 − clip_low, 1 + clip_high)
    clipped: Array  # the larger of the two
    dual: Array  # −A·dual_clip
    is_weight: Array  # min(exp(log π_old − log π_sampler), is_cap)
    loss: Array  # ℓ_t · sg(is_weight)


def _grpo_tokens(logp: Array, old: Array, adv: Array, mask: Array, sampler_logp: Array,
                 clip: GrpoClip) -> _GrpoTokens:
    log_ratio = jnp.where(mask, jnp.clip(logp - old, -20.0, 20.0), 0.0)  # [R, L]
    ratio = jnp.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - clip.clip_low, 1.0 + clip.clip_high)
    clipped = jnp.maximum(loss1, loss2)
    loss3 = -adv * clip.dual_clip
    per_token = jnp.where(adv < 0, jnp.minimum(clipped, loss3), clipped)  # [R, L]
    is_weight = jnp.minimum(jnp.exp(jnp.where(mask, old - sampler_logp, 0.0)), clip.is_cap)
    per_token = per_token * jax.lax.stop_gradient(is_weight)
    return _GrpoTokens(log_ratio, ratio, loss1, loss2, clipped, loss3, is_weight, per_token)


def _grpo_aggregate(per_token: Array, mask: Array, maskf: Array, segments: Array, M: int, norm: LossNorm,
                    aggregation: str) -> jax.Array:
    """The per-token losses of the policy tokens (mask [R, L] bool, maskf the same in float32)
    aggregated as `grpo_loss` states."""
    num_sequences = jnp.maximum(norm.num_sequences, 1.0)
    token_sum = segment_sums(jnp.where(mask, per_token, 0.0), segments, M)  # [R, M]
    if aggregation == "token-mean":
        return jnp.sum(token_sum) / jnp.maximum(norm.num_tokens, 1.0)
    if aggregation == "seq-mean-token-mean":
        seq_mean = token_sum / jnp.maximum(segment_sums(maskf, segments, M), 1.0)  # [R, M]
        return jnp.sum(seq_mean) / num_sequences
    return jnp.sum(token_sum) / (num_sequences * norm.max_response_length)


def _grpo_metrics(t: _GrpoTokens, adv: Array, mask: Array, norm: LossNorm, clip: GrpoClip) -> dict[str, jax.Array]:
    def token_mean(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0)) / jnp.maximum(
            norm.num_tokens, 1.0
        )

    clip_active = t.clipped_term > t.unclipped
    return {
        "clip_frac": token_mean(clip_active),
        "clip_frac_low": token_mean(clip_active & (t.ratio < 1.0 - clip.clip_low)),
        "clip_frac_high": token_mean(clip_active & (t.ratio > 1.0 + clip.clip_high)),
        "dual_clip_frac": token_mean((adv < 0) & (t.clipped > t.dual)),
        "approx_kl": token_mean(-t.log_ratio),
        "is_weight_mean": token_mean(t.is_weight),
        "is_capped_frac": token_mean(t.is_weight >= clip.is_cap),
    }


def grpo_loss(
    logp: Array,
    v: Array,
    batch: Packed,
    norm: LossNorm,
    *,
    old_logp: Array | None = None,
    aggregation: str = "token-mean",
    clip: GrpoClip = GrpoClip(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO policy loss as in verl, with dual clip and truncated importance sampling (`clip`'s bounds).

        ρ_t   = exp(clamp(log π_θ − log π_old, −20, 20))
        ℓ_t   = max(−A ρ_t, −A clip(ρ_t, 1 − clip_low, 1 + clip_high))
        ℓ_t   = min(ℓ_t, −A·dual_clip)                              if A < 0
        ℓ_t  ←  ℓ_t · sg[min(exp(log π_old − log π_sampler), is_cap)]

    aggregated over the policy tokens m_it (response_mask) of the update batch by
      token-mean:               Σ_it m ℓ / num_tokens
      seq-mean-token-mean:      Σ_i (Σ_t m ℓ / Σ_t m) / num_sequences
      seq-mean-token-sum-norm:  Σ_it m ℓ / (num_sequences · max_response_length)   (Dr. GRPO)

    The advantages are `batch.advantage` [R, M] (`grpo_advantages` over the whole update batch's
    prompt groups, computed before packing); `old_logp` [R, L] defaults to sg(logp) (a single
    on-policy update, ρ = 1).
    `v` is unused. Metrics: clip fractions as token-mean contributions
    (`clip_frac`: the clipped term is taken; `clip_frac_low` / `clip_frac_high`: by which bound;
    `dual_clip_frac`: the dual clip is active), `approx_kl` (mean of log π_old − log π_θ),
    `is_weight_mean`, `is_capped_frac`.
    """
    del v
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"unknown GRPO aggregation {aggregation!r}; one of {GRPO_AGGREGATIONS}")
    mask = jnp.asarray(batch.response_mask)
    maskf = mask.astype(jnp.float32)  # [R, L]
    logp = jnp.asarray(logp, jnp.float32)
    old = jax.lax.stop_gradient(logp if old_logp is None else jnp.asarray(old_logp, jnp.float32))
    segments = jnp.asarray(batch.segment_ids)
    adv = token_slots(jnp.asarray(batch.advantage, jnp.float32), segments)  # [R, L]
    adv = jax.lax.stop_gradient(adv)
    tokens = _grpo_tokens(logp, old, adv, mask, jnp.asarray(batch.sampler_logp, jnp.float32), clip)
    loss = _grpo_aggregate(tokens.loss, mask, maskf, segments, batch.valid.shape[1], norm, aggregation)
    metrics = _grpo_metrics(tokens, adv, mask, norm, clip)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSSES: dict[str, LossFn] = {
    "reval": reval_loss,
    "tbrm": tbrm_loss,
    "regression": regression_loss,
    "grpo": grpo_loss,
}


# ----------------------------------------------------------------------------- rewards


def _xp(*arrays: Array):
    """numpy for all-numpy inputs (host side), jax.numpy otherwise (traceable)."""
    return np if all(isinstance(a, np.ndarray | np.generic) for a in arrays) else jnp


def _group_stats(raw: Array, group_id: Array):
    """Per-sample group size, group mean and unbiased group std (pairwise same-group mask)."""
    xp = _xp(raw, group_id)
    raw = xp.asarray(raw, dtype=xp.float32)
    group_id = xp.asarray(group_id)
    same = (group_id[:, None] == group_id[None, :]).astype(xp.float32)  # [B, B]
    count = xp.sum(same, axis=1)  # [B]
    mean = xp.sum(same * raw[None, :], axis=1) / count  # [B]  (no matmul: exact f32 sums)
    sq_dev = xp.sum(same * xp.square(raw[None, :] - mean[:, None]), axis=1)  # [B]
    std = xp.sqrt(sq_dev / xp.maximum(count - 1.0, 1.0))
    return xp, raw, count, mean, std


def transform_rewards(raw: Array, group_id: Array, kind: str) -> Array:
    """Reward transform used by the value losses (config `reward.transform`).

        binary:          r                   (0/1, unchanged)
        centered:        r − mean_group(r)   (std not divided; a group of size 1 keeps r)
        plus_minus_one:  2r − 1

    `raw` [B], `group_id` [B] (samples of one prompt share it). numpy in → numpy out.
    """
    if kind not in REWARD_TRANSFORMS:
        raise ValueError(f"unknown reward transform {kind!r}; one of {REWARD_TRANSFORMS}")
    xp, raw, count, mean, _ = _group_stats(raw, group_id)
    if kind == "binary":
        return raw
    if kind == "plus_minus_one":
        return 2.0 * raw - 1.0
    return xp.where(count > 1, raw - mean, raw)


def grpo_advantages(raw: Array, group_id: Array, eps: float = 1e-6) -> Array:
    """GRPO advantages: A_i = (r_i − mean_group) / (std_unbiased_group + eps).

    A group of size 1 uses mean 0 and std 1 (as verl). numpy in → numpy out.
    """
    xp, raw, count, mean, std = _group_stats(raw, group_id)
    single = count <= 1
    mean = xp.where(single, 0.0, mean)
    std = xp.where(single, 1.0, std)
    return ((raw - mean) / (std + eps)).astype(xp.float32)


def rloo_advantages(raw: Array, group_id: Array) -> Array:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics": the REINFORCE leave-one-out baseline): each sample's
    reward minus the mean reward of the OTHER samples of its group,

        A_i = r_i − (1/(n−1)) Σ_{j≠i, g_j=g_i} r_j  =  n/(n−1) · (r_i − mean_group(r)),

    with n the group size. A group of size 1 has no other sample: A = r (baseline 0, as GRPO's
    singleton). numpy in → numpy out.
    """
    xp, raw, count, _, _ = _group_stats(raw, group_id)
    group_id = xp.asarray(group_id)
    same = (group_id[:, None] == group_id[None, :]).astype(xp.float32)  # [B, B]
    others = xp.sum(same * raw[None, :], axis=1) - raw  # [B]  Σ_{j≠i} r_j of the group
    baseline = xp.where(count > 1, others / xp.maximum(count - 1.0, 1.0), 0.0)
    return (raw - baseline).astype(xp.float32)


def overlong_penalty(lengths: Array, max_length: int, cache: int) -> Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, "Overlong Reward Shaping"), added to the reward:

        R_length(y) = 0                               |y| ≤ L_max − L_cache
                      ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
                      −1                              L_max < |y|

    `lengths` [B] response lengths in policy tokens (`Trajectories.response_lengths`: a multi-turn
    trajectory's environment tokens do not count), `max_length` L_max, `cache` L_cache (0: no penalty
    up to L_max). numpy in → numpy out.
    """
    xp = _xp(lengths)
    lengths = xp.asarray(lengths, dtype=xp.float32)
    start = float(max_length - cache)
    ramp = (start - lengths) / max(float(cache), 1.0)
    penalty = xp.where(lengths <= start, 0.0, ramp)
    return xp.where(lengths > max_length, -1.0, penalty).astype(xp.float32)


def varied_groups(raw: Array, group_id: Array) -> np.ndarray:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, "Dynamic Sampling": the constraint 0 < |correct| < G): a
    keep mask [B] that is False on every sample of a group whose rewards are all equal (all right
    or all wrong: zero advantage, no gradient). Host side: numpy [B] -> bool [B]."""
    raw = np.asarray(raw, np.float32)
    group_id = np.asarray(group_id)
    same = group_id[:, None] == group_id[None, :]  # [B, B]
    high = np.max(np.where(same, raw[None, :], -np.inf), axis=1)  # [B] group max
    low = np.min(np.where(same, raw[None, :], np.inf), axis=1)  # [B] group min
    return high > low
