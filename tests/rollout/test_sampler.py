"""The sampler: cached decode = full forward, greedy = transformers, RNG independent of the batch,
stop tokens, top-k / top-p against numpy, and sharded = single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import FAMILIES, VOCAB, hf_dir, hf_model

import reval_jax
from reval_jax.parallel.sharding import make_mesh
from reval_jax.rollout.sampler import (
    SamplingConfig,
    bucket_length,
    generate,
    pad_prompts,
    sample_logits,
)
from reval_jax.rollout.static_sampler import decode_step, prefill

TOL = 1e-4  # float32 logits / log-probs; never loosened

PROMPTS = [
    [5, 17, 99, 3, 64, 12, 7, 81, 33, 2, 45],
    [9, 100, 4],
    [71, 20, 58, 6, 115, 90, 13],
    [120],
]
BUCKETS = (8, 16)
SAMPLE = SamplingConfig(max_new_tokens=8, num_samples=2, top_k=20, top_p=0.9, temperature=0.8,
                        buckets=BUCKETS)


@functools.cache
def tiny(mesh_shape=None, family="qwen2"):
    mesh = None if mesh_shape is None else make_mesh(mesh_shape)
    return reval_jax.load_hf(hf_dir(family=family), load_tokenizer=False, mesh=mesh)[0]


@functools.cache
def _forward(family="qwen2"):
    graphdef, _ = nnx.split(tiny(family=family))
    return jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, mask=mask))


def full_logits(tokens, mask, family="qwen2"):
    """One forward pass over whole sequences: logits [B, T, V] float32."""
    state = nnx.state(tiny(family=family))
    return np.asarray(_forward(family)(state, jnp.asarray(tokens), jnp.asarray(mask)))


@functools.cache
def rollout(config: SamplingConfig = SAMPLE, seed: int = 0, mesh_shape=None, family="qwen2"):
    return jax.tree.map(np.asarray, generate(tiny(mesh_shape, family), PROMPTS, config, seed=seed))


def response_logits(r, family="qwen2"):
    """Logits that predicted each response token, from one full forward pass: [R, A, V]."""
    traj = r.to_trajectories()
    P = r.prompt_tokens.shape[1]
    logits = full_logits(traj.tokens, traj.attn_mask, family)
    return logits[:, P - 1 : -1]


def log_q(logits, temperature, top_k, top_p):
    """numpy: log softmax(logits / T) restricted to top-k then top-p, renormalised; -inf outside."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    k = top_k or z.size
    p = np.exp(z[order[:k]] - z[order[0]])
    p /= p.sum()
    mass = 0.0
    for i in range(k):
        if mass >= top_p:
            break
        keep[order[i]] = True
        mass += p[i]
    out = np.full(z.shape, -np.inf)
    out[keep] = z[keep] - np.log(np.sum(np.exp(z[keep])))
    return out


# ----------------------------------------------------------------------------- near ties
# Two compiled programs (another batch, padding, sharding or config) compute the logits with other
# rounding, a few ulps apart. Their draws agree wherever the logits are not within rounding of a
# tie; at a near tie either program may go either way. The tests below that compare the tokens of
# two programs therefore accept a row that parts ways at a near tie, and nowhere else.

NEAR = TOL  # the programs' logits are within TOL of the full forward's (test_cached_decode_equals_full_forward)
_draw = jax.jit(sample_logits, static_argnames="config")


def step_key(seed: int, prompt_id: int, n: int, h: int):
    """The sampler's key of sample n of prompt `prompt_id` at response step h (module docstring):
    fold_in(fold_in(fold_in(key(seed), prompt_id), n), h)."""
    key = jax.random.key(np.uint32(seed))
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, prompt_id), n), h)


def drawn_near(logits, key, config: SamplingConfig, count: int = 256) -> set[int]:
    """The tokens `sample_logits` draws with `key` from logits within NEAR of `logits` [V]: from
    them and from `count` random perturbations of at most NEAR in each logit. One token unless
    the logits are within about NEAR of a tie (of the best two candidates, of the ranks that pair
    candidates with their noise, of the top-k or top-p cut)."""
    noise = np.random.RandomState(0).uniform(-NEAR, NEAR, (count, logits.shape[-1]))
    batch = np.concatenate([logits[None], logits[None] + noise]).astype(np.float32)
    tokens, _ = _draw(jnp.asarray(batch), jnp.broadcast_to(key, (count + 1,)), config=config)
    return set(np.asarray(tokens).tolist())


