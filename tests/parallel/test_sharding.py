"""Sharding: the rules table, parameters created/loaded in their layout, and sharded = single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from models import hf_dir, padded_batch

import reval_jax
from reval_jax.model.config import preset
from reval_jax.parallel.sharding import logical_to_spec, make_mesh


def test_rules_table_maps_logical_axes():
    mesh = make_mesh((2, 1, 4))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P(None, "tensor")  # fsdp=1
    mesh = make_mesh((1, 2, 4))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("act_batch", "act_length"), (4, 8), mesh) == P("fsdp", None)
    # 2 kv heads do not divide a tensor axis of 4: replicated rather than an error
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh) == P("fsdp", None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices, only 8"):
        make_mesh((2, 2, 4))
    assert make_mesh((-1, 1, 2)).shape == {"data": 4, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("shape, family", [
    ((2, 1, 4), "qwen2"), ((1, 2, 4), "qwen2"), ((2, 2, 2), "qwen2"), ((1, 2, 4), "qwen3"),
    ((2, 2, 2), "llama"),
])
def test_sharded_forward_equals_single_device(shape, family):
    mesh = make_mesh(shape)
    single, _ = reval_jax.load_hf(hf_dir(num_kv_heads=4, family=family), load_tokenizer=False)
    sharded, _ = reval_jax.load_hf(hf_dir(num_kv_heads=4, family=family), load_tokenizer=False, mesh=mesh)
    assert sharded.q_proj[...].sharding.spec == logical_to_spec(
        ("layers", "embed", "heads", "head_dim"), sharded.q_proj[...].shape, mesh)
    assert len(sharded.gate_proj[...].addressable_shards) == 8
    tokens, mask, _ = padded_batch("left", batch=4)
    ref = np.asarray(single(jnp.asarray(tokens), mask=jnp.asarray(mask)))

    from flax import nnx

    graphdef, state = nnx.split(sharded)
    data = jax.sharding.NamedSharding(mesh, logical_to_spec(("act_batch", None), (4, 12), mesh))

    @jax.jit
    def forward(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask=mask)

    out = forward(state, jax.device_put(tokens, data), jax.device_put(mask, data))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.slow
def test_create_model_is_born_sharded():
    mesh = make_mesh((1, 2, 4))
    model = reval_jax.create_model(preset("tiny"), seed=0, mesh=mesh)
    single = reval_jax.create_model(preset("tiny"), seed=0)
    w = model.gate_proj[...]
    assert w.sharding.spec == P(None, "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (2, 16, 16)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(single.gate_proj[...]))
