"""Multi-turn trajectories on the objective side (ALGORITHMS.md, "Multi-turn trajectories"): prompt,
policy turn, environment tokens (an observation), policy turn, ... in one span, with a response mask
that marks the policy tokens only and has gaps. Every loss sums over the policy tokens only: the
logits that predict environment tokens get an exactly zero gradient, while those tokens still
condition the later turns; δ equals an independent numpy computation from a `transformers` forward;
packing, replay (storage, sampling, state round trip, stale-reference recompute) and the staleness
bookkeeping carry the non-contiguous masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import hf_dir, hf_model, tiny_model

import reval_jax
from reval_jax.data.batch import Trajectories
from reval_jax.data.replay import ReplayBuffer
from reval_jax.objective import algorithms
from reval_jax.objective.logprobs import StatsConfig, batch_stats, packed_stats, sequence_stats, stats_from_logits
from reval_jax.objective.losses import GRPO_AGGREGATIONS, LOSSES, LossNorm
from reval_jax.objective.packing import Budget, pack, pack_rows
from reval_jax.objective.train_step import (
    OptimizerConfig,
    StepConfig,
    Updater,
    init_state,
    loss_and_grads,
    make_optimizer,
)

BETA = 0.1
# Segment lengths after the prompt alternate policy turn / environment tokens: (prompt, a1, o1, a2, ...)
TWO_TURN = [(3, 4, 3, 5), (2, 3, 4, 2), (4, 2, 2, 3), (1, 5, 2, 4)]
SINGLE = [(3, 6), (5, 2)]
THREE_TURN = [(2, 2, 3, 3, 2, 2)]


def layout_masks(spec: tuple[int, ...], T: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attn [T], response [T], environment [T]) of one trajectory whose span starts at `start`."""
    attn, resp, env = (np.zeros(T, bool) for _ in range(3))
    at = start
    for k, n in enumerate(spec):
        attn[at : at + n] = True
        if k > 0:
            (resp if k % 2 else env)[at : at + n] = True
        at += n
    return attn, resp, env