def agreed_columns(got, want, logits, config: SamplingConfig, *, seed=0, prompt_ids=None, columns=None):
    """How many leading response columns each row of two programs' tokens `got` and `want` [R, A]
    shares, up to `columns` per row (default A). A row may part ways only at a near tie: a column
    h where both tokens are drawn (`drawn_near`) from `logits[i, h]`, the full forward's logits
    over the row's shared prefix, with the row's key at step h (rows are b·N + n, prompt
    `prompt_ids[i]`). Anything else fails: a real difference between the programs."""
    R, A = want.shape
    agreed = np.full(R, A) if columns is None else np.array(columns)
    for i in range(R):
        differ = np.flatnonzero(got[i, : agreed[i]] != want[i, : agreed[i]])
        if differ.size:
            h = int(differ[0])
            pid = 0 if prompt_ids is None else int(prompt_ids[i])
            near = drawn_near(logits[i, h], step_key(seed, pid, i % config.num_samples, h), config)
            pair = {int(got[i, h]), int(want[i, h])}
            assert pair <= near, f"row {i} column {h}: tokens {pair}, not a near tie (drawn near: {near})"
            agreed[i] = h
    return agreed


@pytest.mark.slow
def test_near_ties_are_told_from_real_differences():
    """The helpers above: an exact tie of the best two logits is a near tie, a gap of 10 × NEAR is
    not; and the documented keys reproduce the rollout's draws from the full forward's logits."""
    greedy = SamplingConfig(max_new_tokens=1, greedy=True)
    logits = np.random.RandomState(0).normal(0, 1.0, 40).astype(np.float32)
    best = int(np.argmax(logits))
    other = 7 if best != 7 else 8
    logits[other] = logits[best]
    assert drawn_near(logits, jax.random.key(0), greedy) == {best, other}
    logits[other] = logits[best] - 10 * NEAR
    assert drawn_near(logits, jax.random.key(0), greedy) == {best}
    r = rollout()
    logits = response_logits(r)
    steps = ties = 0
    for i in range(r.response_tokens.shape[0]):
        for h in range(r.response_length[i]):
            near = drawn_near(logits[i, h], step_key(0, r.group_id[i], i % SAMPLE.num_samples, h), SAMPLE)
            assert r.response_tokens[i, h] in near, (i, h)
            steps, ties = steps + 1, ties + (len(near) > 1)
    assert steps == r.response_mask.sum() > 0 and ties <= steps // 10, (ties, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family):
    model = tiny(family=family)
    graphdef, state = nnx.split(model)
    P, steps = 16, 6
    tokens, mask = pad_prompts(PROMPTS, P)
    cont = np.random.RandomState(0).randint(0, VOCAB, (len(PROMPTS), steps))  # teacher-forced

    pre = jax.jit(lambda s, t, m: prefill(nnx.merge(graphdef, s), t, m))
    step = jax.jit(lambda s, t, pos, c: decode_step(nnx.merge(graphdef, s), t, pos, c))
    logits, cache = pre(state, tokens, mask)
    grow = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, steps)] + [(0, 0)] * (x.ndim - 3))
    cache = cache.replace(k=grow(cache.k), v=grow(cache.v),
                          valid=jnp.pad(cache.valid, [(0, 0), (0, steps)]))
    stepped = [np.asarray(logits)]
    for h in range(steps):
        logits, cache = step(state, cont[:, h], mask.sum(-1) + h, cache)
        stepped.append(np.asarray(logits))
    stepped = np.stack(stepped, 1)  # [B, steps + 1, V]

    seq = np.concatenate([tokens, cont], 1)
    seq_mask = np.concatenate([mask, np.ones_like(cont, bool)], 1)
    ref = full_logits(seq, seq_mask, family)[:, P - 1 :]  # [B, steps + 1, V]
    assert stepped.dtype == np.float32 and stepped.shape == ref.shape
    assert np.abs(stepped - ref).max() <= TOL
    assert np.abs(ref).max() > 1.0


