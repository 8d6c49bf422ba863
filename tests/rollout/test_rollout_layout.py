"""The rollout layout: the cast master in ROLLOUT_RULES shardings (chunked = whole), a decode loop
that gathers no parameter (the FSDP one does), sampling on it = the single-device model, top-k /
top-p sampled by each data replica on its own rows (no logits-sized collective, the tokens of one
device), and the config errors of config.rollout."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config
from jax.sharding import PartitionSpec as P
from models import hf_dir, tiny_model

import reval_jax
from reval_jax.errors import UserError
from reval_jax.parallel.sharding import RULES, logical_to_spec, make_mesh, state_shardings
from reval_jax.rollout.layout import (
    ROLLOUT_RULES,
    chunking,
    rollout_mesh,
    to_rollout,
)
from reval_jax.rollout.sampler import SamplingConfig, generate, pad_prompts
from reval_jax.run.config import rollout_layout
from reval_jax.tools import hlo

# tiny shapes whose matrices (and per-layer slices) no activation of the decode below shares in
# element count: V 136, D 40, F 88, N 8, K 4, H 8 (rows R = 16)
SHAPES = dict(num_heads=8, num_kv_heads=4, vocab_size=136, hidden_size=40, intermediate_size=88)
PROMPTS = [[5, 17, 99, 3], [9, 100, 4], [71, 20, 58, 6, 115], [120]] * 2


def fsdp_master(mesh_shape=(1, 8, 1), **shapes):
    """The shared tiny model's float32 parameters placed in the FSDP training layout."""
    mesh = make_mesh(mesh_shape)
    model = tiny_model(0, **shapes)
    state = nnx.state(model)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: reval_jax.Qwen2(model.cfg, rngs=nnx.Rngs(0), mesh=mesh)))
    return graphdef, jax.device_put(state, state_shardings(state, mesh)), mesh


def leaves(state):
    """name -> (array, logical axes) of every parameter."""
    return {"/".join(map(str, path)): (v.get_value(), v.get_metadata()["axes"])
            for path, v in nnx.to_flat_state(state)}


def test_rules_tables_agree_on_the_rollout_mesh():
    assert [name for name, _ in ROLLOUT_RULES] == [name for name, _ in RULES]
    for tensor in (1, 2, 4, 8):
        mesh = rollout_mesh(jax.devices(), tensor)
        assert dict(mesh.shape) == {"data": 8 // tensor, "fsdp": 1, "tensor": tensor}
        for name, _ in RULES:  # what the model's constraints (RULES) give is the rollout layout
            assert logical_to_spec((name,), None, mesh, RULES) == logical_to_spec((name,), None, mesh, ROLLOUT_RULES)
    mesh = rollout_mesh(jax.devices(), 4)
    assert logical_to_spec(("layers", "embed", "mlp"), (2, 40, 88), mesh, ROLLOUT_RULES) == P(None, None, "tensor")
    assert logical_to_spec(("act_batch", None), (16, 4), mesh, ROLLOUT_RULES) == P("data", None)


@pytest.mark.slow
def test_to_rollout_is_the_cast_master_in_the_rollout_layout():
    graphdef, master, train_mesh = fsdp_master(**SHAPES)
    mesh = rollout_mesh(train_mesh, 4)
    model = to_rollout(graphdef, master, mesh, "bfloat16")
    chunked = to_rollout(graphdef, master, mesh, "bfloat16", chunk_bytes=1)  # one layer at a time
    assert model.mesh is mesh and model.cfg.dtype == model.cfg.param_dtype == "bfloat16"
    got, small, before = leaves(nnx.state(model)), leaves(nnx.state(chunked)), leaves(master)
    assert got.keys() == before.keys() and len(got) >= 13
    for name, (x, axes) in got.items():
        m = before[name][0]
        assert m.dtype == jnp.float32 and m.sharding.mesh is train_mesh  # the master is untouched
        assert x.dtype == jnp.bfloat16 and x.shape == m.shape, name
        assert x.sharding.mesh == mesh and x.sharding.spec == logical_to_spec(axes, x.shape, mesh, ROLLOUT_RULES)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(m.astype(jnp.bfloat16)), err_msg=name)
        assert small[name][0].sharding == x.sharding
        np.testing.assert_array_equal(np.asarray(small[name][0]), np.asarray(x), err_msg=name)
    q = before["q_proj"][0]
    assert got["q_proj"][0].sharding.spec == P(None, None, "tensor", None)  # heads over tensor
    assert q.sharding.spec == P(None, "fsdp", None, None)
    # the stacked layer weights move one layer at a time; the embedding (vocab over tensor in one
    # layout, embed over fsdp in the other) has no axis left unsplit by both and moves whole
    target = got["q_proj"][0].sharding
    assert chunking(q.shape, q.sharding, target, jnp.bfloat16, 1) == (0, 1)
    layer = math.prod(q.shape[1:]) * 2
    assert chunking(q.shape, q.sharding, target, jnp.bfloat16, layer * 2) is None  # all L = 2 fit
    e = before["embed"][0]
    assert chunking(e.shape, e.sharding, got["embed"][0].sharding, jnp.bfloat16, 1) is None