def make_batch(specs, T: int = 20, seed: int = 0, vocab: int = 128, left_pad: bool = False) -> Trajectories:
    """Hand-built trajectories of the given segment lengths, right-padded (or left-padded: spans
    ending at T), with mixed 0/1 rewards in prompt groups of two, random reference and sampler
    log-probs on the policy tokens (0 elsewhere) and sampler versions on the policy tokens (-1
    elsewhere)."""
    rng = np.random.default_rng(seed)
    B = len(specs)
    attn, resp = np.zeros((B, T), bool), np.zeros((B, T), bool)
    s1 = np.zeros(B, np.int32)
    for i, spec in enumerate(specs):
        start = T - sum(spec) if left_pad else 0
        attn[i], resp[i], _ = layout_masks(spec, T, start)
        s1[i] = start + spec[0] - 1
    raw = ((np.arange(B) + np.arange(B) // 2) % 2).astype(np.float32)  # every pair mixed, a single one rewarded
    group = np.arange(B) // 2
    return Trajectories.from_numpy(dict(
        tokens=np.where(attn, rng.integers(1, vocab, (B, T)), 0), attn_mask=attn, response_mask=resp, s1_index=s1,
        group_id=group, reward=raw - 0.5, raw_reward=raw, ref_logp=np.where(resp, -rng.exponential(1.0, (B, T)), 0.0),
        ref_v=rng.normal(0.0, 1.0, B), ref_version=np.zeros(B), iteration=np.zeros(B),
        sampler_logp=np.where(resp, -rng.exponential(1.0, (B, T)), 0.0),
        sampler_version=np.where(resp, 3, -1)))


def environment_tokens(batch: Trajectories) -> np.ndarray:
    """[B, T] the environment (observation) tokens: real, not policy, after the first policy token."""
    attn, resp = np.asarray(batch.attn_mask), np.asarray(batch.response_mask)
    after_s1 = np.arange(batch.length)[None, :] > np.asarray(batch.s1_index)[:, None]
    return attn & ~resp & after_s1


def shift_left(mask: np.ndarray) -> np.ndarray:
    """[B, T]: position t is marked when token t + 1 is (the logits at t predict token t + 1)."""
    return np.pad(mask[:, 1:], ((0, 0), (0, 1)))


def step_config(name: str, **kw) -> StepConfig:
    return StepConfig(loss=name, beta=BETA, **kw)


# ----------------------------------------------------------------------------- the batch layout


def test_batch_helpers_count_policy_tokens_and_turns():
    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN, T=20)
    specs = TWO_TURN + SINGLE + THREE_TURN
    np.testing.assert_array_equal(batch.response_lengths(), [sum(s[1::2]) for s in specs])
    np.testing.assert_array_equal(batch.policy_turns(), [len(s[1::2]) for s in specs])
    assert batch.num_response_tokens() == sum(sum(s[1::2]) for s in specs)
    batch.check_masks()
    make_batch(TWO_TURN, left_pad=True).check_masks()
    # right padding keeps the layout (masks False, versions -1, s1 unchanged)
    padded = batch.pad_to(26)
    np.testing.assert_array_equal(padded.response_mask[:, :20], batch.response_mask)
    np.testing.assert_array_equal(padded.s1_index, batch.s1_index)
    assert not padded.response_mask[:, 20:].any() and np.all(padded.sampler_version[:, 20:] == -1)
    np.testing.assert_array_equal(padded.policy_turns(), batch.policy_turns())


@pytest.mark.parametrize(("edit", "message"), [
    ("s1", "s1_index"), ("outside", "outside its real tokens"), ("first", "starts with a policy token")])
def test_pack_refuses_a_broken_multi_turn_layout(edit, message):
    batch = make_batch(TWO_TURN)
    fields = batch.to_numpy()
    if edit == "s1":  # V(s_1) read at the second turn's state instead of the first
        fields["s1_index"][1] = np.flatnonzero(environment_tokens(batch)[1])[-1]
    elif edit == "outside":
        fields["response_mask"][0, -1] = True
    else:
        fields["response_mask"][2, 0] = True
        fields["s1_index"][2] = -1
    broken = Trajectories.from_numpy(fields)
    with pytest.raises(ValueError, match=message):
        pack(broken, Budget(row_len=40, micro_batches=1))


# ----------------------------------------------------------------------------- losses against loops


def loop_value_delta(kind: str, logp, v, batch: Trajectories) -> np.ndarray:
    """δ of the value losses by a plain loop over the policy tokens."""
    out = []
    for i in range(batch.batch_size):
        kl = sum(float(logp[i, t]) - float(batch.ref_logp[i, t]) for t in range(batch.length)
                 if batch.response_mask[i, t])
        r = float(batch.reward[i]) / BETA
        out.append({"reval": float(v[i]) - float(batch.ref_v[i]) + kl - r, "tbrm": float(v[i]) + kl - r,
                    "regression": kl - r}[kind])
    return np.array(out)


def loop_grpo_on_policy(adv, batch: Trajectories, logp, aggregation: str, max_len: float) -> float:
    """GRPO at ρ = 1 by a plain loop: per policy token −A·min(exp(logp − sampler_logp), 2)."""
    sums, counts = [], []
    for i in range(batch.batch_size):
        terms = [-float(adv[i]) * min(np.exp(float(logp[i, t]) - float(batch.sampler_logp[i, t])), 2.0)
                 for t in range(batch.length) if batch.response_mask[i, t]]
        sums.append(sum(terms))
        counts.append(len(terms))
    if aggregation == "token-mean":
        return sum(sums) / sum(counts)
    if aggregation == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(sums, counts, strict=True)) / len(sums)
    return sum(sums) / (len(sums) * max_len)


