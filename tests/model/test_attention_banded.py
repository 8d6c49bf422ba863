"""Banded attention over packed rows (`max_segment_len`): each query block reads only the key window
its segments can reach, and the result is the einsum reference's, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reval_jax.model.attention import SegmentMask, attention, banded_work, banding

F32_TOL = 1e-5  # as tests/model/test_attention.py: never loosened
B, N, K, H = 3, 4, 2, 8


def packed_rows(T: int, longest: int, seed: int) -> np.ndarray:
    """[B, T] segment ids: segments of 1..longest tokens back to back, some padding between and at
    the end (id 0), the last row one single segment of `longest` tokens then padding."""
    r = np.random.RandomState(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B - 1):
        at, sid = 0, 1
        while at < T:
            n = int(r.randint(1, longest + 1))
            if r.rand() < 0.2:  # a stretch of padding
                at += n
                continue
            seg[b, at : at + n] = sid
            at, sid = at + n, sid + 1
    seg[B - 1, :longest] = 1
    return seg


def qkv(T: int, dtype="float32", seed: int = 0):
    r = np.random.RandomState(seed)
    return tuple(jnp.asarray(r.randn(*shape), dtype) for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


def attend(impl, q, k, v, seg, longest=0, block=16):
    seg = jnp.asarray(seg)
    return attention(q, k, v, SegmentMask(seg, seg, max_segment_len=longest), implementation=impl,
                     block_q=block, block_kv=block)


@pytest.mark.parametrize("impl", ["einsum", "chunked", "xla"])
@pytest.mark.parametrize("T,longest,block", [(96, 11, 16), (101, 23, 64), (64, 7, 512), (40, 17, 8)])
def test_banded_equals_the_einsum_reference(impl, T, longest, block):
    assert banding(T, T, 0, longest, block) is not None  # the banded path is the one under test
    seg = packed_rows(T, longest, seed=T)
    q, k, v = qkv(T)
    real = (seg != 0)[:, :, None, None]
    want = np.where(real, attend("einsum", q, k, v, seg), 0)
    got = np.where(real, attend(impl, q, k, v, seg, longest, block), 0)
    np.testing.assert_allclose(got, want, atol=F32_TOL, rtol=0)


@pytest.mark.parametrize("impl", ["einsum", "chunked"])
@pytest.mark.slow
def test_banded_gradients_equal_the_einsum_reference(impl):
    T, longest = 80, 13
    seg = packed_rows(T, longest, seed=1)
    q, k, v = qkv(T, seed=1)
    w = jnp.asarray(np.random.RandomState(2).randn(B, T, N, H) * (seg != 0)[:, :, None, None], jnp.float32)

    def loss(impl, longest):
        return lambda q, k, v: jnp.sum(attend(impl, q, k, v, seg, longest) * w)

    want = jax.grad(loss("einsum", 0), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(impl, longest), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=F32_TOL, rtol=0)


def test_banding_applies_only_where_it_saves_work():
    assert banding(768, 768, 0, 96, 512) == (48, 96)  # windows of 144 keys instead of 768
    assert banding(768, 768, 0, 0, 512) is None  # no promise
    assert banding(96, 96, 0, 96, 512) is None  # one sequence per row: the window is the row
    assert banding(768, 800, 0, 96, 512) is None  # a cache (S != T)
    assert banding(768, 768, jnp.int32(0), 96, 512) is None  # a traced offset (prefill at a cache index)
    executed, dense = banded_work(768, 96, 512)
    assert (executed, dense) == (768 * 144, 768 * 768)


@pytest.mark.parametrize("impl", ["einsum", "chunked"])
def test_model_log_probs_with_the_band_equal_those_without(impl):
    """Through the decoder and logprobs.packed_stats (what the update computes): three sequences of
    9, 14, 6 tokens packed in a row of 32, attention blocks of 8: the band reads 24 keys, not 32."""
    from models import tiny_model

    from reval_jax.objective.logprobs import StatsConfig, packed_stats

    lengths = (9, 14, 6)
    rng = np.random.RandomState(0)
    tokens, seg, pos = (np.zeros((2, 32), np.int32) for _ in range(3))
    for row in range(2):
        start = 0
        for i, n in enumerate(lengths[row:] + lengths[:row]):
            tokens[row, start:start + n] = rng.randint(1, 128, n)
            seg[row, start:start + n], pos[row, start:start + n] = i + 1, np.arange(n)
            start += n
    assert banding(32, 32, 0, 14, 8) == (8, 16)
    model = tiny_model(attention=impl, attention_block=8)
    args = [jnp.asarray(x) for x in (tokens, seg, pos, seg != 0, np.array([[0, 9, 23], [0, 14, 20]]))]
    want = packed_stats(model, *args, StatsConfig(chunk=16))
    got = packed_stats(model, *args, StatsConfig(chunk=16, max_segment_len=14))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=F32_TOL, rtol=0)
    # the band is really in use: a promise the 14-token sequence breaks changes its log-probs
    broken = packed_stats(model, *args, StatsConfig(chunk=16, max_segment_len=1))  # each block reads only itself
    assert np.abs(np.asarray(broken[0]) - np.asarray(want[0])).max() > 1e-3
