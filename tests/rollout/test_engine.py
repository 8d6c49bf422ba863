"""The rollout engine against the static sampler it replaced, and paged attention against einsum.

The engine is exercised where it differs from the static sampler: few slots (continuous batching:
slots refilled as rows finish), small pages, prompts prefilled in chunks, a cache too small for
every row at once (preemption and resume), per-request limits. Tokens are keyed by (seed, prompt id,
sample, step), so they must be the static sampler's; the two programs' logits agree to float32
rounding, so a row may part ways only at a near tie (test_sampler.agreed_columns).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import tiny_model
from test_sampler import agreed_columns

from reval_jax.model.attention import SegmentMask, attention
from reval_jax.rollout.engine import EngineConfig, decode_chunk
from reval_jax.rollout.pages import TRASH, DecodeRead, PrefillRead, decode_items, paged_attend, ragged_attend
from reval_jax.rollout.sampler import SamplingConfig, generate, generate_static

RNG = np.random.RandomState(0)
PROMPTS = [list(RNG.randint(1, 120, n)) for n in (5, 17, 9, 33, 2, 12)]
SAMPLED = SamplingConfig(max_new_tokens=24, num_samples=3, temperature=0.9, top_k=30, top_p=0.95,
                         stop_ids=(7, 11), buckets=(64,))
GREEDY = SamplingConfig(max_new_tokens=24, num_samples=1, greedy=True, stop_ids=(7,), buckets=(64,))
# 6 slots for 18 samples (two prompts at a time), pages of 4 tokens, 8-token prefill chunks, and 22
# pages: one whole sequence, where two prompts' samples need up to 50 (the static cache holds 6 × 22).
# Greedy (1 sample per prompt): 2 slots.
SMALL = EngineConfig(slots=6, page_size=4, cache_tokens=88, prefill_chunk=8, prefill_rows=2, block_pages=2)


@functools.cache
def static(config: SamplingConfig, seed: int = 3):
    return jax.tree.map(np.asarray, generate_static(tiny_model(), PROMPTS, config, seed=seed))


def run(config, engine, seed=3, **kwargs):
    return jax.tree.map(np.asarray, generate(tiny_model(), PROMPTS, config, seed=seed, engine=engine, **kwargs))


@functools.cache
def _forward():
    graphdef, state = nnx.split(tiny_model())
    return jax.jit(lambda tokens, mask: nnx.merge(graphdef, state)(tokens, mask=mask))


def response_logits(r):
    """The full forward's logits that predicted each response token of rollout r: [R, A, V]."""
    traj = r.to_trajectories()
    P = r.prompt_tokens.shape[1]
    return np.asarray(_forward()(jnp.asarray(traj.tokens), jnp.asarray(traj.attn_mask)))[:, P - 1 : -1]