def test_sampled_logp_equals_full_forward_distribution():
    """End to end through the compiled loop: every sampled token lies in the top-k / top-p set of
    the full-forward logits; its log-prob is that of the truncated, renormalised distribution."""
    r = rollout()
    logits = response_logits(r)
    checked = 0
    for i in range(r.response_tokens.shape[0]):
        for h in range(r.response_length[i]):
            ref = log_q(logits[i, h], SAMPLE.temperature, SAMPLE.top_k, SAMPLE.top_p)
            token = r.response_tokens[i, h]
            assert np.isfinite(ref[token]), (i, h)
            assert abs(r.logp[i, h] - ref[token]) <= TOL
            checked += 1
    assert checked == r.response_mask.sum() > 0
    assert np.all(r.logp < 0)  # no row was left with a single candidate throughout


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_greedy_matches_transformers_generate(family):
    import torch

    config = SamplingConfig(max_new_tokens=12, greedy=True, buckets=BUCKETS)
    r = rollout(config, family=family)
    hf = hf_model(family=family)
    expected = []
    for prompt in PROMPTS:  # each prompt alone: no padding on the reference side
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, pad_token_id=0)
        expected.append(out[0, len(prompt) :].numpy())
        assert len(set(expected[-1].tolist())) >= 5, expected[-1]  # not one token repeated
    # transformers' tokens; two frameworks round differently, so a near tie may go either way
    agreed_columns(r.response_tokens, np.stack(expected), response_logits(r, family), config)
    assert np.all(r.logp == 0) and np.all(r.truncated) and np.all(r.response_length == 12)


@pytest.mark.slow
def test_samples_do_not_depend_on_batch_or_padding():
    prompt = PROMPTS[1]  # 3 tokens: alone it pads to bucket 8, in the batch below to 16
    alone = generate(tiny(), [prompt], SAMPLE, seed=3, prompt_ids=[42])
    batch = [PROMPTS[0], PROMPTS[2], prompt, PROMPTS[3]]  # the shapes of rollout(): no new compile
    mixed = generate(tiny(), batch, SAMPLE, seed=3, prompt_ids=[7, 8, 42, 9])
    assert alone.prompt_tokens.shape[1] == 8 and mixed.prompt_tokens.shape[1] == 16
    N = SAMPLE.num_samples
    rows = slice(2 * N, 3 * N)
    alone, mixed = jax.tree.map(np.asarray, alone), jax.tree.map(np.asarray, mixed)
    # the same draws; two programs round differently, so a near tie may go either way
    agreed = agreed_columns(mixed.response_tokens[rows], alone.response_tokens, response_logits(alone),
                            SAMPLE, seed=3, prompt_ids=alone.group_id)
    for i, n in enumerate(agreed):
        np.testing.assert_allclose(mixed.logp[rows][i, :n], alone.logp[i, :n], atol=1e-5)
    np.testing.assert_array_equal(mixed.group_id, np.repeat([7, 8, 42, 9], N))
    # the prompt id matters: the same prompt under another id gets other samples
    other = generate(tiny(), [prompt], SAMPLE, seed=3, prompt_ids=[43])
    assert not np.array_equal(np.asarray(other.response_tokens), alone.response_tokens)