@pytest.mark.parametrize("left_pad", [False, True])
def test_losses_on_non_contiguous_masks_match_loops_padded_and_packed(left_pad):
    """Every loss (and GRPO aggregation) of a mixed multi-/single-turn batch equals a loop over the
    policy tokens, one trajectory per row and several per row alike; junk log-probs at environment
    positions change nothing."""
    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN, seed=1, left_pad=left_pad)
    rng = np.random.default_rng(2)
    logp = np.where(batch.response_mask, np.minimum(batch.ref_logp + rng.normal(0, 0.3, batch.tokens.shape), 0), 9.0)
    logp = logp.astype(np.float32)
    v = (np.asarray(batch.ref_v) + rng.normal(0, 0.5, batch.batch_size)).astype(np.float32)
    adv = algorithms.get("grpo").batch_advantages(batch)
    norm = LossNorm.for_batch(batch, max_response_length=25)
    budget = Budget(row_len=40, micro_batches=1)
    (mb,), layout = pack(batch, budget, advantages=adv)
    assert mb.valid.sum(axis=1).max() >= 2
    mb_logp = pack(batch.replace(sampler_logp=logp), budget)[0][0].sampler_logp  # logp moved like the tokens
    v_slots = np.zeros(mb.valid.shape, np.float32)
    v_slots[layout.row, layout.slot] = v
    rows = pack_rows(batch, advantages=adv)
    for kind in ("reval", "tbrm", "regression"):
        expected = loop_value_delta(kind, logp, v, batch)
        loss, m = LOSSES[kind](logp, v[:, None], rows, norm, beta=BETA)
        np.testing.assert_allclose(m["delta"][:, 0], expected, rtol=1e-5, atol=1e-4, err_msg=kind)
        np.testing.assert_allclose(loss, np.mean(expected**2), rtol=1e-5, err_msg=kind)
        loss_p, m_p = LOSSES[kind](mb_logp, v_slots, mb, norm, beta=BETA)
        np.testing.assert_allclose(layout.gather([m_p["delta"]]), expected, rtol=1e-5, atol=1e-4, err_msg=kind)
        np.testing.assert_allclose(loss_p, loss, rtol=1e-5, err_msg=kind)
    for aggregation in GRPO_AGGREGATIONS:
        expected = loop_grpo_on_policy(adv, batch, logp, aggregation, 25.0)
        loss, _ = LOSSES["grpo"](logp, None, rows, norm, aggregation=aggregation)
        np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=aggregation)
        loss_p, _ = LOSSES["grpo"](mb_logp, None, mb, norm, aggregation=aggregation)
        np.testing.assert_allclose(loss_p, expected, rtol=1e-5, err_msg=aggregation)


def test_dapo_overlong_shaping_counts_policy_tokens_only():
    """DAPO's length penalty reads the policy tokens: a long observation does not make a short
    answer overlong."""
    from ml_collections import ConfigDict

    batch = make_batch([(2, 3, 12, 3), (2, 14)], T=20)
    config = ConfigDict({"sampling": {"max_new_tokens": 10}, "dapo": {"overlong_cache": 0.2},
                         "reward": {"transform": "binary"}})
    raw = np.ones(2, np.float32)
    shaped = algorithms.get("dapo").rewards(raw, np.asarray(batch.group_id), batch.response_lengths(), config)
    np.testing.assert_allclose(shaped, [1.0, 0.0])  # 6 policy tokens: no penalty; 14 > L_max: −1


# ----------------------------------------------------------------------------- gradients at environment positions


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
@pytest.mark.slow
def test_environment_logits_get_exactly_zero_gradient(name):
    """For every registered algorithm, ∂L/∂logits is exactly zero at every position whose logits
    predict an environment token (and at every other position outside δ), and nonzero exactly at
    s_1 and the positions predicting policy tokens."""
    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN, seed=3)
    model = tiny_model(seed=2)
    logits = model(jnp.asarray(batch.tokens), mask=jnp.asarray(batch.attn_mask))  # [B, T, V]
    algorithm = algorithms.get(name)
    loss_fn = algorithm.loss_fn(step_config(name, temperature=0.8))
    rows = pack_rows(batch, advantages=algorithm.batch_advantages(batch))
    norm = LossNorm.for_batch(batch)

    def loss(logits):
        s = stats_from_logits(logits, batch.tokens, batch.response_mask, batch.s1_index, temperature=0.8)
        return loss_fn(s.logp, s.v0[:, None], rows, norm)[0]

    grad = np.asarray(jax.grad(loss)(logits))  # [B, T, V]
    nonzero = np.abs(grad).max(axis=-1) > 0  # [B, T]
    env = shift_left(environment_tokens(batch))
    assert env.sum() >= 10 and np.all(grad[env] == 0.0)
    expected = shift_left(np.asarray(batch.response_mask))
    expected[np.arange(batch.batch_size), batch.s1_index] = True
    np.testing.assert_array_equal(nonzero, expected)