def assert_same_rollout(got, want, config, seed=3):
    """The engine's rollout `got` has the static sampler's `want`: the same draws (two programs that
    round differently may part only at a near tie, test_sampler.agreed_columns), masks, lengths and
    log-probs where they agree."""
    for name in ("prompt_tokens", "prompt_mask", "group_id"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    agreed = agreed_columns(got.response_tokens, want.response_tokens, response_logits(want), config, seed=seed,
                            prompt_ids=want.group_id)
    same = agreed == config.max_new_tokens
    for name in ("response_mask", "response_length", "truncated"):
        np.testing.assert_array_equal(getattr(got, name)[same], getattr(want, name)[same], err_msg=name)
    for i, n in enumerate(agreed):
        np.testing.assert_allclose(got.logp[i, :n], want.logp[i, :n], atol=1e-5)
    assert same.mean() > 0.9  # near ties are rare: nearly every row is the static sampler's


@pytest.mark.parametrize("config,engine", [pytest.param(SAMPLED, SMALL, marks=pytest.mark.slow),
                                           (GREEDY, dataclasses.replace(SMALL, slots=2))], ids=["sampled", "greedy"])
def test_engine_returns_the_static_samplers_tokens(config, engine, monkeypatch):
    """Few slots, small pages, chunked prefill and a small cache (rows preempted and resumed) give the
    tokens and log-probs of the static sampler for the same seed."""
    from reval_jax.rollout import engine as engine_mod

    stats = []
    init = engine_mod.Engine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        stats.append(self.stats)

    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    assert_same_rollout(run(config, engine), static(config), config)
    s = stats[-1]
    rows = len(PROMPTS) * config.num_samples
    assert s["decode_calls"] >= rows // engine.slots  # slots were refilled: the loop was left and re-entered
    if config is SAMPLED:
        assert s["preempted"] > 0  # the cache ran out and rows resumed by re-prefilling
    assert_same_rollout(run(config, None), static(config), config)  # the default: one slot per sample


def test_the_decode_attention_block_does_not_change_the_tokens():
    """One (row, page) pair per attention block, against the default: the same draws."""
    assert_same_rollout(run(SAMPLED, dataclasses.replace(SMALL, decode_chunk=1)), static(SAMPLED), SAMPLED)


def test_decode_chunk_defaults():
    """32 pairs on CPU; on an accelerator the power of two covering a replica's pairs, within
    [256, a replica's rows × table width]; a configured chunk always wins."""
    auto = EngineConfig()
    assert decode_chunk(auto, "cpu", 5000, 8192) == 32
    assert decode_chunk(auto, "gpu", 3300, 32768) == 4096
    assert decode_chunk(auto, "tpu", 4096, 32768) == 4096
    assert decode_chunk(auto, "gpu", 10, 32768) == 256
    assert decode_chunk(auto, "gpu", 40000, 32768) == 32768
    assert decode_chunk(dataclasses.replace(auto, decode_chunk=48), "gpu", 3300, 32768) == 48
    with pytest.raises(ValueError, match="decode_chunk"):
        EngineConfig(decode_chunk=-1)


def test_an_adaptive_decode_chunk_bounds_the_call_to_the_steps_it_covers():
    """On an accelerator a decode call runs until its rows could outgrow its chunk (each live row
    adds a page every S steps), then the next call picks a larger chunk; on CPU nothing changes."""
    from reval_jax.rollout.engine import Engine

    e = Engine(tiny_model(), GREEDY, EngineConfig(slots=4, page_size=4), prompt_bucket=64)  # W = 22 pages
    assert e.geometry.width == 22
    pos, live = np.array([9, 30, 3, 0]), np.array([True, True, True, False])  # 3 + 8 + 1 = 12 pairs
    assert e._chunk(pos, live, 24) == (32, 24)
    e.platform = "gpu"
    assert e._chunk(pos, live, 24) == (256, 24)  # the least chunk covers the whole table: no bound
    # a replica of 400 slots: 12 pairs, chunk 256, 3 live rows grow 1 page / 4 steps
    e.geometry = dataclasses.replace(e.geometry, slots=400)
    assert e._chunk(pos, live, 1000) == (256, 4 * ((256 - 12) // 3))


@pytest.mark.slow
def test_adaptive_decode_chunks_sample_the_static_samplers_tokens(monkeypatch):
    """The accelerator rule run on CPU: pages of one token, so 18 rows outgrow a chunk within a few
    steps and the next calls pick larger chunks; the draws are the static sampler's."""
    from reval_jax.rollout import engine as engine_mod
    from reval_jax.rollout import programs

    init = engine_mod.Engine.__init__

    def as_gpu(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.platform = "gpu"

    chunks = []
    decode = programs.decode

    def spy(*args, chunk, **kwargs):
        chunks.append(chunk)
        return decode(*args, chunk=chunk, **kwargs)

    monkeypatch.setattr(engine_mod.Engine, "__init__", as_gpu)
    monkeypatch.setattr(programs, "decode", spy)
    assert_same_rollout(run(SAMPLED, EngineConfig(slots=18, page_size=1, prefill_rows=6)), static(SAMPLED), SAMPLED)
    assert chunks[0] == 256 and max(chunks) > 256, chunks  # calls ended at the bound and took larger chunks


def test_responses_vary_in_length_so_slots_refill():
    r = static(SAMPLED)
    assert r.response_length.min() < 10 and r.response_length.max() == 24 and r.truncated.any()


@pytest.mark.slow
def test_prompt_pages_are_shared_by_the_samples():
    """A 32-token prompt, 4 samples, pages of 16: shared, the prompt takes 2 pages and each sample 1
    more (6 + 4 of headroom fit in 10); unshared the samples would need 12 and be preempted."""
    prompt = list(RNG.randint(1, 120, 32))
    config = SamplingConfig(max_new_tokens=16, num_samples=4, temperature=1.0, buckets=(32,))
    engine = EngineConfig(slots=4, page_size=16, cache_tokens=160, prefill_chunk=32)
    from reval_jax.rollout.engine import Engine

    e = Engine(tiny_model(), config, engine, prompt_bucket=32)
    out = e.run([prompt], seed=1, prompt_ids=[5], limits=[16])
    assert e.stats["preempted"] == 0 and e.stats["prefill_calls"] == 1
    ref = jax.tree.map(np.asarray, generate_static(tiny_model(), [prompt], config, seed=1, prompt_ids=[5]))
    for n, (tokens, logp, _) in enumerate(out[0]):
        np.testing.assert_array_equal(tokens, ref.response_tokens[n, : len(tokens)])
        np.testing.assert_allclose(logp, ref.logp[n, : len(tokens)], atol=1e-5)


def test_per_request_max_new_tokens():
    """Each prompt's own limit: responses are the unlimited ones cut at the limit, flagged truncated
    when no stop token came first."""
    limits = [3, 24, 1, 10, 7, 24]
    r, full = run(SAMPLED, SMALL, max_new_tokens=limits), static(SAMPLED)
    N = SAMPLED.num_samples
    for i in range(len(PROMPTS) * N):
        limit = limits[i // N]
        n = min(full.response_length[i], limit)
        assert r.response_length[i] == n
        np.testing.assert_array_equal(r.response_tokens[i, :n], full.response_tokens[i, :n])
        stopped = n > 0 and r.response_tokens[i, n - 1] in SAMPLED.stop_ids
        assert r.truncated[i] == (not stopped)
        assert np.all(r.response_tokens[i, n:] == SAMPLED.pad_id) and np.all(r.logp[i, n:] == 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(SAMPLED, SMALL, max_new_tokens=[25] * len(PROMPTS))


def test_a_cache_smaller_than_one_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="cache_tokens"):
        run(GREEDY, EngineConfig(slots=2, page_size=4, cache_tokens=8))


def _scattered_pool(lengths, S=4, K=2, H=8, W=16, G=40, seed=1):
    """Rows of the given lengths (keys per row; the query is the last one) in pages scattered over a
    pool whose unread pages hold NaN; the trash page and the unfilled tail of each row's last page
    hold finite junk. Returns (keys, values [B, 16, K, H], pool_k, pool_v [1, G, K, S, H], table)."""
    B = len(lengths)
    rng = np.random.RandomState(seed)
    keys = rng.normal(size=(B, W, K, H)).astype(np.float32)
    values = rng.normal(size=(B, W, K, H)).astype(np.float32)
    pool_k = np.full((1, G, K, S, H), np.nan, np.float32)
    pool_v = np.full((1, G, K, S, H), np.nan, np.float32)
    pool_k[0, TRASH], pool_v[0, TRASH] = 1e4, -1e4
    table = np.zeros((B, W), np.int32)
    free = iter(rng.permutation(np.arange(1, G)))
    for b in range(B):
        for w in range(-(-lengths[b] // S)):
            table[b, w] = next(free)
            pool_k[0, table[b, w]], pool_v[0, table[b, w]] = 3e3, -3e3  # a recycled page's old contents
            for s in range(S):
                p = w * S + s
                if p < lengths[b] - 1:  # earlier keys are in the cache; the last one is written now
                    pool_k[0, table[b, w], :, s], pool_v[0, table[b, w], :, s] = keys[b, p], values[b, p]
    return keys, values, pool_k, pool_v, table


def _attention_reference(q, keys, values, lengths):
    kv_seg = (np.arange(keys.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                     SegmentMask(np.ones(q.shape[:2], np.int32), jnp.asarray(kv_seg),
                                 q_offset=keys.shape[1] - 1),  # every key slot is before the query
                     implementation="einsum")


def test_paged_attention_equals_einsum_and_reads_only_filled_blocks():
    """Rows of different lengths in scattered pages; every page the loop must not read (table entries
    past the longest row) holds NaN, so reading one would poison the output."""
    B, T, N, H, bp = 3, 1, 4, 8, 1
    lengths = np.array([9, 3, 14])
    keys, values, pool_k, pool_v, table = _scattered_pool(lengths)
    q = np.random.RandomState(2).normal(size=(B, T, N, H)).astype(np.float32)
    positions = (lengths - 1)[:, None].astype(np.int32)
    new_k = keys[np.arange(B), lengths - 1][:, None]
    new_v = values[np.arange(B), lengths - 1][:, None]
    read = lambda table, positions: PrefillRead(table=table, positions=positions, valid=jnp.ones((B, T), bool),
                                                block_pages=bp)
    out, _, _ = jax.jit(lambda q, k, v, pk, pv, table, positions: paged_attend(
        q, k, v, pk, pv, jnp.asarray(0), read(table, positions)))(
        jnp.asarray(q), jnp.asarray(new_k), jnp.asarray(new_v), jnp.asarray(pool_k), jnp.asarray(pool_v),
        jnp.asarray(table), jnp.asarray(positions))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(_attention_reference(q, keys, values, lengths)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_ragged_attention_reads_each_rows_own_pages(chunk):
    """Decode attention reads each row's filled pages only: a short row beside a long one reads no
    page past its own end (they hold NaN), rows sharing their first pages (a prompt's samples) read
    them each, an idle row reads nothing and gives 0; equal to einsum over the keys for any chunk."""
    N, K, H, S = 4, 2, 8, 4
    lengths = np.array([9, 3, 14, 1, 6])  # keys per row, the query is the last one
    keys, values, pool_k, pool_v, table = _scattered_pool(lengths, S=S, K=K, H=H)
    # row 4 shares row 0's first page (a prompt's sample): same keys there
    table[4, 0] = table[0, 0]
    keys[4, :S], values[4, :S] = keys[0, :S], values[0, :S]
    B = len(lengths) + 1  # and an idle slot (not live) whose table points at NaN pages
    table = np.concatenate([table, np.full((1, table.shape[1]), 39, np.int32)])
    q = np.random.RandomState(2).normal(size=(B, 1, N, H)).astype(np.float32)
    positions = np.append(lengths - 1, 7)[:, None].astype(np.int32)
    live = np.arange(B) < len(lengths)
    new_k = np.concatenate([keys[np.arange(B - 1), lengths - 1], keys[:1, 0]])[:, None]
    new_v = np.concatenate([values[np.arange(B - 1), lengths - 1], values[:1, 0]])[:, None]

    @jax.jit
    def run(q, new_k, new_v, pool_k, pool_v, table, positions, live):
        items = decode_items(table, positions[:, 0], live, S, chunk)
        read = DecodeRead(table=table, positions=positions, valid=live[:, None], items=items, chunk=chunk)
        return ragged_attend(q, new_k, new_v, pool_k, pool_v, jnp.asarray(0), read), items.count

    (out, _, _), count = run(*map(jnp.asarray, (q, new_k, new_v, pool_k, pool_v, table, positions, live)))
    out = np.asarray(out)
    assert int(count.sum()) == sum(-(-n // S) for n in lengths)  # each row's filled pages, nothing more
    assert np.isfinite(out).all() and np.all(out[-1] == 0)
    np.testing.assert_allclose(out[:-1], np.asarray(_attention_reference(q[:-1], keys, values, lengths)),
                               rtol=1e-5, atol=1e-5)