@pytest.mark.slow
def test_an_adapted_policy_samples_from_its_merged_weights():
    """LoRA (issue #28): the rollout copy of an adapted policy holds W + (α/r)·A·B in the rollout dtype
    and layout for every adapted target, the base elsewhere, and no adapters (no adapter arithmetic in
    the decode loop); moved whole or one layer at a time alike; the master is untouched."""
    from reval_jax.model import lora

    train_mesh = make_mesh((1, 8, 1))
    model = reval_jax.create_model(tiny_model(0, **SHAPES).cfg, seed=0, mesh=train_mesh)  # adapters go in place
    targets = ("q_proj", "o_proj", "down_proj")
    lora.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0, targets=targets), seed=1)
    for name in targets:  # B = 0 at init: make the adapters matter
        b = getattr(model.adapters, f"{name}_b")
        b.set_value(jax.device_put(jax.random.normal(jax.random.key(2), b[...].shape), b[...].sharding))
    graphdef, master = nnx.split(model)
    mesh = rollout_mesh(train_mesh, 4)
    rollout = to_rollout(graphdef, master, mesh, "float32")
    chunked = to_rollout(graphdef, master, mesh, "float32", chunk_bytes=1)
    assert getattr(rollout, "adapters", None) is None and not lora.is_adapted(nnx.state(rollout))
    host = jax.tree.map(np.asarray, master)
    got, small = leaves(nnx.state(rollout)), leaves(nnx.state(chunked))
    for name, (x, axes) in got.items():
        want = host[name].get_value().astype(np.float64)
        if name in targets:
            a, b = (host["adapters"][f"{name}_{k}"].get_value().astype(np.float64) for k in "ab")
            delta = 2.0 * np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
            assert np.abs(delta).max() > 0.1
            want = want + delta
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-6, err_msg=name)
        assert x.sharding.spec == logical_to_spec(axes, x.shape, mesh, ROLLOUT_RULES)
        np.testing.assert_array_equal(np.asarray(small[name][0]), np.asarray(x), err_msg=name)
    np.testing.assert_array_equal(np.asarray(master["q_proj"].get_value()), host["q_proj"].get_value())


