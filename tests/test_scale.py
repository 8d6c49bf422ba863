"""The scale checker: exact collective bytes of small programs, and the checker end to end."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from reval_jax import hlo

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
