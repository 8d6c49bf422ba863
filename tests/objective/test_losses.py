"""Losses and reward transforms against plain numpy/Python loops on random data, padded (one
trajectory per row) and packed (several per row) alike."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reval_jax.data.batch import Trajectories
from reval_jax.objective import losses as L
from reval_jax.objective.losses import GRPO_AGGREGATIONS, LossNorm, grpo_advantages, transform_rewards
from reval_jax.objective.packing import Budget, pack, pack_rows

BETA = 0.05
B, T = 6, 12


def make_batch(seed: int, b: int = B, t: int = T, left_pad: bool = False) -> Trajectories:
    """Random trajectories with varying prompt and response lengths (some of length 1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=(b, t))
    attn = np.zeros((b, t), bool)
    resp = np.zeros((b, t), bool)
    s1 = np.zeros(b, np.int32)
    max_prompt = 4
    for i in range(b):
        prompt = int(rng.integers(1, max_prompt + 1))
        response = 1 if i == 0 else int(rng.integers(1, t - max_prompt + 1))
        start = max_prompt - prompt if left_pad else 0  # left padding: prompts end together
        attn[i, start : start + prompt + response] = True
        resp[i, start + prompt : start + prompt + response] = True
        s1[i] = start + prompt - 1
    raw = rng.integers(0, 2, size=b).astype(np.float32)
    group = np.repeat(np.arange((b + 1) // 2), 2)[:b]
    return Trajectories.from_numpy(
        dict(
            tokens=np.where(attn, tokens, 0),
            attn_mask=attn,
            response_mask=resp,
            s1_index=s1,
            group_id=group,
            reward=transform_rewards(raw, group, "centered"),
            raw_reward=raw,
            ref_logp=np.where(resp, -rng.exponential(1.0, (b, t)), 0.0),
            ref_v=rng.normal(0.0, 2.0, b),
            ref_version=np.zeros(b),
            sampler_logp=np.where(resp, -rng.exponential(1.0, (b, t)), 0.0),
            iteration=np.zeros(b),
        )
    )


def policy_inputs(batch: Trajectories, seed: int):
    """Policy log-probs near the reference ones (junk outside the response) and values."""
    rng = np.random.default_rng(seed + 100)
    logp = np.asarray(batch.ref_logp) + rng.normal(0.0, 0.3, batch.tokens.shape)
    logp = np.where(batch.response_mask, np.minimum(logp, 0.0), 7.0).astype(np.float32)
    v = (np.asarray(batch.ref_v) + rng.normal(0.0, 0.5, batch.batch_size)).astype(np.float32)
    return logp, v


def on_rows(fn):
    """A loss called on a padded batch: one trajectory per row (M = 1); per-trajectory metrics
    come back as [B]."""

    def call(logp, v, batch, norm, *, weights=None, advantages=None, **kwargs):
        rows = pack_rows(batch, weights=weights, advantages=advantages)
        v = None if v is None else jnp.asarray(v)[:, None]
        loss, metrics = fn(logp, v, rows, norm, **kwargs)
        return loss, {k: (x[:, 0] if jnp.ndim(x) == 2 else x) for k, x in metrics.items()}

    return call


LOSSES = {name: on_rows(fn) for name, fn in L.LOSSES.items()}
reval_loss, tbrm_loss, grpo_loss = LOSSES["reval"], LOSSES["tbrm"], LOSSES["grpo"]


# ----------------------------------------------------------------------------- numpy references


def loop_delta(kind: str, logp, v, batch: Trajectories, beta: float) -> np.ndarray:
    deltas = []
    for i in range(batch.batch_size):
        log_pi, log_ref = 0.0, 0.0
        for t in range(batch.length):
            if batch.response_mask[i, t]:
                log_pi += float(logp[i, t])
                log_ref += float(batch.ref_logp[i, t])
        r = float(batch.reward[i])
        if kind == "reval":
            d = (float(v[i]) - float(batch.ref_v[i])) + (log_pi - log_ref) - r / beta
        elif kind == "tbrm":
            d = float(v[i]) + log_pi - r / beta - log_ref
        else:
            d = log_pi - log_ref - r / beta
        deltas.append(d)
    return np.array(deltas)


def loop_grpo(logp, old, adv, batch, aggregation, max_len, lo=0.2, hi=0.28, c=3.0, cap=2.0):
    b, t = batch.tokens.shape
    seq_sums, seq_lens = [], []
    for i in range(b):
        a, total, count = float(adv[i]), 0.0, 0
        for j in range(t):
            if not batch.response_mask[i, j]:
                continue
            ratio = np.exp(np.clip(float(logp[i, j]) - float(old[i, j]), -20, 20))
            loss = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
            if a < 0:
                loss = min(loss, -a * c)
            w = min(np.exp(float(old[i, j]) - float(batch.sampler_logp[i, j])), cap)
            total += loss * w
            count += 1
        seq_sums.append(total)
        seq_lens.append(count)
    if aggregation == "token-mean":
        return sum(seq_sums) / sum(seq_lens)
    if aggregation == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(seq_sums, seq_lens, strict=True)) / b
    return sum(seq_sums) / (b * max_len)


# ----------------------------------------------------------------------------- value losses


@pytest.mark.parametrize("kind", ["reval", "tbrm", "regression"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_value_losses_match_loop(kind, left_pad):
    batch = make_batch(0, left_pad=left_pad)
    logp, v = policy_inputs(batch, 0)
    loss, metrics = LOSSES[kind](logp, v, batch, LossNorm.for_batch(batch), beta=BETA)
    delta = loop_delta(kind, logp, v, batch, BETA)
    np.testing.assert_allclose(metrics["delta"], delta, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss, np.mean(delta**2), rtol=1e-5)
    kl = loop_delta("regression", logp, v, batch, np.inf)  # Σ(log π_θ − log π_ref)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["v_diff"], v - batch.ref_v, rtol=1e-6)


@pytest.mark.parametrize("kind", ["reval", "tbrm", "regression"])
def test_importance_weights_scale_squared_residuals(kind):
    batch = make_batch(1)
    logp, v = policy_inputs(batch, 1)
    weights = np.random.default_rng(2).uniform(0.1, 1.0, B).astype(np.float32)
    loss, _ = LOSSES[kind](logp, v, batch, LossNorm.for_batch(batch), beta=BETA, weights=weights)
    delta = loop_delta(kind, logp, v, batch, BETA)
    np.testing.assert_allclose(loss, np.sum(weights * delta**2) / B, rtol=1e-5)


@pytest.mark.parametrize("stop_grad_v", [False, True])
def test_reval_gradient_is_eq4(stop_grad_v):
    batch = make_batch(3)
    logp, v = policy_inputs(batch, 3)
    norm = LossNorm.for_batch(batch)

    def loss_fn(logp, v):
        return reval_loss(logp, v, batch, norm, beta=BETA, stop_grad_v=stop_grad_v)[0]

    g_logp, g_v = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(logp), jnp.asarray(v))
    log_ratio = np.sum(np.where(batch.response_mask, logp - batch.ref_logp, 0.0), axis=1)
    v_diff = v - batch.ref_v
    # Eq. 4: −2/B · (r/β − (V_θ − V_ref + log π_θ/π_ref)) · ∇ log π_θ(τ), ∇ log π_θ(τ) = mask.
    coeff = -2.0 / B * (batch.reward / BETA - (v_diff + log_ratio))  # [B]
    expected_logp = coeff[:, None] * batch.response_mask
    np.testing.assert_allclose(g_logp, expected_logp, rtol=1e-5, atol=1e-6)
    expected_v = np.zeros(B) if stop_grad_v else coeff  # ∂δ/∂V_θ(s_1) = 1
    np.testing.assert_allclose(g_v, expected_v, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g_logp)[~batch.response_mask] == 0.0)


def test_calibrated_initialisation_reval_zero_tbrm_not():
    batch = make_batch(4)
    batch = batch.replace(reward=np.zeros(B, np.float32))
    logp = np.where(batch.response_mask, batch.ref_logp, -3.0).astype(np.float32)
    v = np.asarray(batch.ref_v).copy()
    norm = LossNorm.for_batch(batch)
    grads = {}
    for kind in ("reval", "tbrm"):
        fn = functools.partial(LOSSES[kind], batch=batch, norm=norm, beta=BETA)
        (loss, metrics), grads[kind] = jax.value_and_grad(
            lambda lp, vv, fn=fn: fn(lp, vv), argnums=(0, 1), has_aux=True
        )(jnp.asarray(logp), jnp.asarray(v))
        if kind == "reval":
            assert float(loss) == 0.0
            assert np.all(np.asarray(metrics["delta"]) == 0.0)
            assert all(np.all(np.asarray(g) == 0.0) for g in grads[kind])
        else:
            np.testing.assert_allclose(metrics["delta"], batch.ref_v, rtol=1e-6)  # δ = V_θ(s_1)
            np.testing.assert_allclose(loss, np.mean(np.square(batch.ref_v)), rtol=1e-5)
            assert float(loss) > 0.0
            assert np.abs(np.asarray(grads[kind][0])).max() > 0.0


# ----------------------------------------------------------------------------- GRPO


def grpo_inputs(seed: int, b: int = 8, t: int = T):
    batch = make_batch(seed, b=b, t=t)
    rng = np.random.default_rng(seed + 7)
    raw = np.array([1, 0, 0, 0, 1, 1, 1, 0][:b], np.float32)
    adv = grpo_advantages(raw, batch.group_id)
    batch = batch.replace(raw_reward=raw, reward=adv)
    old = np.where(batch.response_mask, batch.sampler_logp + rng.normal(0, 0.5, (b, t)), 0.0)
    delta = rng.uniform(-2.5, 2.5, (b, t))
    first = np.argmax(batch.response_mask, axis=1)  # first response token of each row
    delta[np.arange(1, 5), first[1:5]] = [100.0, 100.0, -100.0, 100.0]  # ±20 clamp (A = 0 rows)
    logp = np.where(batch.response_mask, old + delta, 0.0)
    return batch, logp.astype(np.float32), old.astype(np.float32)


@pytest.mark.parametrize("aggregation", GRPO_AGGREGATIONS)
def test_grpo_matches_loop(aggregation):
    batch, logp, old = grpo_inputs(5)
    max_len = T + 5
    norm = LossNorm.for_batch(batch, max_response_length=max_len)
    loss, metrics = grpo_loss(logp, None, batch, norm, old_logp=old, aggregation=aggregation,
                              advantages=batch.reward)
    expected = loop_grpo(logp, old, batch.reward, batch, aggregation, max_len)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The data exercises both clip bounds, the dual clip and the IS cap, on both signs of A.
    assert np.any(batch.reward > 0) and np.any(batch.reward < 0)
    for name in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "is_capped_frac"):
        assert 0.0 < float(metrics[name]) < 1.0, name