@pytest.mark.slow
def test_an_adapter_push_builds_the_merged_copy_on_the_rollout_group():
    """LoRA on two device groups: a push moves A, B and s (the base once per reference version) to the
    rollout devices and builds there, when taken, exactly the copy `to_rollout` makes where the master
    lives; a push made before a merge still builds its own policy after the merge moved the new base."""
    from reval_jax.model import lora
    from reval_jax.rollout.layout import AdapterPush, RolloutLayout, push_bytes

    devices = jax.devices()
    train_mesh = make_mesh((1, 4, 1), devices=devices[4:])
    model = reval_jax.create_model(tiny_model(0, **SHAPES).cfg, seed=0, mesh=train_mesh)
    targets = ("q_proj", "v_proj", "down_proj")
    lora.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0, targets=targets, base_dtype="bfloat16"), seed=1)

    def randomize(key):
        for name in targets:
            b = getattr(model.adapters, f"{name}_b")
            b.set_value(jax.device_put(jax.random.normal(jax.random.key(key), b[...].shape), b[...].sharding))

    layout = RolloutLayout(rollout_mesh(devices[:4], 2), "bfloat16")
    push = AdapterPush(layout, nnx.graphdef(model))
    randomize(2)
    before = nnx.state(model)
    pending = push(before, 0)
    expected = jax.tree.map(np.asarray, nnx.state(to_rollout(nnx.graphdef(model), before, layout.mesh, "bfloat16")))
    lora.merge(model)  # a reference reset, then more training
    randomize(3)
    after = nnx.state(model)
    later = push(after, 1)
    expected_after = nnx.state(to_rollout(nnx.graphdef(model), after, layout.mesh, "bfloat16"))
    for built, want in ((pending.build(), expected), (later.build(), expected_after)):
        assert getattr(built, "adapters", None) is None and built.mesh is layout.mesh
        got = nnx.state(built)
        for (path, x), (_, y) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
            x, y = x.get_value(), y.get_value()
            assert x.dtype == jnp.bfloat16 and set(x.sharding.device_set) <= set(devices[:4]), path
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    sizes = push_bytes(before, "bfloat16")
    assert sizes["adapters"] < sizes["merged"] / 4 and sizes["base"] == sizes["merged"]


def test_same_dtype_and_layout_is_not_copied():
    """A one-device float32 run sampling in float32 (configs/tiny.py) reads the master itself."""
    graphdef, master, train_mesh = fsdp_master((1, 1, 1))
    mesh = rollout_mesh(train_mesh, 1)
    assert mesh == train_mesh
    model = to_rollout(graphdef, master, mesh, "float32")
    for name, (x, _) in leaves(nnx.state(model)).items():
        assert x is leaves(master)[name][0], name


# ----------------------------------------------------------------------------- the compiled decode


def _decode_hlo(model, config: SamplingConfig, slots: int = 6) -> str:
    """The compiled HLO text of the rollout engine's decode loop for `model` (its own mesh)."""
    from reval_jax.rollout.engine import Engine, EngineConfig
    from reval_jax.rollout.programs import decode

    # 6 slots: the rows' activations (6 × kv heads × head_dim, ...) have no weight's element count
    engine = Engine(model, config, EngineConfig(slots=slots, page_size=4), prompt_bucket=8)
    pool, slots = engine.initial_state()
    return decode.lower(engine.graphdef, engine.params, pool, slots, jnp.asarray(1, jnp.int32),
                         jnp.asarray(config.max_new_tokens, jnp.int32), config=config,
                         chunk=32).compile().as_text()


def _gathered_sizes(text: str) -> list[int]:
    """Element counts of every all-gather's result in an HLO module (async ones at their start)."""
    comps, _ = hlo.parse(text)
    sizes = []
    for body in comps.values():
        for ins in body:
            if ins.opcode in ("all-gather", "all-gather-start"):
                dims = re.findall(r"\[([0-9,]*)\]", ins.shape)  # a start's tuple: (operand, result)
                sizes.append(max(math.prod(int(d) for d in ds.split(",") if d) for ds in dims))
    return sizes


