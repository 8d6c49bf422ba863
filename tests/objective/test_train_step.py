"""The train step through the real model: calibrated initialisation, Eq. 4, padding invariance,
gradient accumulation, skipped non-finite steps, and 8-device sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import tiny_model

from reval_jax.data.batch import Trajectories
from reval_jax.model.config import RopeScaling, family_switches
from reval_jax.objective.losses import LossNorm, transform_rewards
from reval_jax.objective.packing import Budget, pack, pack_rows
from reval_jax.objective.train_step import (
    OptimizerConfig,
    StepConfig,
    Updater,
    init_state,
    loss_and_grads,
    make_optimizer,
    packed_sharding,
    reset_reference,
)
from reval_jax.parallel.sharding import make_mesh, state_shardings

P, A = 6, 10  # prompt and response slots


def make_batch(B=8, seed=0, vocab=128, layout="left") -> Trajectories:
    """Random trajectories: prompts of 3..P tokens, responses of 2..A tokens, left-padded prompts
    (layout="left") or everything packed to the left and right-padded (layout="right")."""
    rng = np.random.RandomState(seed)
    T = P + A
    tokens = np.zeros((B, T), np.int32)
    attn, resp = np.zeros((B, T), bool), np.zeros((B, T), bool)
    s1 = np.zeros(B, np.int32)
    for b in range(B):
        p, a = rng.randint(3, P + 1), rng.randint(2, A + 1)
        seq = rng.randint(1, vocab, p + a)
        start = P - p if layout == "left" else 0
        tokens[b, start : start + p + a] = seq
        attn[b, start : start + p + a] = True
        resp[b, start + p : start + p + a] = True
        s1[b] = start + p - 1
    raw = ((np.arange(B) + np.arange(B) // 4) % 2).astype(np.float32)  # every group mixed
    group = np.arange(B) // 4
    zeros_t = np.zeros((B, T), np.float32)
    return Trajectories(
        tokens=jnp.asarray(tokens),
        attn_mask=jnp.asarray(attn),
        response_mask=jnp.asarray(resp),
        s1_index=jnp.asarray(s1),
        group_id=jnp.asarray(group, jnp.int32),
        reward=jnp.asarray(transform_rewards(raw, group, "centered")),
        raw_reward=jnp.asarray(raw),
        ref_logp=jnp.asarray(zeros_t),
        ref_v=jnp.zeros(B, jnp.float32),
        ref_version=jnp.zeros(B, jnp.int32),
        sampler_logp=jnp.asarray(zeros_t),
        sampler_version=jnp.full((B, T), -1, jnp.int32),
        iteration=jnp.zeros(B, jnp.int32),
    )


def setup(cfg: StepConfig, lr=1e-3, seed=0, optimizer=None, ref_dtype=None, **model):
    graphdef, params = nnx.split(tiny_model(seed=seed, **model))
    params = jax.tree.map(jnp.copy, params)  # the shared model must survive donation
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=lr))
    return graphdef, optimizer, init_state(params, optimizer, ref_dtype=ref_dtype)


def budget(micro_batches=1, devices=1, row_len=P + A, max_segments=4):
    """Rows as long as a padded trajectory: the random lengths pack 2-3 trajectories per row."""
    return Budget(row_len=row_len, micro_batches=micro_batches, devices=devices, max_segments=max_segments)


def with_reference(updater, state, batch, micro_batches=1, devices=1):
    micro, layout = pack(jax.device_get(batch), budget(micro_batches, devices))
    logps, vs = updater.reference(state.ref_params, micro)
    return batch.replace(ref_logp=jnp.asarray(layout.unpack_tokens(logps)), ref_v=jnp.asarray(layout.gather(vs)))


def run_step(cfg, batch, *, mesh=None, lr=1e-3, optimizer=None, micro_batches=1, state=None, **model):
    """One update of a fresh state (or of `state`) on `batch`, reference terms filled in first."""
    graphdef, optimizer, fresh = setup(cfg, lr, optimizer=optimizer, **model)
    state = fresh if state is None else state
    devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    updater = Updater(graphdef, optimizer, cfg, mesh, state)
    batch = jax.device_get(with_reference(updater, state, batch, micro_batches, devices))
    advantages = cfg.algorithm.batch_advantages(batch)  # GRPO, RLOO, DAPO: over the prompt groups
    micro, layout = pack(batch, budget(micro_batches, devices), advantages=advantages)
    norm = LossNorm.for_batch(batch)
    return updater.update(state, micro, layout, norm)


def assert_calibrated(m):
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["delta_abs_max"] == 0.0
    assert m["kl_mean"] == 0.0 and m["v_diff_mean"] == 0.0 and m["skipped"] == 0


@pytest.mark.parametrize("dtype,devices,micro_batches,chunk", [
    ("float32", 1, 1, 512), pytest.param("float32", 8, 2, 3, marks=pytest.mark.slow),
    pytest.param("bfloat16", 1, 3, 5, marks=pytest.mark.slow),
    pytest.param("bfloat16", 8, 2, 512, marks=pytest.mark.slow)])
def test_calibrated_initialisation_is_exact(dtype, devices, micro_batches, chunk):
    """Prop. 2: π_θ = π_ref and r = 0 give δ, loss and gradient of the real update EXACTLY zero (both
    sides of δ come from one compiled forward; train_step, exact calibration), in float32 and
    bfloat16 compute (a bfloat16 reference with it), on 1 and 8 devices, any micro-batches and chunk."""
    batch = make_batch(B=16, seed=11)
    batch = batch.replace(reward=jnp.zeros_like(batch.reward))
    mesh = make_mesh((2, 2, 2)) if devices == 8 else None
    ref_dtype = "bfloat16" if dtype == "bfloat16" else None
    cfg = StepConfig(loss="reval", beta=0.02, chunk=chunk)
    state, m = run_step(cfg, batch, mesh=mesh, micro_batches=micro_batches, dtype=dtype, ref_dtype=ref_dtype)
    assert_calibrated(m)
    assert int(state.step) == 1
    if devices == 1 and dtype == "float32":
        _, m = run_step(StepConfig(loss="tbrm", beta=0.02), batch)
        assert m["loss"] > 1.0 and m["grad_norm"] > 1e-2  # TBRM carries V_θ(s_1): not calibrated


@pytest.mark.slow
def test_calibrated_again_after_a_reference_reset_mid_run():
    """Two real updates move θ away from π_ref; after the reset an r = 0 update is exactly zero,
    while before the reset the same batch is not."""
    cfg = StepConfig(loss="reval", beta=0.02)
    rewarded, zero = make_batch(B=16, seed=12), make_batch(B=16, seed=13)
    zero = zero.replace(reward=jnp.zeros_like(zero.reward))
    graphdef, optimizer, state = setup(cfg, lr=1e-2, ref_dtype="bfloat16", dtype="bfloat16")
    for _ in range(2):
        state, m = run_step(cfg, rewarded, state=state, lr=1e-2, micro_batches=2, dtype="bfloat16")
    assert m["delta_abs_max"] > 1.0 and int(state.step) == 2
    state, m = run_step(cfg, zero, state=state, lr=1e-2, micro_batches=2, dtype="bfloat16")
    assert m["kl_mean"] != 0.0 and m["grad_norm"] > 0.0  # θ ≠ π_ref
    state = reset_reference(state)
    _, m = run_step(cfg, zero, state=state, lr=1e-2, micro_batches=2, dtype="bfloat16")
    assert_calibrated(m)


def test_gradient_is_eq4_plus_the_value_term():
    """∇L = (2/B) Σ_i δ_i [∇log π_θ(τ_i) + ∇V_θ(s_1,i)] — Eq. 4 (−2 E[(r/β − (V_θ−V_ref +
    log π_θ/π_ref)) ∇log π_θ(τ)]) plus the V_θ(s_1) term, computed through the real model.

    Both sides are pulled back through the model by one compiled backward pass (one VJP of the
    model's log π and V) with the loss's own δ_i, so they share all rounding by design and differ
    only if ∂L/∂log π or ∂L/∂V differs from 2δ_i/B. The loss's δ is checked against δ computed
    here from the same log π and V (float32: they sum in different orders; δ's rounding, times an
    embedding gradient of size ~2, is ~1e-6, the size of the tolerance below)."""
    from reval_jax.objective.logprobs import sequence_stats
    from reval_jax.objective.losses import LossNorm, reval_loss

    cfg = StepConfig(loss="reval", beta=0.5)
    graphdef, optimizer, state = setup(cfg)
    batch = with_reference(Updater(graphdef, optimizer, cfg, None, state), state, make_batch(seed=1))
    other = jax.tree.map(lambda p: p * 1.05, state.params)  # policy ≠ reference
    norm = LossNorm.for_batch(batch)

    def stats(params):  # log π per token [B, T], V_θ(s_1) [B]
        s = sequence_stats(nnx.merge(graphdef, params), batch.tokens, batch.attn_mask, batch.response_mask,
                           batch.s1_index)
        return s.logp, s.v0

    (logp, v), pullback = jax.vjp(stats, other)
    pullback = jax.jit(pullback)
    loss = lambda logp, v: reval_loss(logp, v[:, None], pack_rows(batch), norm, beta=cfg.beta)
    (_, metrics), cotangents = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logp, v)
    g_auto = pullback(cotangents)

    delta = metrics["delta"][:, 0]  # one trajectory per row
    ours = (v - batch.ref_v) + jnp.sum(logp, -1) - jnp.sum(batch.ref_logp, -1) - batch.reward / cfg.beta
    np.testing.assert_allclose(np.asarray(delta), np.asarray(ours), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(delta))) > 0.1
    B = batch.tokens.shape[0]
    c = 2.0 * delta / B  # Eq. 4's coefficient of ∇log π_θ(τ_i), and the V term's of ∇V_θ(s_1,i)
    g_eq4 = pullback((jnp.broadcast_to(c[:, None], logp.shape), c))
    for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_eq4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_left_and_right_padded_layouts_give_the_same_delta():
    cfg = StepConfig(loss="reval", beta=0.05)
    _, m_left = run_step(cfg, make_batch(seed=2, layout="left"))
    _, m_right = run_step(cfg, make_batch(seed=2, layout="right"))
    assert m_left["delta_abs_max"] > 1e-3  # lr>0 only after the step: δ here is from reward
    np.testing.assert_allclose(m_left["abs_delta"], m_right["abs_delta"], atol=1e-5)
    np.testing.assert_allclose(m_left["grad_norm"], m_right["grad_norm"], rtol=1e-4)


def grads_of(cfg, batch, mesh=None, micro_batches=1):
    """(loss, gradients) of `loss_and_grads` over the packed micro-batches, jitted whole, optionally
    with everything sharded."""
    graphdef, optimizer, state = setup(cfg)
    devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch = jax.device_get(with_reference(Updater(graphdef, optimizer, cfg, None, state), state, batch))
    advantages = cfg.algorithm.batch_advantages(batch)  # GRPO, RLOO, DAPO: over the prompt groups
    micro, _ = pack(batch, budget(micro_batches, devices), advantages=advantages)
    params, norm = state.params, LossNorm.for_batch(batch)
    if mesh is not None:
        params = jax.device_put(params, state_shardings(params, mesh))
        micro = jax.device_put(micro, packed_sharding(mesh))
    loss, grads, _ = jax.jit(functools.partial(loss_and_grads, graphdef, cfg))(params, micro, norm)
    return float(loss), jax.tree.map(np.asarray, grads)


def assert_same_grads(g1, g2):
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("loss", ["regression"] + [pytest.param(a, marks=pytest.mark.slow)
                                                   for a in ("reval", "tbrm", "grpo", "rloo", "dapo")])
def test_gradient_accumulation_equals_the_full_batch(loss):
    batch = make_batch(seed=3)
    l1, g1 = grads_of(StepConfig(loss=loss, beta=0.1), batch)
    l4, g4 = grads_of(StepConfig(loss=loss, beta=0.1), batch, micro_batches=3)
    np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-7)
    assert_same_grads(g1, g4)


def test_non_finite_gradient_skips_the_step():
    cfg = StepConfig(loss="reval", beta=0.1)
    batch = make_batch(seed=4)
    batch = batch.replace(reward=batch.reward.at[3].set(jnp.nan))
    graphdef, optimizer, state = setup(cfg)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    updater = Updater(graphdef, optimizer, cfg, None, state)
    batch = jax.device_get(with_reference(updater, state, batch))

    def step(state, batch):
        micro, layout = pack(batch, budget())
        return updater.update(state, micro, layout, LossNorm.for_batch(batch))

    state, m = step(state, batch)
    assert m["skipped"] == 1 and int(state.skipped) == 1 and int(state.step) == 0
    state, _ = step(state, batch)
    assert int(state.skipped_in_a_row) == 2
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, batch.replace(reward=np.zeros_like(batch.reward)))
    assert m["skipped"] == 0 and int(state.skipped_in_a_row) == 0 and int(state.step) == 1


@pytest.mark.slow
def test_non_finite_result_skips_the_step():
    """A finite gradient whose update makes the optimizer state non-finite (a corrupted moment)
    is skipped too: parameters and optimizer state keep their finite values."""
    cfg = StepConfig(loss="reval", beta=0.1)
    graphdef, optimizer, state = setup(cfg)
    mu = state.opt_state[1][0].mu
    bad = jax.tree.map(lambda x: x, mu)
    bad["q_proj"].set_value(mu["q_proj"][...].at[0, 0, 0, 0].set(jnp.inf))
    adam = state.opt_state[1][0]._replace(mu=bad)
    state = state.replace(opt_state=(state.opt_state[0], (adam, *state.opt_state[1][1:])))
    updater = Updater(graphdef, optimizer, cfg, None, state)
    batch = jax.device_get(with_reference(updater, state, make_batch(seed=4)))
    before = jax.tree.map(np.asarray, state.params)
    micro, layout = pack(batch, budget())
    state, m = updater.update(state, micro, layout, LossNorm.for_batch(batch))
    assert np.isfinite(m["grad_norm"]) and m["skipped"] == 1 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reference_reset_copies_the_policy_and_bumps_the_version():
    cfg = StepConfig(loss="reval", beta=0.1)
    state, _ = run_step(cfg, make_batch(seed=5))
    assert not np.allclose(
        np.asarray(state.params["q_proj"][...]), np.asarray(state.ref_params["q_proj"][...])
    )
    state = reset_reference(state)
    assert int(state.ref_version) == 1
    for p, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref_params), strict=True):
        assert p.unsafe_buffer_pointer() != r.unsafe_buffer_pointer()  # the step donates both
    np.testing.assert_array_equal(
        np.asarray(state.params["q_proj"][...]), np.asarray(state.ref_params["q_proj"][...])
    )


def test_bfloat16_reference_is_kept_in_bfloat16():
    graphdef, params = nnx.split(tiny_model(seed=0))
    state = init_state(params, make_optimizer(OptimizerConfig()), ref_dtype="bfloat16")
    assert state.ref_params["q_proj"][...].dtype == jnp.bfloat16
    assert reset_reference(state).ref_params["q_proj"][...].dtype == jnp.bfloat16


@pytest.mark.parametrize("loss", ["reval", pytest.param("grpo", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_sharded_step_equals_single_device(loss):
    batch = make_batch(seed=6)
    cfg = StepConfig(loss=loss, beta=0.1)
    mesh = make_mesh((2, 2, 2))
    l1, g1 = grads_of(cfg, batch, micro_batches=2)
    l8, g8 = grads_of(cfg, batch, mesh, micro_batches=2)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-7)
    assert_same_grads(g1, g8)
    # and the whole update with explicit shardings keeps the parameters in their layout
    single, m1 = run_step(cfg, batch, micro_batches=2)
    sharded, m8 = run_step(cfg, batch, mesh=mesh, micro_batches=2)
    assert sharded.params["gate_proj"][...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)


FAMILY_MODELS = {  # preset("tiny") overrides: every family's parameters and RoPE through the update
    "qwen3": family_switches("qwen3"),
    "llama": {**family_switches("llama"), "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 16)},
}


@pytest.mark.slow  # every family's parameters through the sharded update: qwen2's is the unit tier's case above
@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_sharded_step_equals_single_device_for_every_family(family):
    batch = make_batch(seed=6)
    cfg = StepConfig(loss="grpo", beta=0.1)
    model = FAMILY_MODELS[family]
    single, m1 = run_step(cfg, batch, micro_batches=2, **model)
    sharded, m8 = run_step(cfg, batch, mesh=make_mesh((2, 2, 2)), micro_batches=2, **model)
    assert ("q_norm" in sharded.params) == (family == "qwen3") and "q_bias" not in sharded.params
    assert m1["grad_norm"] > 1e-3 and m1["skipped"] == 0
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_token_budget_sizes_micro_batches_by_devices():
    """tokens_per_device sets rows per micro-batch (a multiple of the data-parallel devices); the
    packed update processes at most the budget's tokens and few more than the real ones."""
    batch = jax.device_get(make_batch(B=32, seed=7))
    real = int(np.asarray(batch.attn_mask).sum())
    b = Budget(row_len=P + A, tokens_per_device=2 * (P + A), devices=4)
    micro, layout = pack(batch, b)
    assert [mb.tokens.shape for mb in micro[:-1]] == [(8, P + A)] * (len(micro) - 1)
    assert all(mb.tokens.shape[0] % 4 == 0 for mb in micro)
    assert layout.tokens_processed == sum(mb.tokens.size for mb in micro)
    assert real <= layout.tokens_processed < 2 * real  # padded: 32 × 16 = 512 tokens
    np.testing.assert_array_equal(layout.unpack_tokens([mb.tokens for mb in micro]),
                                  np.where(batch.attn_mask, batch.tokens, 0))


@pytest.mark.slow
def test_exact_reference_runs_one_forward_per_micro_batch():
    """With exact_reference the forward program runs once per micro-batch (the reference's side of δ).
    The policy's side is those values while π_θ = π_ref bit for bit (`policy_is_reference`: at the
    start and after a reset), else the differentiated pass's own forward, which equals the forward
    program's values to float32 rounding: the loss matches the one taken at the forward program's
    values within 1e-5."""
    from reval_jax.objective.train_step import micro_loss_and_grads, policy_is_reference

    cfg = StepConfig(loss="reval", beta=0.02)
    graphdef, optimizer, state = setup(cfg, lr=1e-2)
    updater = Updater(graphdef, optimizer, cfg, None, state)
    calls = []
    forward = updater.forward
    updater.forward = lambda *a: calls.append(1) or forward(*a)
    assert bool(policy_is_reference(state.params, state.ref_params))
    batch = make_batch(B=16, seed=12)
    micro, layout = pack(jax.device_get(batch), budget(2))
    state, m = updater.update(state, micro, layout, LossNorm.for_batch(batch))
    assert len(calls) == len(micro) == 2 and m["grad_norm"] > 0
    assert not bool(policy_is_reference(state.params, state.ref_params))
    # after the update: the loss at the differentiated pass's values against the forward program's
    mb = jax.tree.map(jnp.asarray, micro[0])
    ref_logp, ref_v = forward(state.ref_params, mb)
    mb = mb.replace(ref_logp=ref_logp, ref_v=ref_v)
    norm = LossNorm.for_batch(batch)
    own, _, _ = micro_loss_and_grads(graphdef, cfg, state.params, mb, norm, (ref_logp, ref_v), False)
    program, _, _ = micro_loss_and_grads(graphdef, cfg, state.params, mb, norm, forward(state.params, mb), True)
    assert float(own) != 0.0
    np.testing.assert_allclose(float(own), float(program), rtol=1e-5)
    assert bool(policy_is_reference(reset_reference(state).params, reset_reference(state).ref_params))
