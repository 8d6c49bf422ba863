"""The scale checker: exact collective bytes of small programs, and the checker end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from reval_jax.tools import hlo

ROWS = 16  # per-device rows of the test arrays: f32[16] = 64 bytes per device


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("x",))


def _compiled(fn, shape=(8 * ROWS,)):
    mesh = _mesh()
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x")))
    return f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()


def test_psum_in_a_loop_of_five_counts_five_times():
    def f(x):
        return jax.lax.fori_loop(0, 5, lambda i, c: c + jax.lax.psum(c * i, "x"), x)

    report = hlo.collectives(_compiled(f))
    assert report.bytes["all-reduce"] == 5 * ROWS * 4
    assert sum(report.bytes.values()) == 5 * ROWS * 4


def test_nested_loops_multiply():
    def f(x):
        inner = lambda j, c: c + jax.lax.psum(c * j, "x")
        return jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.fori_loop(0, 4, inner, c * i), x)

    assert hlo.collectives(_compiled(f)).bytes["all-reduce"] == 3 * 4 * ROWS * 4


def test_scan_all_gather_counts_result_bytes():
    def f(x):
        def body(c, _):
            g = jax.lax.all_gather(c, "x", tiled=True)  # [8·ROWS] per device
            return c + g[:ROWS], None

        return jax.lax.scan(body, x, None, length=6)[0]

    assert hlo.collectives(_compiled(f)).bytes["all-gather"] == 6 * 8 * ROWS * 4


def test_reduce_scatter_counts_operand_bytes():
    def f(x):
        y = jnp.tile(x, 8)  # [8·ROWS] per device
        return jax.lax.psum_scatter(y, "x", tiled=True)  # [ROWS]

    assert hlo.collectives(_compiled(f)).bytes["reduce-scatter"] == 8 * ROWS * 4


def test_no_collectives_is_zero():
    report = hlo.collectives(_compiled(lambda x: jax.lax.fori_loop(0, 7, lambda i, c: c * 2.0, x)))
    assert report.total_bytes == 0 and report.collectives == ()
    assert [loop.trip_count for loop in report.loops] == [7]


def test_data_dependent_loop_uses_the_condition_bound():
    def f(x):
        def body(s):
            i, c = s
            return i + 1, c + jax.lax.psum(c, "x")

        return jax.lax.while_loop(lambda s: (s[0] < 9) & (jnp.max(s[1]) < 1e30), body, (0, x))[1]

    text = _compiled(f)
    assert hlo.collectives(text).bytes["all-reduce"] >= 9 * ROWS * 4  # + the max's all-reduce
    per_step = hlo.collectives(text, infer=False)
    assert [loop.source for loop in per_step.loops] == ["unknown"]
    assert per_step.bytes["all-reduce"] * 9 == hlo.collectives(text).bytes["all-reduce"]


def test_async_start_counted_once():
    text = """HloModule m
