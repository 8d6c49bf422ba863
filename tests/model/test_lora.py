"""Low-rank adapters on the stacked decoder (reval_jax.model.lora): layout and sharding, the forward
with B = 0 and with the adapter off equal to the base bit for bit, the reference from the policy's
own compiled program, merge (float32 and bfloat16 bases), and gradients that reach A and B only."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from models import FAMILIES, LONG, hf_dir, padded_batch

from reval_jax.errors import UserError
from reval_jax.model.config import preset
from reval_jax.model.decoder import LAYER_PARAMS, create_model, layer_param_names
from reval_jax.model.hf import load_hf
from reval_jax.model.lora import (
    BASE,
    IN_DIMS,
    TARGETS,
    LoraConfig,
    LoraParam,
    LoraScale,
    add_adapters,
    lora_config,
    merge,
    set_adapter_scale,
    with_adapter_scale,
)
from reval_jax.parallel.sharding import make_mesh

LORA = LoraConfig(rank=4, alpha=8.0)  # s = α/r = 2
# Forward after a merge against before (float32): x·(W + s·A·B) and x·W + (s·(x·A))·B are the same
# sum in another order, so they differ by float32 rounding only (eps 1.2e-7 relative to the terms;
# measured 6.6e-6, 7.6e-6, 9.4e-6 for qwen2, qwen3, llama on logits of size ~5, with a large B); the
# adapter itself moves the logits by > 0.1 (asserted), 1000 times this tolerance.
MERGE_TOL = 1e-4


def _hf_model(family="qwen2", **kw):
    return load_hf(hf_dir(family=family), load_tokenizer=False, **kw)[0]


def _batch():
    tokens, mask, _ = padded_batch("left", length=LONG)
    return jnp.asarray(tokens), jnp.asarray(mask)


def _forward(model):
    """(jitted forward over a state, the model's state): one program for every state of this graph."""
    graphdef, state = nnx.split(model)
    tokens, mask = _batch()
    return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, mask=mask)), state


def _random_b(model, seed=0, std=0.3):
    """B drawn at random (the state after some training): the adapter then changes the model."""
    keys = jax.random.split(jax.random.key(seed), len(lora_config(model).targets))
    for key, name in zip(keys, lora_config(model).targets, strict=True):
        b = getattr(model.adapters, f"{name}_b")
        value = (std * jax.random.normal(key, b[...].shape)).astype(b[...].dtype)
        b.set_value(jax.device_put(value, b[...].sharding))  # kept where B lives