def _parameter_sizes(model) -> dict[str, set[int]]:
    """Element counts of each weight matrix, whole and per layer (stacked weights)."""
    out = {}
    for name, (x, axes) in leaves(nnx.state(model)).items():
        core = x.shape[1:] if axes[0] == "layers" else x.shape
        if len(core) >= 2:
            out[name] = {x.size, math.prod(core)}
    return out


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (8, 1, 1)])
@pytest.mark.slow
def test_decode_gathers_no_parameter_on_the_rollout_layout(mesh_shape):
    config = SamplingConfig(max_new_tokens=6, num_samples=2, buckets=(8,))
    graphdef, master, train_mesh = fsdp_master(**SHAPES)
    model = to_rollout(graphdef, master, rollout_mesh(train_mesh, mesh_shape[2]), "bfloat16")
    sizes = _parameter_sizes(model)
    weights = set().union(*sizes.values())
    gathered = _gathered_sizes(_decode_hlo(model, config))
    assert not weights & set(gathered), (gathered, sizes)
    # nor a key or value: each data replica holds its slots' pages (6 slots: per-slot bookkeeping
    # gathers at most [6, 2]; this step's keys of the 6 slots would be 6 x 4 x 8)
    assert max(gathered, default=0) <= 2 * 6, gathered

    # the check can fail: on the FSDP training layout every step gathers every layer's weights
    # (8 slots: rows split over the 8 FSDP devices, as the training layout splits them)
    fsdp = _gathered_sizes(_decode_hlo(nnx.merge(graphdef, master), config, slots=8))
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        assert sizes[name] & set(fsdp), (name, fsdp)


# ----------------------------------------------------------------------------- sampling on it


@functools.cache
def _hf_policy(mesh_shape=None, family="qwen2"):
    mesh = None if mesh_shape is None else make_mesh(mesh_shape)
    return reval_jax.load_hf(hf_dir(family=family), load_tokenizer=False, mesh=mesh)[0]


SAMPLED = SamplingConfig(max_new_tokens=8, num_samples=2, top_k=20, top_p=0.9, temperature=0.8, buckets=(8,))