@pytest.mark.slow
def test_environment_tokens_are_context_and_zero_gradient_through_the_packed_path():
    """Through the real chunked, packed statistics: the final hidden states at positions predicting
    environment tokens get an exactly zero gradient from ReVal's loss, while changing the environment
    tokens changes every later policy token's log-prob (context) and nothing before them."""
    batch = make_batch(TWO_TURN + SINGLE, seed=4)
    graphdef, params = nnx.split(tiny_model(seed=2))
    (mb,), layout = pack(batch, Budget(row_len=30, micro_batches=1))
    assert mb.valid.sum(axis=1).max() >= 2

    def stats(eps):
        class Shifted:  # the model with `eps` added to its final hidden states
            def __init__(self, model):
                self.model = model

            def hidden_states(self, *args, **kwargs):
                h, rest = self.model.hidden_states(*args, **kwargs)
                return h + eps, rest

            def __getattr__(self, attr):
                return getattr(self.model, attr)

        return packed_stats(Shifted(nnx.merge(graphdef, params)), mb.tokens, mb.segment_ids, mb.positions,
                            mb.response_mask, mb.s1, StatsConfig(chunk=7))

    eps = jnp.zeros((*mb.tokens.shape, tiny_model(seed=2).cfg.hidden_size), jnp.float32)
    (logp, v), pullback = jax.vjp(stats, eps)
    norm = LossNorm.for_batch(batch)
    grads = jax.grad(lambda lp, vv: LOSSES["reval"](lp, vv, mb, norm, beta=BETA)[0], argnums=(0, 1))(logp, v)
    (d_eps,) = pullback(grads)
    touched = np.abs(np.asarray(d_eps)).max(axis=-1) > 0  # [R, L]
    env_packed = np.zeros(mb.tokens.shape, bool)
    for i in range(batch.batch_size):
        s, n, o = layout.src_start[i], layout.length[i], layout.offset[i]
        env_packed[layout.row[i], o : o + n] = shift_left(environment_tokens(batch))[i, s : s + n]
    assert env_packed.sum() >= 10 and not touched[env_packed].any()
    r, m = np.nonzero(mb.valid)
    assert touched[shift_left(np.asarray(mb.response_mask))].all() and touched[r, mb.s1[r, m]].all()

    # the environment tokens are context: other observations change the next turns' log-probs only
    env = environment_tokens(batch)
    other = batch.replace(tokens=np.where(env, (np.asarray(batch.tokens) + 17) % 127 + 1, batch.tokens))
    model = tiny_model(seed=2)
    run = lambda b: sequence_stats(model, jnp.asarray(b.tokens), jnp.asarray(b.attn_mask),
                                   jnp.asarray(b.response_mask), jnp.asarray(b.s1_index))
    a, b = run(batch), run(other)
    after = np.cumsum(env, axis=1) > 0  # positions after the first environment token
    resp = np.asarray(batch.response_mask)
    np.testing.assert_array_equal(np.asarray(a.logp)[resp & ~after], np.asarray(b.logp)[resp & ~after])
    np.testing.assert_array_equal(np.asarray(a.v0), np.asarray(b.v0))
    assert np.all(np.asarray(a.logp)[resp & after] != np.asarray(b.logp)[resp & after])


# ----------------------------------------------------------------------------- δ against transformers


def numpy_delta(policy, reference, batch: Trajectories, temperature: float) -> np.ndarray:
    """δ of each trajectory from `transformers` forwards of the policy and the reference, plain numpy:
    V = logsumexp(logits/T), log π = logit/T − V, sums over the policy tokens only, V at s_1."""
    import torch

    out = []
    for i in range(batch.batch_size):
        span = np.flatnonzero(batch.attn_mask[i])
        ids = np.asarray(batch.tokens)[i, span]
        terms = []
        for model in (policy, reference):
            with torch.no_grad():
                z = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double().numpy() / temperature
            V = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)  # [n]
            s1 = int(batch.s1_index[i] - span[0])
            log_pi = sum(z[t - 1, ids[t]] - V[t - 1] for t in range(1, len(span))
                         if batch.response_mask[i, span[t]])
            terms.append((V[s1], log_pi))
        (v_pol, lp_pol), (v_ref, lp_ref) = terms
        out.append((v_pol - v_ref) + (lp_pol - lp_ref) - float(batch.reward[i]) / BETA)
    return np.array(out)