def _update(a, b) -> np.ndarray:
    """s·A·B of stacked A [L, in..., r], B [L, r, out...] in float64, layer by layer (numpy)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return LORA.scale * np.stack([np.tensordot(a_l, b_l, axes=1) for a_l, b_l in zip(a, b, strict=True)])


def _paths(state) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}


def test_config_checks():
    assert LoraConfig(rank=8, alpha=16.0).scale == 2.0
    for bad in (dict(rank=0, alpha=1.0), dict(rank=4, alpha=1.0, targets=("q_proj", "q_proj")),
                dict(rank=4, alpha=1.0, targets=("lm_head",)), dict(rank=4, alpha=1.0, targets=()),
                dict(rank=4, alpha=1.0, base_dtype="int8")):
        with pytest.raises(UserError):
            LoraConfig(**bad)


def test_adapters_layout_init_and_filters():
    model = create_model(preset("tiny"), seed=0)
    base_paths = _paths(nnx.state(model))
    add_adapters(model, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj")), seed=1)
    adapters = nnx.state(model, LoraParam)
    assert _paths(adapters) == {f"['adapters']['{t}_{m}'].value" for t in ("q_proj", "o_proj", "down_proj")
                                for m in "ab"}
    assert _paths(nnx.state(model, BASE)) == base_paths  # the base filter is exactly the original model
    assert len(jax.tree.leaves(nnx.state(model, LoraScale))) == 1
    for name in ("q_proj", "o_proj", "down_proj"):
        w = getattr(model, name)[...]
        a, b = getattr(model.adapters, f"{name}_a")[...], getattr(model.adapters, f"{name}_b")[...]
        n_in = len(IN_DIMS[name])
        assert a.shape == (*w.shape[:1 + n_in], 4) and b.shape == (w.shape[0], 4, *w.shape[1 + n_in:])
        assert not np.any(np.asarray(b))
        bound = 1 / np.sqrt(np.prod(w.shape[1:1 + n_in]))  # PEFT's Kaiming-uniform (a = √5): U(±1/√fan_in)
        a = np.asarray(a)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert abs(a.std() / (bound / np.sqrt(3)) - 1) < 0.2  # the std of U(-b, b) is b/√3
    with pytest.raises(UserError):
        add_adapters(model, LORA)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_zero_b_and_adapter_off_equal_the_base_bit_for_bit(family, dtype):
    """B = 0 (as initialised): the adapted model is the base. B != 0 with s = 0 (the reference): the
    base again, from the same compiled program as the policy (one compilation for both)."""
    model = _hf_model(family, dtype=dtype)
    base_fwd, base_state = _forward(model)
    base = np.asarray(base_fwd(base_state))
    add_adapters(model, LORA, seed=1)
    fwd, state = _forward(model)
    np.testing.assert_array_equal(np.asarray(fwd(state)), base)
    _random_b(model)
    state = nnx.state(model)
    policy = np.asarray(fwd(state))
    programs = fwd._cache_size()
    reference = np.asarray(fwd(with_adapter_scale(state, 0.0)))
    assert fwd._cache_size() == programs  # the reference ran the policy's compiled program
    np.testing.assert_array_equal(reference, base)
    assert np.abs(policy - base).max() > 0.1
    assert float(model.adapters.scale[...]) == LORA.scale  # with_adapter_scale did not touch the model
    set_adapter_scale(model, 0.0)  # the in-place switch is the same thing
    np.testing.assert_array_equal(np.asarray(fwd(nnx.state(model))), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_policy_and_zeroes_b(family):
    model = _hf_model(family)
    add_adapters(model, LORA, seed=1)
    _random_b(model)
    fwd, state = _forward(model)
    before = np.asarray(fwd(state))
    w0 = {t: np.asarray(getattr(model, t)[...], np.float64) for t in TARGETS}
    a0 = {t: np.asarray(getattr(model.adapters, f"{t}_a")[...], np.float64) for t in TARGETS}
    b0 = {t: np.asarray(getattr(model.adapters, f"{t}_b")[...], np.float64) for t in TARGETS}
    stats = merge(model)
    for t in TARGETS:
        delta = _update(a0[t], b0[t])
        w = np.asarray(getattr(model, t)[...], np.float64)
        exact = w0[t] + delta
        assert np.abs(w - exact).max() <= 2 ** -23 * np.abs(exact).max()  # one float32 rounding of the sum
        np.testing.assert_allclose(float(stats.update[t]), np.abs(delta).max(), rtol=1e-5)
        assert float(stats.rounding[t]) == 0.0  # a float32 base stores the float32 sum as it is
        assert not np.any(np.asarray(getattr(model.adapters, f"{t}_b")[...]))
        np.testing.assert_array_equal(np.asarray(getattr(model.adapters, f"{t}_a")[...]), a0[t])
    state = nnx.state(model)
    after = np.asarray(fwd(state))
    programs = fwd._cache_size()
    reference = np.asarray(fwd(with_adapter_scale(state, 0.0)))
    tokens, mask = _batch()
    base = np.asarray(_hf_model(family)(tokens, mask=mask))  # the model before adapters and merge
    assert np.abs(before - base).max() > 0.1  # the merge moved a policy that differs from the old base
    assert np.abs(after - before).max() <= MERGE_TOL
    np.testing.assert_array_equal(after, reference)  # after a reset π_θ = π_ref bit for bit
    assert fwd._cache_size() == programs  # from one compiled program


def test_merge_into_a_bfloat16_base_reports_its_rounding():
    """The rounding reported for each target equals max |bf16(W + s·A·B) - (W + s·A·B)| computed
    independently in numpy (float64 sum, ml_dtypes rounding), and the stored W is that rounding."""
    model = _hf_model("qwen2")
    add_adapters(model, LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16"), seed=1)
    base_dtypes = {v[...].dtype for v in jax.tree.leaves(nnx.state(model, BASE), is_leaf=lambda x: isinstance(
        x, nnx.Variable))}
    assert base_dtypes == {jnp.dtype(jnp.bfloat16)}
    assert model.adapters.q_proj_a[...].dtype == jnp.float32
    _random_b(model, std=0.05)
    graphdef, state = nnx.split(model)

    @jax.jit
    def reset(state):  # the merge as a trainer's jitted reference reset would run it
        traced = nnx.merge(graphdef, state)
        return nnx.state(traced), merge(traced)

    traced_state, traced_stats = reset(state)
    before = {t: [np.asarray(x, np.float64) for x in (getattr(model, t)[...].astype(jnp.float32),
                                                      getattr(model.adapters, f"{t}_a")[...],
                                                      getattr(model.adapters, f"{t}_b")[...])] for t in TARGETS}
    stats = merge(model)
    for t, (w, a, b) in before.items():
        exact = w + _update(a, b)
        rounding = np.abs(exact.astype(ml_dtypes.bfloat16).astype(np.float64) - exact).max()
        # the exact sum is known to float32 precision on the device: 2^-24 relative, a few roundings
        slack = 4 * 2 ** -24 * np.abs(exact).max()
        assert rounding > 100 * slack  # bfloat16 rounding (2^-9 relative) is far above that precision
        assert abs(float(stats.rounding[t]) - rounding) <= slack, t
        stored = np.asarray(getattr(model, t)[...].astype(jnp.float32), np.float64)
        assert abs(np.abs(stored - exact).max() - rounding) <= slack
        assert getattr(model, t)[...].dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, traced_stats, stats)  # traced and eager merges agree
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, traced_state),
                 jax.tree.map(np.asarray, nnx.state(model)))
    metrics = stats.metrics()
    assert metrics["lora/merge_rounding"] == max(float(v) for v in stats.rounding.values()) > 0


@pytest.mark.slow
def test_gradient_reaches_the_adapters_only():
    """At B = 0, ∂L/∂A = 0 exactly (A reaches the output only through B) and ∂L/∂B != 0; the
    gradient w.r.t. nnx.state(model, LoraParam) holds A and B only, and a step on it leaves the
    base bit for bit; after the step (B != 0) A gets a gradient too."""
    model = _hf_model("llama")
    add_adapters(model, LORA, seed=1)
    base = jax.tree.map(np.asarray, nnx.state(model, BASE))
    graphdef, lora_state, rest = nnx.split(model, LoraParam, ...)
    tokens, mask = _batch()

    @jax.jit
    def grad(ls):
        def loss(ls):
            logits = nnx.merge(graphdef, ls, rest)(tokens, mask=mask)
            logp = jax.nn.log_softmax(logits[:, :-1])
            picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])
        return jax.grad(loss)(ls)

    g = grad(lora_state)
    assert _paths(g) == _paths(lora_state) == _paths(nnx.state(model, LoraParam))
    for t in TARGETS:
        assert not np.any(np.asarray(g["adapters"][f"{t}_a"][...])), t
        assert np.abs(np.asarray(g["adapters"][f"{t}_b"][...])).max() > 1e-6, t
    stepped = jax.tree.map(lambda p, d: p - 0.5 * d, lora_state, g)
    nnx.update(model, stepped)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, BASE)), base)
    g2 = grad(nnx.state(model, LoraParam))
    for t in TARGETS:
        assert np.abs(np.asarray(g2["adapters"][f"{t}_a"][...])).max() > 1e-6, t


def _spec(array) -> tuple:
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


@pytest.mark.slow
def test_adapters_shard_like_their_base_weight():
    mesh = make_mesh((1, 2, 4))  # embed over fsdp (2); heads, kv heads and mlp over tensor (4)
    model = create_model(preset("tiny", num_kv_heads=4), seed=0, mesh=mesh)
    fwd, state = _forward(model)
    base = np.asarray(fwd(state))
    add_adapters(model, LORA, seed=1)
    for t in TARGETS:
        w = getattr(model, t)[...]
        a, b = getattr(model.adapters, f"{t}_a")[...], getattr(model.adapters, f"{t}_b")[...]
        n_in, w_spec = len(IN_DIMS[t]), _spec(w)
        assert LAYER_PARAMS[t][0][1:1 + n_in] == IN_DIMS[t]
        assert _spec(a) == (*w_spec[:1 + n_in], None) and _spec(b) == (w_spec[0], None, *w_spec[1 + n_in:])
        assert any(w_spec), t  # every target is split somewhere on this mesh
    fwd, state = _forward(model)
    np.testing.assert_array_equal(np.asarray(fwd(state)), base)
    _random_b(model)
    specs = {t: (_spec(getattr(model, t)[...]), _spec(getattr(model.adapters, f"{t}_b")[...])) for t in TARGETS}
    merge(model)
    assert specs == {t: (_spec(getattr(model, t)[...]), _spec(getattr(model.adapters, f"{t}_b")[...]))
                     for t in TARGETS}


def test_a_model_without_adapters_scans_its_own_parameters_only():
    model = create_model(preset("tiny"), seed=0)
    assert lora_config(model) is None and not jax.tree.leaves(nnx.state(model, LoraParam))
    assert tuple(model.layer_params()) == layer_param_names(model.cfg)