def test_fixed_seed_reproduces_and_other_seed_differs():
    a, b = rollout(seed=0), rollout(seed=1)
    again = jax.tree.map(np.asarray, generate(tiny(), PROMPTS, SAMPLE, seed=0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.mean(a.response_tokens != b.response_tokens) > 0.5
    N = SAMPLE.num_samples
    samples = a.response_tokens.reshape(len(PROMPTS), N, -1)
    assert all(not np.array_equal(s[0], s[1]) for s in samples)  # the N samples of a prompt differ


def test_stop_token_is_kept_and_the_rest_masked():
    A = 12
    greedy = rollout(SamplingConfig(max_new_tokens=A, greedy=True, buckets=BUCKETS))
    stop = int(greedy.response_tokens[0, 3])  # prompt 0 produces it as its 4th token
    stops = (stop, 127)
    config = SamplingConfig(max_new_tokens=A, greedy=True, buckets=BUCKETS, stop_ids=stops)
    r = rollout(config)
    ends = []  # where the greedy responses first produce a stop token
    for g in greedy.response_tokens:
        hits = np.flatnonzero(np.isin(g, stops))
        ends.append(hits[0] + 1 if hits.size else A)
    assert ends[0] == 4
    # Up to there the rows decode the same greedy tokens (another program: up to a near tie), and
    # end there.
    agreed = agreed_columns(r.response_tokens, greedy.response_tokens, response_logits(greedy), config,
                            columns=ends)
    assert any(agreed[b] == ends[b] < A for b in range(len(PROMPTS)))  # rows that stop early
    for b in range(len(PROMPTS)):
        resp, n = r.response_tokens[b], int(r.response_length[b])
        if agreed[b] == ends[b]:
            assert n == ends[b]
        hits = np.flatnonzero(np.isin(resp[:n], stops))
        assert r.truncated[b] == (not hits.size) and (n == A if r.truncated[b] else hits.tolist() == [n - 1])
        np.testing.assert_array_equal(r.response_mask[b], np.arange(A) < n)  # stop token included
        assert np.all(resp[n:] == 0)

    traj = r.to_trajectories(iteration=5)
    P = r.prompt_tokens.shape[1]
    assert traj.tokens.shape == (len(PROMPTS), P + A) and np.all(traj.s1_index == P - 1)
    np.testing.assert_array_equal(traj.tokens[:, :P], r.prompt_tokens)
    np.testing.assert_array_equal(traj.response_mask[:, P:], r.response_mask)
    assert not traj.response_mask[:, :P].any()
    np.testing.assert_array_equal(traj.attn_mask,
                                  np.concatenate([r.prompt_mask, r.response_mask], 1))
    for b, n in enumerate(r.response_length):
        assert r.truncated[b] or traj.tokens[b, P + n - 1] in stops
        assert np.all(traj.tokens[b, P + n :] == 0)
    assert np.all(traj.iteration == 5) and np.all(traj.ref_version == -1)


@pytest.mark.slow
def test_sampled_stop_tokens_end_responses_and_loop_exits_early():
    stops = tuple(range(0, VOCAB, 4))  # a quarter of the vocabulary stops: every row stops early
    config = SamplingConfig(max_new_tokens=40, num_samples=2, stop_ids=stops, buckets=BUCKETS)
    r = rollout(config)
    traj = r.to_trajectories()
    P = r.prompt_tokens.shape[1]
    assert not r.truncated.any()
    for i, n in enumerate(r.response_length):
        resp = r.response_tokens[i]
        assert resp[n - 1] in stops and not np.isin(resp[: n - 1], stops).any()
        assert np.all(r.logp[i, n:] == 0) and np.all(r.logp[i, :n] < 0)
        np.testing.assert_array_equal(traj.sampler_logp[i, P:], r.logp[i])
    # the decode loop stopped at the longest response instead of running 40 steps
    from reval_jax.rollout.static_sampler import _decode, _prefill

    model = tiny()
    graphdef, params = nnx.split(model)
    tokens, mask = pad_prompts(PROMPTS, 16)
    ids = np.arange(4, dtype=np.int32)
    state = _prefill(graphdef, params, tokens, mask, ids, np.uint32(0), config=config)
    state = _decode(graphdef, params, state, config=config)
    assert int(state.step) == r.response_length.max() < 40


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 5, 1.0), (1.0, 0, 0.7), (0.7, 12, 0.9), (1.3, 0, 1.0)]
)
def test_top_k_top_p_match_numpy(temperature, top_k, top_p):
    V, draws = 40, 4000
    logits = np.random.RandomState(1).normal(0, 2.0, (3, V)).astype(np.float32)
    config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(0), draws * 3).reshape(draws, 3)
    tokens, logp = jax.jit(jax.vmap(lambda k: sample_logits(jnp.asarray(logits), k, config)))(keys)
    tokens, logp = np.asarray(tokens), np.asarray(logp)  # [draws, 3]
    for b in range(3):
        ref = log_q(logits[b], temperature, top_k, top_p)
        allowed = np.isfinite(ref)
        assert allowed.sum() < V or (top_k == 0 and top_p == 1.0)
        assert allowed[tokens[:, b]].all()  # only the allowed set is ever sampled
        np.testing.assert_allclose(logp[:, b], ref[tokens[:, b]], atol=1e-5)
        freq = np.bincount(tokens[:, b], minlength=V) / draws
        assert 0.5 * np.abs(freq - np.exp(ref)).sum() < 0.05  # total variation to the target q


