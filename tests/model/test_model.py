"""The decoder of every family: logits parity with `transformers`, Llama 3's RoPE frequencies,
padding invariance, scan and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import FAMILIES, LLAMA3_ROPE, LONG, hf_dir, hf_logits, hf_model, padded_batch

import reval_jax
from reval_jax.model.config import RopeScaling, preset
from reval_jax.model.decoder import init_cache, layer_param_names, rope_frequencies

TOL = 1e-4  # max abs logits difference against transformers (float32); never loosened


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, num_kv_heads, tie):
    kw = dict(family=family, num_kv_heads=num_kv_heads, tie=tie)
    model, _ = reval_jax.load_hf(hf_dir(**kw), load_tokenizer=False)
    assert model.cfg.family == family and model.cfg.num_params() == hf_model(**kw).num_parameters()
    for layout in ("none", "left", "right"):
        tokens, mask, positions = padded_batch(layout, length=LONG)
        ref = hf_logits(hf_model(**kw), tokens, mask, positions)
        ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert np.abs(ours - ref)[mask].max() <= TOL, layout
        assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


def test_family_parameters_exist_only_where_the_family_has_them():
    has = {f: set(layer_param_names(reval_jax.load_hf(hf_dir(family=f), load_tokenizer=False)[0].cfg))
           for f in FAMILIES}
    assert {"q_bias", "k_bias", "v_bias"} <= has["qwen2"] and not has["qwen2"] & {"q_norm", "k_norm"}
    assert {"q_norm", "k_norm"} <= has["qwen3"] and not has["qwen3"] & {"q_bias", "k_bias", "v_bias"}
    assert not has["llama"] & {"q_bias", "k_bias", "v_bias", "q_norm", "k_norm"}


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (16, 10_000.0, LLAMA3_ROPE),  # the tiny test model's
    (128, 500_000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),  # Llama-3.1-8B's
], ids=["tiny", "llama3.1-8b"])
def test_llama3_rope_frequencies_match_transformers(head_dim, theta, scaling):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
        max_position_embeddings=131_072, rope_scaling=dict(scaling))
    ref = ROPE_INIT_FUNCTIONS["llama3"](hf)[0].numpy()
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    ours = np.asarray(rope_frequencies(head_dim, theta, RopeScaling(**params)))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    plain = np.asarray(rope_frequencies(head_dim, theta))
    ratio = ours / plain  # every band is exercised: kept (1), divided by factor, and in between
    assert np.any(ratio == 1) and np.any(np.isclose(ratio, 1 / scaling["factor"]))
    assert np.any((ratio < 1) & (ratio > 1 / scaling["factor"] + 1e-6))


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
@pytest.mark.slow
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


@pytest.mark.slow
def test_unrolled_layers_give_the_scanned_logits_gradients_and_cache():
    """scan_layers=False unrolls the layer loop (a program that grows with depth, faster for a few small
    layers on CPU): the same logits, gradients and KV cache as the scanned loop, up to rounding."""
    from flax import nnx

    cfg = preset("tiny")
    tokens = jnp.asarray(padded_batch("left")[0]) % cfg.vocab_size

    def run(scan_layers):
        model = reval_jax.create_model(cfg.replace(scan_layers=scan_layers), seed=1)
        loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
        _, cache = model.hidden_states(tokens, cache=init_cache(cfg, tokens.shape[0], tokens.shape[1] + 4))
        return model(tokens), nnx.grad(loss)(model), cache

    scanned, unrolled = run(True), run(False)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert _jaxpr_size(2) == _jaxpr_size(28)  # the default stays one scan


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
    # Qwen3-1.7B (tied) 1.72B, Qwen3-8B 8.19B, Llama-3.1-8B 8.03B (the model cards' 1.7B / 8.2B / 8B)
    assert preset("qwen3-1.7b").num_params() == 1_720_574_976
    assert preset("qwen3-8b").num_params() == 8_190_735_360
    assert preset("llama-3.1-8b").num_params() == 8_030_261_248
    q3, llama = preset("qwen3-8b"), preset("llama-3.1-8b")
    assert (q3.family, q3.qk_norm, q3.attention_bias, q3.head_dim) == ("qwen3", True, False, 128)
    assert (llama.family, llama.attention_bias, llama.rope_theta) == ("llama", False, 500_000.0)
    assert llama.rope_scaling.original_max_position_embeddings == 8192 and llama.rms_norm_eps == 1e-5
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("qwen9")


def test_decoder_is_the_class_and_qwen2_its_kept_name():
    from reval_jax.model import decoder

    assert decoder.Decoder.__name__ == "Decoder" and decoder.Qwen2 is decoder.Decoder
    assert reval_jax.Decoder is reval_jax.Qwen2 is decoder.Decoder
    model = reval_jax.create_model(preset("tiny"))
    assert type(model) is reval_jax.Decoder and isinstance(model, reval_jax.Qwen2)
