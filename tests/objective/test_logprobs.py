"""Chunked sequence statistics: equal to the naive logits computation, and memory-lean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import tiny_model

import reval_jax
from reval_jax.model.config import preset
from reval_jax.objective.logprobs import naive_sequence_stats, sequence_stats


def _batch(B=3, T=20, vocab=128, prompt=7, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (B, T))
    attn = np.ones((B, T), bool)
    attn[1, :2] = False  # left padding in the prompt of row 1
    attn[2, 15:] = False  # right padding after the response of row 2
    resp = np.zeros((B, T), bool)
    resp[:, prompt:] = True
    resp &= attn
    s1 = np.full((B,), prompt - 1)
    return [jnp.asarray(x) for x in (tokens, attn, resp, s1)]


chunked = nnx.jit(sequence_stats, static_argnames=("chunk", "temperature"))
naive = nnx.jit(naive_sequence_stats, static_argnames=("temperature",))


@pytest.mark.parametrize(("chunk", "temperature"), [(1, 1.0), (7, 1.0), (1024, 1.0), (16, 0.7)])
def test_chunked_equals_naive(chunk, temperature):
    model = tiny_model(seed=2)
    batch = _batch()
    got = chunked(model, *batch, chunk=chunk, temperature=temperature)
    ref = naive(model, *batch, temperature=temperature)
    np.testing.assert_allclose(np.asarray(got.logp), np.asarray(ref.logp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.v0), np.asarray(ref.v0), atol=1e-5)
    assert np.all(np.asarray(got.logp)[~np.asarray(batch[2])] == 0)
    assert np.all(np.asarray(got.logp)[np.asarray(batch[2])] < 0)


@pytest.mark.slow
def test_chunked_gradients_equal_naive():
    model = tiny_model(seed=2)
    batch = _batch()

    def loss(m, fn):
        s = fn(m, *batch)
        return jnp.sum(s.logp) ** 2 * 1e-3 + jnp.sum(s.v0)

    g1 = nnx.jit(nnx.grad(lambda m: loss(m, lambda *a: sequence_stats(*a, chunk=8))))(model)
    g2 = nnx.jit(nnx.grad(lambda m: loss(m, naive_sequence_stats)))(model)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_memory_stays_far_below_the_logits_tensor():
    """Vocabulary 151,936 and 16,384 tokens per step: the compiler's own memory analysis shows
    temporary memory well under a quarter of the float32 [B, T, V] logits (9.96 GB). Chunks are per
    row: 128 positions of each of the 8 rows, 1024 tokens per chunk."""
    cfg = preset("tiny", vocab_size=151_936, hidden_size=64, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: reval_jax.Qwen2(cfg, rngs=nnx.Rngs(0))))
    B, T = 8, 2048
    args = [jax.ShapeDtypeStruct((B, T), d) for d in (jnp.int32, bool, bool)]
    args.append(jax.ShapeDtypeStruct((B,), jnp.int32))
    naive_bytes = B * T * cfg.vocab_size * 4

    def stats(state, *a):
        s = sequence_stats(nnx.merge(graphdef, state), *a, chunk=128)
        return s.logp, s.v0

    forward = jax.jit(stats).lower(state, *args).compile().memory_analysis()
    assert forward.temp_size_in_bytes < naive_bytes / 4
    grad = jax.jit(jax.grad(lambda s, *a: sum(jnp.sum(x) for x in stats(s, *a))))
    backward = grad.lower(state, *args).compile().memory_analysis()
    assert backward.temp_size_in_bytes < naive_bytes / 4


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_log_probs_move_model_sized_collectives_only(mesh_shape):
    """On a mesh, every row's chunks are unembedded on the device holding the row: the compiled
    forward + backward has no logits-sized collective, and the unembedding's gradient is summed
    over devices once, not once per chunk (8 chunks here). Per chunk, only the vocabulary-parallel
    combine of a tensor axis remains: [rows, C] maxima and sums, and the [rows, C, D] input
    gradient."""
    from jax.sharding import NamedSharding, PartitionSpec

    from reval_jax.parallel.sharding import make_mesh, state_shardings
    from reval_jax.tools import hlo

    mesh = make_mesh(mesh_shape)
    cfg = preset("tiny", vocab_size=4096, hidden_size=64, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=2, head_dim=32, tie_word_embeddings=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: reval_jax.Qwen2(cfg, rngs=nnx.Rngs(0), mesh=mesh)))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, state_shardings(state, mesh))
    B, T, chunk = 8, 256, 32
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = [jax.ShapeDtypeStruct((B, T), d, sharding=rows) for d in (jnp.int32, bool, bool)]
    args.append(jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows))

    def total(state, *a):
        s = sequence_stats(nnx.merge(graphdef, state), *a, chunk=chunk)
        return jnp.sum(s.logp) + jnp.sum(s.v0)

    text = jax.jit(jax.grad(total)).lower(state, *args).compile().as_text()
    report = hlo.collectives(text)
    chunks = T // chunk  # 8: a collective inside the chunk loop runs 8 times
    rows_here = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    activation = rows_here * chunk * cfg.hidden_size * 4  # one chunk's [rows, C, D] float32
    per_chunk = [c for c in report.largest(1000) if c.count >= chunks]
    assert all(c.bytes <= activation for c in per_chunk), per_chunk
    assert not per_chunk or mesh.shape["tensor"] > 1  # none at all without vocabulary parallelism
    model_bytes = cfg.num_params() * 4  # float32 parameters (and gradients), whole
    assert report.bytes["all-reduce"] + report.bytes["reduce-scatter"] <= 2 * model_bytes, report.largest(5)
