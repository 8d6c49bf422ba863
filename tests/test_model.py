"""The Qwen2 model: logits parity with `transformers`, padding invariance, scan and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import hf_dir, hf_logits, hf_model, padded_batch

import reval_jax
from reval_jax.config import preset

TOL = 1e-4  # max abs logits difference against transformers (float32); never loosened


@pytest.mark.parametrize("layout", ["none", "left", "right"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_transformers(num_kv_heads, tie, layout):
    model, _ = reval_jax.load_hf(hf_dir(num_kv_heads=num_kv_heads, tie=tie), load_tokenizer=False)
    tokens, mask, positions = padded_batch(layout)
    ref = hf_logits(hf_model(num_kv_heads=num_kv_heads, tie=tie), tokens, mask, positions)
    ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref)[mask].max() <= TOL
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


def test_left_and_right_padding_give_same_logits():
    model, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False)
    tokens, mask, _ = padded_batch("right", seed=3)
    lengths = mask.sum(-1)
    T = tokens.shape[1]
    left = np.zeros_like(tokens)
    left_mask = np.zeros_like(mask)
    for b, n in enumerate(lengths):
        left[b, T - n :] = tokens[b, :n]
        left_mask[b, T - n :] = True
    right_logits = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
    left_logits = np.asarray(model(jnp.asarray(left), mask=jnp.asarray(left_mask)))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(left_logits[b, T - n :], right_logits[b, :n], atol=1e-5)


def test_explicit_positions_override_mask_positions():
    model, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False)
    tokens = jnp.asarray(padded_batch("none")[0])
    T = tokens.shape[1]
    # RoPE is relative: a uniform shift of every position leaves the logits unchanged ...
    shifted = model(tokens, positions=jnp.arange(T)[None] + 5)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(model(tokens)), atol=1e-4)
    # ... while stretched positions change them.
    stretched = model(tokens, positions=2 * jnp.arange(T)[None])
    assert not np.allclose(np.asarray(stretched), np.asarray(model(tokens)), atol=1e-3)


def _jaxpr_size(layers: int) -> int:
    model = reval_jax.create_model(preset("tiny", num_layers=layers))
    tokens = jnp.zeros((2, 8), jnp.int32)
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = lambda s, t: nnx.merge(graphdef, s)(t)
    return len(jax.make_jaxpr(fn)(state, tokens).jaxpr.eqns)


def test_program_size_does_not_grow_with_depth():
    assert _jaxpr_size(2) == _jaxpr_size(28)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_identical_gradients(remat):
    from flax import nnx

    cfg = preset("tiny")
    tokens = jnp.asarray(padded_batch("left")[0]) % cfg.vocab_size

    def grads(remat_policy):
        model = reval_jax.create_model(cfg.replace(remat=remat_policy), seed=1)
        loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
        return nnx.grad(loss)(model)

    base, other = grads("none"), grads(remat)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_logits_close():
    model32, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False)
    model16, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False, param_dtype="bfloat16",
                                   dtype="bfloat16")
    assert model16.q_proj[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(padded_batch("none")[0])
    l32, l16 = np.asarray(model32(tokens)), np.asarray(model16(tokens))
    assert l16.dtype == np.float32
    # bfloat16 has ~3 significant digits: agreement of the argmax and a loose relative error.
    assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.9
    assert np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()


def test_presets_have_the_real_shapes():
    r1 = preset("deepseek-r1-distill-qwen-1.5b")
    assert (r1.num_layers, r1.hidden_size, r1.num_heads, r1.num_kv_heads) == (28, 1536, 12, 2)
    assert 1.7e9 < r1.num_params() < 1.8e9  # 1.78B with an untied head
    assert 7.0e9 < preset("qwen2.5-math-7b").num_params() < 7.7e9
    assert 1.5e9 < preset("qwen2.5-1.5b").num_params() < 1.6e9
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("qwen9")
