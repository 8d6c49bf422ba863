"""The train step of a LoRA run (ALGORITHMS.md, "Low-rank adapters"): only A and B are trained, the
reference is the base with the adapter off (no copy), calibrated initialisation is exact at the start
and again after a reset, which is a merge that restarts the adapters' optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_step import assert_calibrated, make_batch, with_reference

from reval_jax.model import lora
from reval_jax.model.config import preset
from reval_jax.model.decoder import create_model
from reval_jax.objective.losses import LossNorm
from reval_jax.objective.packing import Budget, pack
from reval_jax.objective.train_step import (
    OptimizerConfig,
    StepConfig,
    Updater,
    init_state,
    make_optimizer,
    reference,
    state_sharding,
)
from reval_jax.parallel.sharding import make_mesh

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def lora_setup(cfg, *, lr=1e-2, mesh=None, base_dtype=None, dtype="float32", rank=2):
    model = create_model(preset("tiny", dtype=dtype), seed=0, mesh=mesh)  # a fresh one: adapters go in place
    lora.add_adapters(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS, base_dtype=base_dtype),
                      seed=3)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=lr))
    state = init_state(params, optimizer)
    if mesh is not None:
        state = jax.device_put(state, state_sharding(state, optimizer, mesh))
    return graphdef, optimizer, state, Updater(graphdef, optimizer, cfg, mesh, state)


def zero_reward(seed):
    b = make_batch(B=16, seed=seed)
    return b.replace(reward=jnp.zeros_like(b.reward))


@pytest.mark.slow
def test_lora_state_trains_adapters_only_and_keeps_no_reference_copy():
    cfg = StepConfig(loss="reval", beta=0.02)
    graphdef, optimizer, state, updater = lora_setup(cfg)
    assert len(state.ref_params) == 0  # no reference copy
    trained = lora.split_trainable(state.params)[0]
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(trained))  # Adam's mu, nu
    base_before = jax.tree.map(np.asarray, lora.split_base(state.params)[0])
    new, m = run(updater, state, make_batch(B=16, seed=12))
    assert m["grad_norm"] > 0 and m["skipped"] == 0
    base_after = lora.split_base(new.params)[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), base_before, base_after)
    b_new = np.asarray(new.params["adapters"]["q_proj_b"].get_value())
    assert np.abs(b_new).max() > 0  # B moved (A gets no gradient while B = 0)


def run(updater, state, batch, micro_batches=1, devices=1):
    batch = jax.device_get(with_reference(_Ref(updater, state), state, batch, micro_batches, devices))
    micro, layout = pack(batch, Budget(row_len=16, micro_batches=micro_batches, devices=devices, max_segments=4))
    return updater.update(state, micro, layout, LossNorm.for_batch(batch))


@pytest.mark.parametrize("devices,base_dtype,dtype", [
    (1, None, "float32"), pytest.param(8, None, "float32", marks=pytest.mark.slow),
    pytest.param(1, "bfloat16", "bfloat16", marks=pytest.mark.slow)])
def test_lora_calibrated_at_start_and_after_a_merge(devices, base_dtype, dtype):
    """r = 0 gives δ, loss and gradient exactly 0 at the start (B = 0: policy = base through one
    program); updates with rewards move the policy away from the base; the reset (a merge) makes an
    r = 0 update exactly zero again, bumps the version, restarts the adapters' optimizer state and
    reports the merge."""
    mesh = make_mesh((2, 2, 2)) if devices == 8 else None
    cfg = StepConfig(loss="reval", beta=0.02)
    graphdef, optimizer, state, updater = lora_setup(cfg, mesh=mesh, base_dtype=base_dtype, dtype=dtype)
    zero = zero_reward(13)
    state, m = run(updater, state, zero, micro_batches=2, devices=1 if mesh is None else 4)
    assert_calibrated(m)
    for seed in (12, 14):
        state, m = run(updater, state, make_batch(B=16, seed=seed), micro_batches=2,
                       devices=1 if mesh is None else 4)
    state, m = run(updater, state, zero, micro_batches=2, devices=1 if mesh is None else 4)
    assert m["kl_mean"] != 0.0 and m["grad_norm"] > 0.0  # θ ≠ π_ref
    state, merged = updater.reset(state)
    assert int(state.ref_version) == 1
    assert merged["lora/merge_update"] > 0.0
    if base_dtype == "bfloat16":
        assert merged["lora/merge_rounding"] > 0.0  # the rounding of W + s·A·B into bfloat16, reported
    else:
        assert merged["lora/merge_rounding"] == 0.0
    counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
    assert counts and all(c == 0 for c in counts)  # Adam restarted
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in moments)
    assert all(float(jnp.max(jnp.abs(v.get_value()))) == 0.0
               for k, v in state.params["adapters"].items() if k.endswith("_b"))
    _, m = run(updater, state, zero, micro_batches=2, devices=1 if mesh is None else 4)
    assert_calibrated(m)


class _Ref:
    """`with_reference` calls updater.reference(state.ref_params, micro): the LoRA reference instead."""

    def __init__(self, updater, state):
        self.updater, self.state = updater, state

    def reference(self, _, micro):
        return self.updater.reference(reference(self.state), micro)