def test_bucketing_reuses_compiled_functions():
    assert [bucket_length(n, (8, 16)) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 48]
    from reval_jax.rollout import programs  # the engine's

    rollout()  # compiled for bucket 16
    before = (programs.prefill._cache_size(), programs.decode._cache_size())
    shorter = [p[:10] for p in PROMPTS]  # 10 tokens still pad to 16
    r = generate(tiny(), shorter, SAMPLE, seed=0)
    assert r.prompt_tokens.shape[1] == 16
    assert (programs.prefill._cache_size(), programs.decode._cache_size()) == before


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (4, 2, 1)])
@pytest.mark.slow
def test_sharded_sampler_equals_single_device(mesh_shape):
    single = rollout()
    sharded = jax.tree.map(np.asarray, generate(tiny(mesh_shape), PROMPTS, SAMPLE, seed=0))
    for name in ("prompt_tokens", "prompt_mask", "group_id"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name), err_msg=name)
    # the same draws; the sharded program rounds differently, so a near tie may go either way
    agreed = agreed_columns(sharded.response_tokens, single.response_tokens, response_logits(single), SAMPLE,
                            prompt_ids=single.group_id)
    same = agreed == SAMPLE.max_new_tokens
    for name in ("response_mask", "response_length", "truncated"):
        np.testing.assert_array_equal(getattr(sharded, name)[same], getattr(single, name)[same], err_msg=name)
    for i, n in enumerate(agreed):
        np.testing.assert_allclose(sharded.logp[i, :n], single.logp[i, :n], atol=1e-5)


@pytest.mark.parametrize("mesh_shape,rows,config", [
    ((8, 1, 1), 16, SamplingConfig(max_new_tokens=1, top_k=20, top_p=0.9, temperature=0.8)),
    ((8, 1, 1), 16, SamplingConfig(max_new_tokens=1, top_p=0.9, temperature=0.8)),
    ((4, 1, 2), 16, SamplingConfig(max_new_tokens=1, top_k=20, top_p=0.9, temperature=0.8)),  # two-stage top-k
    ((4, 1, 2), 12, SamplingConfig(max_new_tokens=1, top_p=0.9, temperature=0.8)),  # rows dealt out, 3 per replica
    ((2, 1, 4), 16, SamplingConfig(max_new_tokens=1, top_k=5, temperature=1.3)),
    ((2, 1, 4), 16, SamplingConfig(max_new_tokens=1, top_k=100, top_p=0.7)),  # k > V / tp: rows dealt out
    ((1, 1, 8), 8, SamplingConfig(max_new_tokens=1, top_k=3, top_p=0.5)),
])
def test_each_replica_samples_its_own_rows_bit_for_bit(mesh_shape, rows, config):
    """sample_logits_on_mesh on logits split by rows over `data` and by vocabulary over `tensor`
    (as the rollout layout leaves them) draws the tokens and log-probs of sample_logits on the whole
    array, bit for bit; the logits are rounded to 0.1 so that many tie, within and across shards."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from reval_jax.rollout.sampling import sample_keys, sample_logits_on_mesh, step_keys

    V = 136
    mesh = make_mesh(mesh_shape)
    logits = np.round(np.random.RandomState(2).normal(0, 3.0, (rows, V)), 1).astype(np.float32)
    keys = step_keys(sample_keys(np.uint32(5), jnp.arange(rows, dtype=jnp.int32), jnp.zeros(rows, jnp.int32)), 3)
    want = jax.jit(lambda x, k: sample_logits(x, k, config))(logits, keys)
    split = "data" if mesh_shape[0] > 1 else None
    on_mesh = jax.device_put(logits, NamedSharding(mesh, P(split, "tensor" if mesh_shape[2] > 1 else None)))
    got = jax.jit(lambda x, k: sample_logits_on_mesh(x, k, config, mesh=mesh, rows=split))(on_mesh, keys)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert len(set(np.asarray(want[0]).tolist())) > rows // 2  # the rows draw different tokens