@pytest.mark.parametrize("config, family", [
    (SAMPLED, "qwen2"), pytest.param(SamplingConfig(max_new_tokens=8, greedy=True, buckets=(8,)), "qwen2",
                                     marks=pytest.mark.slow),
    pytest.param(SAMPLED, "qwen3", marks=pytest.mark.slow), pytest.param(SAMPLED, "llama", marks=pytest.mark.slow),
])
def test_sampling_on_the_rollout_layout_equals_the_single_device_model(config, family):
    """A float32 rollout layout (tp 2 × dp 4 from an FSDP master) samples what one device samples:
    the same tokens, log-probs within float32 rounding of a differently compiled program."""
    master = _hf_policy((1, 8, 1), family)  # the random HF model: weights of std 0.2, logits far apart
    graphdef, params = nnx.split(master)
    model = to_rollout(graphdef, params, rollout_mesh(master.mesh, 2, master.cfg), "float32")
    assert dict(model.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    single = jax.tree.map(np.asarray, generate(_hf_policy(None, family), PROMPTS, config, seed=3))
    ours = generate(model, PROMPTS, config, seed=3)
    ours = jax.tree.map(np.asarray, ours)
    np.testing.assert_array_equal(ours.response_tokens, single.response_tokens)
    np.testing.assert_array_equal(ours.response_length, single.response_length)
    np.testing.assert_allclose(ours.logp, single.logp, atol=1e-5)
    assert len(set(single.response_tokens.ravel().tolist())) >= 8  # not one token repeated

    tokens, mask = pad_prompts(PROMPTS, 8)  # and the logits of a forward pass
    forward = lambda m: np.asarray(jax.jit(lambda s, t, k: nnx.merge(nnx.graphdef(m), s)(t, mask=k))(
        nnx.state(m), tokens, mask))
    np.testing.assert_allclose(forward(model), forward(_hf_policy(None, family)), atol=1e-5)


@pytest.mark.slow
def test_engine_replicas_keep_their_own_pages_and_sample_what_one_device_samples(monkeypatch):
    """Four data replicas (tp 2 × dp 4), each with 2 slots and 5 pages of 4 tokens: requests go
    whole into a replica, slots are refilled and rows preempted within it, and the tokens are the
    single device's (one slot per sample, a cache for every row)."""
    from reval_jax.rollout import engine as engine_mod
    from reval_jax.rollout.engine import EngineConfig

    engines = []
    init = engine_mod.Engine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    master = _hf_policy((1, 8, 1))
    graphdef, params = nnx.split(master)
    model = to_rollout(graphdef, params, rollout_mesh(master.mesh, 2, master.cfg), "float32")
    small = EngineConfig(slots=8, page_size=4, cache_tokens=80, prefill_chunk=8, prefill_rows=4)
    ours = jax.tree.map(np.asarray, generate(model, PROMPTS, SAMPLED, seed=3, engine=small))
    e = engines[-1]
    assert (e.geometry.replicas, e.geometry.pages) == (4, 6)  # 80 tokens = 20 pages: 5 per replica and its trash page
    pool, _ = e.initial_state()
    assert pool.k.sharding.spec[1:3] == ("data", "tensor")  # pages by replica, kv heads by tensor shard
    assert e.stats["preempted"] > 0 and e.stats["decode_calls"] > 2
    single = jax.tree.map(np.asarray, generate(_hf_policy(None), PROMPTS, SAMPLED, seed=3))
    np.testing.assert_array_equal(ours.response_tokens, single.response_tokens)
    np.testing.assert_array_equal(ours.response_length, single.response_length)
    np.testing.assert_allclose(ours.logp, single.logp, atol=1e-5)


# ----------------------------------------------------------------------------- config errors


def _rollout_config(**fields):
    from configs import base

    c = base.get_config()
    for k, v in fields.items():
        setattr(c.rollout, k, v)
    return c


@pytest.mark.parametrize("fields,message", [
    ({"tensor": 3}, "config.rollout.tensor: 3 does not divide the 8 devices of the mesh; use one of [1, 2, 4, 8]"),
    ({"tensor": 4}, "config.rollout.tensor: 4 does not divide the model's 2 key/value heads; use one of [1, 2]"),
    ({"tensor": 0}, "config.rollout.tensor: 0 must be >= 1"),
    ({"dtype": "float16"}, "config.rollout.dtype: 'float16' is not one of ('float32', 'bfloat16')"),
    ({"chunk_mb": 0}, "config.rollout.chunk_mb: 0 must be >= 1"),
])
def test_config_errors_are_one_line_naming_the_field(fields, message):
    model = tiny_model(0)  # 4 heads, 2 kv heads
    with pytest.raises(UserError) as e:
        rollout_layout(_rollout_config(**fields), make_mesh((1, 8, 1)), model.cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_dtype_defaults_to_the_compute_dtype():
    layout = rollout_layout(_rollout_config(), make_mesh((1, 8, 1)), tiny_model(0).cfg)
    assert layout.dtype == "bfloat16" and dict(layout.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert layout.chunk_bytes == 256 * 2**20


def test_a_run_refuses_a_bad_tensor_size_before_writing(data_file, tmp_path):
    from reval_jax.run import train

    workdir = tmp_path / "run"
    with pytest.raises(UserError, match="config.rollout.tensor: 3 does not divide the 1 devices"):
        train.run(tiny_config(data_file, **{"rollout.tensor": 3}), str(workdir))
    assert not workdir.exists()


# ----------------------------------------------------------------------------- top-k / top-p per replica

TOP_P = SamplingConfig(max_new_tokens=8, num_samples=2, top_p=0.9, temperature=0.8, buckets=(8,))


def _whole_array_rule(monkeypatch):
    """The decode step with the sampling rule as it was before each replica sampled its own rows:
    `sample_logits` on all slots' logits (XLA gathers them onto every device)."""
    from reval_jax.rollout import programs
    from reval_jax.rollout.sampling import sample_logits

    monkeypatch.setattr(programs, "sample_logits_on_mesh", lambda x, k, c, **_: sample_logits(x, k, c))
    programs.decode.clear_cache()  # traced with the rule above from now on


@pytest.mark.parametrize("tensor", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("config", [SAMPLED, pytest.param(TOP_P, marks=pytest.mark.slow)], ids=["top_k_top_p", "top_p"])
@pytest.mark.slow
def test_top_k_top_p_on_data_replicas_sample_the_tokens_of_one_device(tensor, config, monkeypatch):
    """top_p = 0.9 (with and without top_k = 20) on the 8 fake devices, 16 slots in 8 / tensor data
    replicas: the tokens of the single-device model exactly, the log-probs within float32 rounding of
    its differently compiled forward; and on the same layout, the tokens of the whole-array rule
    (every device sampling every row) exactly, its log-probs within float32 rounding too (another
    decode program: whether XLA rounds its forward alike depends on the compile flags)."""
    from reval_jax.rollout import programs
    from reval_jax.rollout.pages import engine_replicas

    master = _hf_policy((1, 8, 1))
    graphdef, params = nnx.split(master)
    model = to_rollout(graphdef, params, rollout_mesh(master.mesh, tensor, master.cfg), "float32")
    assert engine_replicas(model.mesh, len(PROMPTS) * 2, 2) == 8 // tensor  # generate's default: a slot per sample
    ours = jax.tree.map(np.asarray, generate(model, PROMPTS, config, seed=3))
    single = jax.tree.map(np.asarray, generate(_hf_policy(None), PROMPTS, config, seed=3))
    np.testing.assert_array_equal(ours.response_tokens, single.response_tokens)
    np.testing.assert_array_equal(ours.response_length, single.response_length)
    np.testing.assert_allclose(ours.logp, single.logp, atol=1e-5)
    assert len(set(single.response_tokens.ravel().tolist())) >= 8  # not one token repeated

    _whole_array_rule(monkeypatch)
    try:
        before = jax.tree.map(np.asarray, generate(model, PROMPTS, config, seed=3))
    finally:
        programs.decode.clear_cache()
    np.testing.assert_array_equal(ours.response_tokens, before.response_tokens)
    np.testing.assert_array_equal(ours.response_length, before.response_length)
    np.testing.assert_allclose(ours.logp, before.logp, atol=1e-5)


def _largest_collective(text: str) -> tuple[int, str]:
    """(bytes, op) of the largest collective of a compiled program, per device and execution."""
    return max(((c.bytes, f"{c.kind} {c.op_name}") for c in hlo.collectives(text).collectives), default=(0, ""))


@pytest.mark.parametrize("tensor", [1, *(pytest.param(t, marks=pytest.mark.slow) for t in (2, 4))])
@pytest.mark.parametrize("config", [SAMPLED, TOP_P], ids=["top_k_top_p", "top_p"])
@pytest.mark.slow
def test_decode_with_top_p_moves_no_logits_sized_collective(tensor, config, monkeypatch):
    """The engine's decode step with top-p on, on 8 fake devices at tp 1, 2 and 4: no collective as
    large as one replica's logits (slots × V × 4 bytes / replicas). The check fails on the
    whole-array rule, which gathers all slots' logits (replicas times that) onto every device."""
    from reval_jax.rollout import programs
    from reval_jax.rollout.pages import engine_replicas

    graphdef, master, train_mesh = fsdp_master(**SHAPES)
    model = to_rollout(graphdef, master, rollout_mesh(train_mesh, tensor), "bfloat16")
    slots, V = 16, SHAPES["vocab_size"]
    replicas = 8 // tensor  # 16 slots split over every data replica (at least num_samples each)
    assert engine_replicas(model.mesh, slots, config.num_samples) == replicas
    logits_bytes = slots * V * 4 // replicas
    size, op = _largest_collective(_decode_hlo(model, config, slots=slots))
    assert size < logits_bytes, (size, op, logits_bytes)

    _whole_array_rule(monkeypatch)
    try:
        size, op = _largest_collective(_decode_hlo(model, config, slots=slots))
    finally:
        programs.decode.clear_cache()
    assert size >= slots * V * 4, (size, op)  # all slots' logits on every device