def test_grpo_clip_metrics_match_loop():
    batch, logp, old = grpo_inputs(6)
    _, metrics = grpo_loss(logp, None, batch, LossNorm.for_batch(batch), old_logp=old, advantages=batch.reward)
    low = high = dual = count = 0
    for i, j in zip(*np.nonzero(batch.response_mask), strict=True):
        a = float(batch.reward[i])
        ratio = np.exp(np.clip(logp[i, j] - old[i, j], -20, 20))
        clipped_loss = -a * min(max(ratio, 0.8), 1.28)
        if clipped_loss > -a * ratio:
            low += ratio < 0.8
            high += ratio > 1.28
        dual += a < 0 and max(-a * ratio, clipped_loss) > -a * 3.0
        count += 1
    np.testing.assert_allclose(metrics["clip_frac_low"], low / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], high / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac"], (low + high) / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["dual_clip_frac"], dual / count, rtol=1e-6)


def test_grpo_on_policy_defaults_and_gradient():
    """old_logp=None means ρ = 1: the loss is −A·w per token, its gradient −A·w·mask / tokens."""
    batch, _, logp = grpo_inputs(7)  # on-policy: the recomputed log-probs
    norm = LossNorm.for_batch(batch)

    def loss_fn(lp):
        return grpo_loss(lp, None, batch, norm, advantages=batch.reward)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
    w = np.minimum(np.exp(logp - batch.sampler_logp), 2.0)
    per_token = np.where(batch.response_mask, -batch.reward[:, None] * w, 0.0)
    n_tokens = batch.response_mask.sum()
    np.testing.assert_allclose(loss, per_token.sum() / n_tokens, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, per_token / n_tokens, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, None, batch, norm, aggregation="token-sum")