def test_two_turn_delta_equals_numpy_from_transformers():
    """δ of two- and three-turn trajectories (packed with single-turn ones) through our packed
    statistics — reference terms by the reference pass, the policy's by the update's forward —
    equals δ computed in numpy from the HF models' logits."""
    temperature = 0.7
    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN, seed=5)
    policy, _ = reval_jax.load_hf(hf_dir(seed=0), load_tokenizer=False)
    reference, _ = reval_jax.load_hf(hf_dir(seed=1), load_tokenizer=False)
    (mb,), layout = pack(batch, Budget(row_len=40, micro_batches=1))
    stats = nnx.jit(functools.partial(batch_stats, chunk=8, temperature=temperature))
    ref_logp, ref_v = stats(reference, mb)
    filled = batch.replace(ref_logp=layout.unpack_tokens([ref_logp]), ref_v=layout.gather([ref_v]))
    assert np.all(filled.ref_logp[environment_tokens(batch)] == 0.0)
    (mb,), layout = pack(filled, Budget(row_len=40, micro_batches=1))
    logp, v = stats(policy, mb)
    _, metrics = LOSSES["reval"](logp, v, mb, LossNorm.for_batch(filled), beta=BETA)
    ours = layout.gather([metrics["delta"]])
    expected = numpy_delta(hf_model(seed=0), hf_model(seed=1), batch, temperature)
    assert np.abs(expected - (-np.asarray(batch.reward) / BETA)).min() > 0.1  # policy ≠ reference
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- packing: losses and gradients


