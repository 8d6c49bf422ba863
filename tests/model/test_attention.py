"""reval_jax.model.attention: every CPU implementation equals the einsum reference (outputs and chunked
gradients) over left / right padding and packed segments; the model packs rows without leaking
across segments; chunked attention never holds a [T, S] score tensor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import tiny_model

from reval_jax.model.attention import AUTO, SegmentMask, allowed_mask, attention, resolve
from reval_jax.model.config import preset
from reval_jax.model.decoder import init_cache

F32_TOL = 1e-5  # max abs difference in float32; never loosened
# bfloat16 keeps 8 significant bits: outputs of magnitude 1-4 are rounded to steps of 2^-7..2^-6,
# and einsum rounds the normalised probabilities to bf16 while chunked rounds the unnormalised
# block probabilities, so the two differ by a bf16 step or two of the output (2^-6 measured).
BF16_TOL = 2**-5
B, T, N, K, H = 3, 37, 4, 2, 8  # T not a multiple of the block
BLOCK = 16


def segment_ids(layout: str, length: int = T) -> np.ndarray:
    """[B, length] int32 segment ids: one full row, then rows padded on the left / right, or rows
    holding 2-3 packed segments and padding."""
    seg = np.ones((B, length), np.int32)
    if layout == "left":
        seg[1, :9] = 0
        seg[2, :length - 5] = 0
    elif layout == "right":
        seg[1, 20:] = 0
        seg[2, 3:] = 0
    elif layout == "packed":
        seg[0] = np.repeat([1, 2, 3], [10, 15, length - 25])
        seg[1] = np.repeat([1, 2, 0], [17, length - 20, 3])
        seg[2] = np.repeat([0, 1, 2, 3, 0], [2, 8, 11, 9, length - 30])
    return seg


def qkv(dtype, length: int = T, seed: int = 0):
    r = np.random.RandomState(seed)
    q = r.randn(B, length, N, H)
    k, v = r.randn(B, length, K, H), r.randn(B, length, K, H)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def run(impl, q, k, v, seg, q_offset=0, kv_seg=None):
    kv_seg = seg if kv_seg is None else kv_seg
    return attention(
        q, k, v, SegmentMask(jnp.asarray(seg), jnp.asarray(kv_seg), q_offset=q_offset),
        implementation=impl, block_q=BLOCK, block_kv=BLOCK,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["left", "right", "packed"])
@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_matches_einsum(impl, layout, dtype):
    """xla is jax.nn.dot_product_attention with exactly the mask plumbing of the cudnn path."""
    seg = segment_ids(layout)
    q, k, v = qkv(dtype)
    ref = np.asarray(run("einsum", q, k, v, seg), np.float32)
    out = np.asarray(jax.jit(functools.partial(run, impl))(q, k, v, seg), np.float32)
    assert out.shape == (B, T, N, H) and np.isfinite(out).all()  # padding queries too
    valid = seg != 0  # a query with no allowed key has an implementation-defined output
    assert np.abs(out - ref)[valid].max() <= (F32_TOL if dtype == "float32" else BF16_TOL)


@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_chunked_gradients_match_einsum(layout):
    seg = segment_ids(layout)
    q, k, v = qkv("float32")
    cot = jax.random.normal(jax.random.key(1), q.shape) * (seg != 0)[:, :, None, None]

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(run(impl, q, k, v, seg) * cot)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for ref, got in zip(grads("einsum"), grads("chunked"), strict=True):
        assert np.isfinite(np.asarray(got)).all()
        assert np.abs(np.asarray(ref) - np.asarray(got)).max() <= F32_TOL


def test_chunked_prefill_at_a_traced_cache_offset():
    """Queries at slots offset..offset+T-1 of a longer key sequence (prefill into a KV cache)."""
    S = 53
    q = qkv("float32")[0]
    _, k, v = qkv("float32", length=S, seed=1)
    kv_seg = np.ones((B, S), np.int32)
    kv_seg[1, :4] = 0  # left padding of an earlier prompt
    kv_seg[:, 11 + T:] = 0  # empty slots after this call's keys
    seg = segment_ids("left")
    f = jax.jit(lambda impl, off: run(impl, q, k, v, seg, off, kv_seg), static_argnums=0)
    offset = jnp.int32(11)
    ref, out = np.asarray(f("einsum", offset)), np.asarray(f("chunked", offset))
    assert np.abs(out - ref)[seg != 0].max() <= F32_TOL


def test_allowed_mask_is_causal_within_segments():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    expected = np.array([
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0],
    ], bool)
    np.testing.assert_array_equal(np.asarray(allowed_mask(seg, seg))[0], expected)


def test_names_are_validated_and_auto_is_chunked_on_cpu(monkeypatch):
    assert resolve("auto") == "chunked"
    monkeypatch.setitem(AUTO, "cpu", "cudnn")  # as on a GPU: cuDNN only for 16-bit inputs
    assert resolve("auto", jnp.bfloat16) == "cudnn" and resolve("auto", jnp.float32) == "chunked"
    with pytest.raises(ValueError, match="einsum.*chunked.*splash"):
        resolve("flash")
    with pytest.raises(ValueError, match="expected one of"):
        preset("tiny", attention="flash")


# ----------------------------------------------------------------------------- through the model


def packed_rows():
    """Three sequences of lengths 9, 14, 6 packed into one row of 32 (3 padding), and alone."""
    lengths = (9, 14, 6)
    rng = np.random.RandomState(0)
    seqs = [rng.randint(1, 128, n) for n in lengths]  # token 0 marks padding below
    tokens = np.zeros((1, 32), np.int32)
    seg = np.zeros((1, 32), np.int32)
    pos = np.zeros((1, 32), np.int32)
    start = 0
    for i, s in enumerate(seqs):
        tokens[0, start:start + len(s)] = s
        seg[0, start:start + len(s)] = i + 1
        pos[0, start:start + len(s)] = np.arange(len(s))
        start += len(s)
    return seqs, tokens, seg, pos


def test_model_packed_rows_chunked_equal_einsum_and_sequences_alone():
    seqs, tokens, seg, pos = packed_rows()
    chunked = tiny_model(attention="chunked", attention_block=8)
    einsum = tiny_model(attention="einsum")
    args = dict(positions=jnp.asarray(pos), mask=jnp.asarray(seg != 0), segment_ids=jnp.asarray(seg))
    got = np.asarray(chunked(jnp.asarray(tokens), **args))
    ref = np.asarray(einsum(jnp.asarray(tokens), **args))
    assert np.abs(got - ref)[seg != 0].max() <= F32_TOL
    alone = np.zeros((len(seqs), 16), np.int32)  # each sequence alone in its row, right-padded
    for i, s in enumerate(seqs):
        alone[i, :len(s)] = s
    alone_logits = np.asarray(chunked(jnp.asarray(alone), mask=jnp.asarray(alone != 0)))
    start = 0
    for i, s in enumerate(seqs):  # no token sees another segment: its logits are those alone
        assert np.abs(got[0, start:start + len(s)] - alone_logits[i, :len(s)]).max() <= F32_TOL
        start += len(s)


def test_model_cached_prefill_through_chunked_equals_full_forward():
    """A left-padded prompt longer than the einsum decode limit goes through chunked attention
    over the cache (queries at the traced cache index)."""
    model = tiny_model(attention="chunked", attention_block=8)
    _, tokens, _, _ = packed_rows()
    mask = np.ones(tokens.shape, bool)
    mask[0, :5] = False
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    full = np.asarray(model(tokens, mask=mask))
    cached, _ = model(tokens, mask=mask, cache=init_cache(model.cfg, 1, 40))
    assert np.abs(np.asarray(cached) - full)[0, 5:].max() <= F32_TOL


# ----------------------------------------------------------------------------- memory


def test_chunked_memory_stays_far_below_one_score_tensor():
    """B=1, T=S=4096, N=8, H=64: one float32 [N, T, S] score tensor is 512 MiB. The compiler's own
    memory analysis of forward + backward: chunked (blocks of 512, ~82 MiB measured, set by the
    block size, not T) stays under a quarter of it; einsum (~2 GiB measured) holds more than it."""
    Tm, Nm, Hm = 4096, 8, 64
    scores = Nm * Tm * Tm * 4
    shapes = [jax.ShapeDtypeStruct((1, Tm, Nm, Hm), jnp.float32)] * 3
    seg = jax.ShapeDtypeStruct((1, Tm), jnp.int32)

    def temp_bytes(impl):
        def loss(q, k, v, seg):
            out = attention(q, k, v, SegmentMask(seg, seg), implementation=impl)
            return jnp.sum(out * out)

        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return fwd_bwd.lower(*shapes, seg).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("chunked") < scores / 4
    assert temp_bytes("einsum") > scores