# ----------------------------------------------------------------------------- micro-batches


CASES = [("reval", {}), ("tbrm", {}), ("regression", {})] + [
    ("grpo", {"aggregation": a}) for a in GRPO_AGGREGATIONS
]


@pytest.mark.parametrize(("kind", "kwargs"), CASES)
def test_micro_batch_contributions_sum_to_full_batch(kind, kwargs):
    batch, logp, old = grpo_inputs(8)
    v = policy_inputs(batch, 8)[1]
    norm = LossNorm.for_batch(batch, max_response_length=T + 3)
    if kind == "grpo":
        fn = lambda b, idx: grpo_loss(logp[idx], v[idx], b, norm, **kwargs, old_logp=old[idx],
                                      advantages=b.reward)
    else:
        fn = lambda b, idx: LOSSES[kind](logp[idx], v[idx], b, norm, beta=BETA)
    full, full_metrics = fn(batch, np.arange(8))
    splits = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5, 6, 7])]
    parts = [fn(batch.take(idx), idx) for idx in splits]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), full, rtol=1e-5, atol=1e-7)
    for name, value in full_metrics.items():
        combined = (
            np.concatenate([p[1][name] for p in parts])
            if np.ndim(value)
            else sum(float(p[1][name]) for p in parts)
        )
        np.testing.assert_allclose(combined, value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_losses_jit():
    batch = make_batch(9)
    logp, v = policy_inputs(batch, 9)
    norm = LossNorm.for_batch(batch)
    fn = jax.jit(functools.partial(L.reval_loss, beta=BETA))
    jitted, _ = fn(logp, v[:, None], jax.tree.map(jnp.asarray, pack_rows(batch)), norm)
    eager, _ = reval_loss(logp, v, batch, norm, beta=BETA)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


# ----------------------------------------------------------------------------- packed rows


def packed_inputs(batch: Trajectories, logp, v, row_len: int, carrier="sampler_logp", **kwargs):
    """`batch` packed into rows of `row_len` tokens, with the policy's logp [B, T] and v [B] moved
    the same way (logp rides in a token field the loss under test does not read: `carrier`)."""
    moved = batch.replace(**{carrier: np.asarray(logp, np.float32)})
    micro, layout = pack(moved, Budget(row_len=row_len, micro_batches=1), **kwargs)
    (mb,) = micro
    packed_logp = getattr(mb, carrier)
    original = pack(batch, Budget(row_len=row_len, micro_batches=1))[0][0]
    mb = mb.replace(**{carrier: getattr(original, carrier)})
    v_slots = np.zeros(mb.valid.shape, np.float32)
    v_slots[layout.row, layout.slot] = v
    return mb, packed_logp, v_slots, layout


@pytest.mark.parametrize(("kind", "kwargs"), CASES)
@pytest.mark.parametrize("left_pad", [False, True])
def test_packed_rows_give_the_same_delta_and_loss(kind, kwargs, left_pad):
    """Several trajectories per row (segment sums, per-slot values) equal one per row."""
    batch, logp, old = grpo_inputs(12)
    if left_pad:
        batch = make_batch(12, b=8, left_pad=True).replace(raw_reward=batch.raw_reward, reward=batch.reward)
        logp = policy_inputs(batch, 12)[0]
    v = policy_inputs(batch, 12)[1]
    weights = np.random.default_rng(3).uniform(0.5, 1.0, 8).astype(np.float32)
    norm = LossNorm.for_batch(batch, max_response_length=T + 3)
    carrier = "ref_logp" if kind == "grpo" else "sampler_logp"
    mb, packed_logp, v_slots, layout = packed_inputs(batch, logp, v, row_len=2 * T, carrier=carrier,
                                                     weights=weights, advantages=batch.reward)
    assert mb.valid.sum(axis=1).max() >= 2  # rows really hold several trajectories
    extra = {"advantages": batch.reward} if kind == "grpo" else {"beta": BETA}
    if kind != "grpo":
        unpacked, m_unpacked = LOSSES[kind](logp, v, batch, norm, weights=weights, **extra)
        packed, m_packed = L.LOSSES[kind](packed_logp, v_slots, mb, norm, beta=BETA)
        for name in ("delta", "kl", "v_diff"):
            np.testing.assert_allclose(layout.gather([m_packed[name]]), m_unpacked[name], atol=1e-5, err_msg=name)
    else:
        unpacked, _ = LOSSES[kind](logp, v, batch, norm, **extra, **kwargs)
        packed, _ = L.LOSSES[kind](packed_logp, v_slots, mb, norm, **kwargs)
    np.testing.assert_allclose(packed, unpacked, rtol=1e-5, atol=1e-7)


def test_norm_of_packed_and_padded_batches_agree():
    batch = make_batch(13)
    mb, *_ = packed_inputs(batch, np.zeros(batch.tokens.shape), np.zeros(B), row_len=2 * T)
    a, b = LossNorm.for_batch(batch, max_response_length=T), LossNorm.for_batch(mb, max_response_length=T)
    assert float(a.num_sequences) == float(b.num_sequences) == B
    assert float(a.num_tokens) == float(b.num_tokens) == batch.response_mask.sum()


# ----------------------------------------------------------------------------- rewards

RAW = np.array([1, 0, 1, 1, 0, 1, 0, 0], np.float32)
GROUP = np.array([7, 7, 7, 3, 3, 9, 4, 4], np.int32)


def test_transform_rewards_hand_computed():
    np.testing.assert_array_equal(transform_rewards(RAW, GROUP, "binary"), RAW)
    np.testing.assert_array_equal(
        transform_rewards(RAW, GROUP, "plus_minus_one"), [1, -1, 1, 1, -1, 1, -1, -1]
    )
    centered = transform_rewards(RAW, GROUP, "centered")
    expected = [1 / 3, -2 / 3, 1 / 3, 0.5, -0.5, 1.0, 0.0, 0.0]  # group 9 (size 1) keeps r
    np.testing.assert_allclose(centered, expected, rtol=1e-6, atol=1e-7)
    assert isinstance(centered, np.ndarray) and centered.dtype == np.float32
    with pytest.raises(ValueError, match="transform"):
        transform_rewards(RAW, GROUP, "standardized")


def test_grpo_advantages_hand_computed():
    adv = grpo_advantages(RAW, GROUP)
    std7 = np.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased
    std3 = np.sqrt(0.5)
    expected = [
        (1 / 3) / (std7 + 1e-6),
        (-2 / 3) / (std7 + 1e-6),
        (1 / 3) / (std7 + 1e-6),
        0.5 / (std3 + 1e-6),
        -0.5 / (std3 + 1e-6),
        1.0 / (1.0 + 1e-6),  # size-1 group: mean 0, std 1
        0.0,  # all-equal group
        0.0,
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)


def test_reward_transforms_jax_and_numpy_agree():
    rng = np.random.default_rng(10)
    raw = rng.integers(0, 2, 16).astype(np.float32)
    group = rng.integers(0, 5, 16).astype(np.int32)
    for kind in ("binary", "centered", "plus_minus_one"):
        jitted = jax.jit(transform_rewards, static_argnums=2)(raw, group, kind)
        np.testing.assert_allclose(jitted, transform_rewards(raw, group, kind), atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(grpo_advantages)(raw, group), grpo_advantages(raw, group), rtol=1e-5, atol=1e-6
    )
    # Loop reference for the group statistics.
    for i in range(16):
        members = raw[group == group[i]]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = members.mean(), members.std(ddof=1)
        np.testing.assert_allclose(
            grpo_advantages(raw, group)[i], (raw[i] - mean) / (std + 1e-6), rtol=1e-5, atol=1e-6
        )


def test_tbrm_differs_from_reval_by_ref_value():
    batch = make_batch(11)
    logp, v = policy_inputs(batch, 11)
    norm = LossNorm.for_batch(batch)
    _, m_reval = reval_loss(logp, v, batch, norm, beta=BETA)
    _, m_tbrm = tbrm_loss(logp, v, batch, norm, beta=BETA)
    np.testing.assert_allclose(
        np.asarray(m_tbrm["delta"]) - np.asarray(m_reval["delta"]), batch.ref_v, atol=1e-4
    )


def test_pack_refuses_a_trajectory_longer_than_the_attention_band():
    """The update's attention reads only max_segment_len keys back (StepConfig.max_segment_len):
    a longer trajectory would be cut silently, so packing refuses it."""
    from reval_jax.objective.packing import real_spans

    batch = make_batch(9)
    longest = int(real_spans(batch)[1].max())
    row_len = batch.tokens.shape[1] * 2
    pack(batch, Budget(row_len=row_len, micro_batches=1, max_segment_len=longest))  # fits exactly
    with pytest.raises(ValueError, match=f"a trajectory of {longest} tokens exceeds max_segment_len {longest - 1}"):
        pack(batch, Budget(row_len=row_len, micro_batches=1, max_segment_len=longest - 1))