@functools.cache
def _setup():
    graphdef, params = nnx.split(tiny_model(seed=0))
    params = jax.tree.map(jnp.copy, params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    return graphdef, optimizer, init_state(params, optimizer)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
@pytest.mark.slow
def test_packed_multi_turn_rows_give_the_padded_losses_and_gradients(name):
    """Several multi-turn trajectories per packed row, single-turn ones mixed in, over two
    micro-batches: the loss, the per-trajectory δ and the gradients equal those of the padded batch
    (one trajectory per row)."""
    cfg = step_config(name, chunk=8)
    graphdef, _, state = _setup()
    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN + TWO_TURN[:1], seed=6)
    advantages = cfg.algorithm.batch_advantages(batch)
    norm = LossNorm.for_batch(batch, max_response_length=20)
    micro, layout = pack(batch, Budget(row_len=32, micro_batches=2, max_segments=3), advantages=advantages)
    assert len(micro) == 2 and max(int(m.valid.sum(axis=1).max()) for m in micro) >= 2
    run = jax.jit(functools.partial(loss_and_grads, graphdef, cfg))
    packed_loss, packed_grads, packed_metrics = run(state.params, micro, norm)
    rows = [pack_rows(batch, advantages=advantages)]
    padded_loss, padded_grads, padded_metrics = run(state.params, rows, norm)
    np.testing.assert_allclose(float(packed_loss), float(padded_loss), rtol=1e-5, atol=1e-7)
    if "delta" in padded_metrics[0]:
        np.testing.assert_allclose(layout.gather([m["delta"] for m in packed_metrics]),
                                   np.asarray(padded_metrics[0]["delta"])[:, 0], rtol=1e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(padded_grads), jax.tree.leaves(packed_grads), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


# ----------------------------------------------------------------------------- replay


@pytest.mark.slow
def test_replay_keeps_multi_turn_masks_and_recomputes_reference_terms_on_policy_tokens(tmp_path):
    """Adding, sampling, the state round trip and the stale-reference recompute (the trainer's own
    `Learner.fill_reference`, packed by a token budget) keep the non-contiguous masks; recomputed
    reference log-probs are the reference's on the policy tokens and 0 on environment tokens."""
    from reval_jax.run.trainer import Learner

    batch = make_batch(TWO_TURN + SINGLE + THREE_TURN, T=20, seed=7)
    buf = ReplayBuffer(12, 24, seed=3)
    buf.add(batch)
    stored = buf.contents()
    for name, value in batch.pad_to(24).to_numpy().items():
        np.testing.assert_array_equal(getattr(stored, name), value, err_msg=name)
    np.testing.assert_array_equal(stored.policy_turns(), batch.policy_turns())

    # state round trip (the checkpoint's payload): the restored buffer draws the same entries
    state = {k: np.array(v) for k, v in buf.state_dict().items()}
    np.savez(tmp_path / "buffer.npz", **state)
    restored = ReplayBuffer(12, 24, seed=99)
    restored.load_state_dict(dict(np.load(tmp_path / "buffer.npz")))
    a, b = buf.sample(4), restored.sample(4)
    np.testing.assert_array_equal(a.indices, b.indices)
    for name, value in a.batch.to_numpy().items():
        np.testing.assert_array_equal(getattr(b.batch, name), value, err_msg=name)
    picked = np.asarray(a.batch.group_id), np.asarray(a.batch.response_mask)
    for i, slot in enumerate(a.indices):
        np.testing.assert_array_equal(picked[1][i, :20], batch.response_mask[slot], err_msg=str(slot))

    # stale entries: their reference terms recomputed through the trainer's reference pass
    cfg = step_config("reval", chunk=8)
    graphdef, optimizer, train_state = _setup()
    learner = Learner(Updater(graphdef, optimizer, cfg, None, train_state), Budget(row_len=24, micro_batches=1),
                      None, advantages=None)
    recompute = lambda stale: (lambda f: (f.ref_logp, f.ref_v))(learner.fill_reference(stale, train_state))
    drawn = restored.sample(7, ref_version=5, recompute_fn=recompute)
    assert drawn.num_recomputed == 7 and np.all(drawn.batch.ref_version == 5)
    expected = sequence_stats(nnx.merge(graphdef, train_state.ref_params), jnp.asarray(drawn.batch.tokens),
                              jnp.asarray(drawn.batch.attn_mask), jnp.asarray(drawn.batch.response_mask),
                              jnp.asarray(drawn.batch.s1_index))
    resp = np.asarray(drawn.batch.response_mask)
    np.testing.assert_allclose(drawn.batch.ref_logp, np.asarray(expected.logp), rtol=0, atol=2e-5)
    np.testing.assert_allclose(drawn.batch.ref_v, np.asarray(expected.v0), rtol=0, atol=2e-5)
    assert np.all(drawn.batch.ref_logp[~resp] == 0.0) and np.all(drawn.batch.ref_logp[resp] < 0.0)
    assert np.all(drawn.batch.ref_logp[environment_tokens(drawn.batch)] == 0.0)
    written = restored.contents()  # written back into the buffer, masks unchanged
    for i, slot in enumerate(drawn.indices):
        np.testing.assert_array_equal(written.ref_logp[slot], drawn.batch.ref_logp[i])
        np.testing.assert_array_equal(written.response_mask[slot], drawn.batch.response_mask[i])
    assert restored.sample(7, ref_version=5, recompute_fn=None).num_recomputed == 0


def test_staleness_reads_the_policy_tokens_of_every_turn():
    """A trajectory's staleness is that of its oldest policy token over all its turns (environment
    tokens carry no version)."""
    from reval_jax.run.trainer import staleness_of

    batch = make_batch(TWO_TURN[:2])
    versions = np.where(batch.response_mask, 7, -1)
    second_turn = np.asarray(batch.response_mask) & (np.cumsum(environment_tokens(batch), axis=1) > 0)
    versions[0][second_turn[0]] = 9  # row 0: turn 2 sampled under a newer policy than turn 1
    versions[1][second_turn[1]] = 4  # row 1: the oldest version is in turn 2
    np.testing.assert_array_equal(staleness_of(batch.replace(sampler_version=versions), 10), [3, 6])