ENTRY %main (p: f32[16]) -> f32[128] {
  %p = f32[16]{0} parameter(0)
  %ags = (f32[16]{0}, f32[128]{0}) all-gather-start(%p), dimensions={0}
  ROOT %agd = f32[128]{0} all-gather-done(%ags)
}
"""
    report = hlo.collectives(text)
    assert report.bytes["all-gather"] == 128 * 4 and len(report.collectives) == 1


# ----------------------------------------------------------------------------- the checker end to end


def _tiny_config():
    from configs import base

    c = base.get_config()
    c.model.path = ""
    c.model.preset = "tiny"
    c.data.max_prompt_len = 16
    c.data.prompts_per_iteration = 8
    c.sampling.num_samples = 2
    c.sampling.max_new_tokens = 16
    c.sampling.buckets = (16,)
    c.replay.updates_per_iteration = 2
    c.micro_batches = 2
    return c


def test_checker_reports_every_program_on_a_tiny_config():
    from reval_jax.tools import scale

    config = _tiny_config()
    report = scale.check(config, jax.devices()[:8])
    setup, programs = report["setup"], {r["program"]: r for r in report["programs"]}
    assert setup["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (setup["update_batch"], setup["seq_len"]) == (16, 32)
    assert sorted(programs) == sorted(["update micro-step", "update apply", "reference", "prefill", "decode"])
    for r in programs.values():
        assert "error" not in r, r
        m = r["memory"]
        assert m["argument"] > 0 and m["temp"] > 0
        assert m["peak"] == m["argument"] + m["output"] + m["temp"] - m["alias"] > 0  # CPU
        assert r["collective_bytes_per_round"] == r["collective_bytes"] * r["runs"]
        assert r["xla_flops"] > 0
        assert r["model_flops"] > 0 or r["program"] == "update apply"  # AdamW: no model FLOPs

    update = programs["update micro-step"]
    assert update["collectives"]["all-gather"] > 0  # fsdp: every layer's weights are gathered
    assert update["runs"] == 2 * 2  # 2 micro-batches x K = 2 updates per round
    # the layer scan (L = 2) is a known loop, multiplied in
    assert [2, "known_trip_count"] in update["loops"]
    assert update["memory"]["alias"] > 0  # the gradient accumulator is donated
    apply = programs["update apply"]
    assert apply["runs"] == 2 and apply["memory"]["alias"] > 0  # the state is donated

    decode = programs["decode"]
    assert decode["loop_bound"] == 16 and [16, "condition"] in decode["loops"]
    # the sampler's programs run on the rollout layout (rollout.tensor 1: a whole model per device)
    assert setup["rollout_mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # no weight is gathered: the only all-gathers are of this step's keys/values of every slot (the
    # page pool and the slot state are whole on every data-parallel device: 2 × L × slots × K × H f32
    # values) and of a few dozen per-slot scalars (token, log-prob, position, page)
    from reval_jax.model.config import preset

    cfg = preset("tiny")
    rows = 8 * 2
    kv_step = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * 4
    assert 0 < decode["collectives_per_step"]["all-gather"] <= kv_step + 32 * rows * 4
    step, total = decode["collective_bytes_per_step"], decode["collective_bytes"]
    assert step > 0 and total == decode["collective_bytes_outside_loop"] + 16 * step
    assert decode["model_flops"] == 16 * decode["model_flops_per_step"]
    assert "decode x 16" in scale.format_report(report)


def test_report_header_says_what_runs_where():
    """A 1x1x1 mesh on 8 fake devices says so; parameters in k/M/B; the header's micro-batches are
    the ones the programs run; a program set without collectives says there are none."""
    from reval_jax.tools import scale

    config = _tiny_config()
    config.mesh = (1, 1, 1)
    config.micro_batches = 0
    config.tokens_per_device = 2 * 32  # two 32-token rows per micro-batch: 16 trajectories in 8 micro-batches
    report = scale.check(config, jax.devices()[:8], programs=("update",))
    text = scale.format_report(report)
    header = text.splitlines()[0]
    assert "on 1 of 8 cpu " in header and " params" in header and "0.00B" not in header
    micro = report["setup"]["micro_batches"]
    assert micro == 8 and f"in {micro} micro-batch(es)" in header
    assert f"{micro} micro-batch(es) x 2 updates" in text  # the FLOPs section's note says the same
    assert "(none: no program moves data between devices)" in text


def test_model_shapes_need_a_preset_or_a_model_directory():
    from reval_jax.tools import scale_programs

    config = _tiny_config()
    config.model.preset = ""
    with pytest.raises(ValueError, match="model.preset"):
        scale_programs.model_config(config)
    config.model.preset = "qwen2.5-math-7b"
    assert scale_programs.model_config(config).num_layers == 28


def test_trip_count_from_the_condition_and_the_initial_value():
    """No known_trip_count (as on TPU): i from 2 while i < 7 runs 5 times."""
    text = """HloModule m
%cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[16]{0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %ar = f32[16]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%sum
  ROOT %t = (s32[], f32[16]{0}) tuple(%next, %ar)
}
ENTRY %main (x: f32[16]) -> (s32[], f32[16]) {
  %x = f32[16]{0} parameter(0)
  %start = s32[] constant(2)
  %s = s32[] copy(%start)
  %init = (s32[], f32[16]{0}) tuple(%s, %x)
  ROOT %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
}
"""
    report = hlo.collectives(text)
    assert [(loop.trip_count, loop.source) for loop in report.loops] == [(5, "condition")]
    assert report.bytes["all-reduce"] == 5 * 16 * 4
    assert hlo.collectives(text, infer=False).bytes["all-reduce"] == 16 * 4
