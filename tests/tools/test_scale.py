"""The scale checker: exact collective bytes of small programs, and the checker end to end."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from reval_jax.tools import hlo

ROOT = Path(__file__).resolve().parents[2]  # the repository: the command-line tests run there
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def test_the_tir_recipe_is_qwen7b_as_python_tool_episodes():
    """configs/qwen7b_tool.py (docs/scale.md, "Multi-turn TIR recipe") loads and its typed settings build
    (no weights, nothing compiled): qwen7b.py's run on the same math data, as episodes of the python
    environment under the TIR template, whose token budget is the rows' response budget; prompt bucket and
    response budget fill the model's context. Only the fields the recipe means to change differ."""
    from configs import qwen7b, qwen7b_tool
    from reval_jax.run import config as run_config
    from reval_jax.tools import scale_programs

    config, single = qwen7b_tool.get_config(), qwen7b.get_config()
    changed = {k for k, v in _flat(config).items() if _flat(single).get(k, object()) != v}
    assert changed == {"model.path", "data.template", "env.name", "env.max_turns", "env.max_output_chars",
                       "env.sandbox_site_packages", "env.sandbox_workers", "rollout.cache_tokens"}
    assert run_config.apply_algorithm_defaults(config) == []  # reval: nothing implied beyond the config
    s = run_config.run_settings(config, devices=8)
    assert s.env.multi_turn and s.env.name == "python"
    env = s.env.config
    assert (env.max_turns, env.max_output_chars, env.sandbox.workers, env.sandbox.site_packages) == (4, 400, 32, True)
    assert env.max_tokens == config.sampling.max_new_tokens == 3072  # the episode's budget is the row's
    assert s.data.template == s.reward.template == "qwen_math_tir"
    assert s.data.train_files == run_config.data_settings(single).train_files
    assert s.engine.cache_tokens == 2 * single.rollout.cache_tokens and s.engine.slots == 256
    setup = scale_programs.make_setup(config, jax.devices()[:8])
    assert setup.bucket + setup.max_new_tokens == setup.seq_len == setup.cfg.max_position_embeddings == 4096


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


# ----------------------------------------------------------------------------- what a device holds


def _real_state(config, devices):
    """The train state as reval_jax.run.train.build_model puts it on the mesh: real arrays, real shardings."""
    from flax import nnx

    from reval_jax.model.decoder import Decoder
    from reval_jax.model.lora import add_adapters
    from reval_jax.objective.train_step import init_state, make_optimizer, state_sharding
    from reval_jax.parallel.sharding import make_mesh
    from reval_jax.run.config import lora_settings, model_settings, optimizer_config
    from reval_jax.tools.scale_programs import model_config

    mesh = make_mesh(tuple(config.mesh), devices=devices)
    model = Decoder(model_config(config), rngs=nnx.Rngs(0), mesh=mesh)
    if (adapters := lora_settings(config)) is not None:
        add_adapters(model, adapters)
    _, params = nnx.split(model)
    optimizer = make_optimizer(optimizer_config(config))
    state = init_state(params, optimizer, ref_dtype=model_settings(config).ref_dtype)
    return jax.device_put(state, state_sharding(state, optimizer, mesh))


def _on_device(tree, device) -> int:
    """Bytes of `tree`'s shards that live on `device`, from the arrays themselves."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


@pytest.mark.parametrize("ref_dtype", ["", "bfloat16"])
@pytest.mark.slow
def test_resident_state_is_the_train_states_bytes_per_device(ref_dtype):
    """The resident figure beside the rollout's decode is the whole train state, and beside the update's
    micro-step the train state plus the reference's compute-dtype copy (none when the reference is
    stored in bfloat16 already): both equal to the bytes of the real state's shards on each device."""
    from reval_jax.objective.train_step import compute_dtype
    from reval_jax.tools import scale_memory, scale_programs

    config = _tiny_config()
    config.model.ref_dtype = ref_dtype
    devices = jax.devices()[:8]
    s = scale_programs.make_setup(config, devices)
    state = _real_state(config, devices)
    per_device = [_on_device(state, d) for d in devices]
    assert min(per_device) > 0
    decode = scale_memory.worst_residency(scale_programs.build_decode(s).resident)
    assert decode["bytes"] == max(per_device)
    assert decode["parts"]["optimizer state"] == _on_device(state.opt_state, devices[decode["device"]])

    dtype = compute_dtype(s.graphdef, state.params)
    ref_copy = 0 if ref_dtype else max(_on_device(jax.tree.map(lambda x: x.astype(dtype), state.ref_params), d)
                                       for d in devices)
    micro, apply = scale_programs.build_update(s)
    assert (ref_copy > 0) == (not ref_dtype)
    assert scale_memory.worst_residency(micro.resident)["bytes"] == max(per_device) + ref_copy
    assert scale_memory.worst_residency(apply.resident)["bytes"] == 0  # the state and gradients are its arguments


@pytest.mark.slow
def test_a_lora_config_compiles_adapter_gradients_and_keeps_no_reference_copy():
    """config.lora: the update's resident state is the real LoRA state's bytes (a bfloat16 base, A and
    B, their Adam moments; no reference copy), the gradient accumulator is the adapters' size, and
    the reference's side of δ is the policy's own compute copy (the same arrays, only s differs)."""
    from reval_jax.model.lora import split_base, split_trainable
    from reval_jax.tools import scale, scale_memory, scale_programs

    config = _tiny_config()
    config.lora.rank, config.lora.base_dtype = 4, "bfloat16"
    devices = jax.devices()[:8]
    s = scale_programs.make_setup(config, devices)
    state = _real_state(config, devices)
    assert len(state.ref_params) == 0
    base = split_base(state.params)[0]  # bfloat16 compute: the base is the micro-step's argument itself
    per_device = [_on_device(state, d) - _on_device(base, d) for d in devices]
    micro, apply = scale_programs.build_update(s)
    worst = scale_memory.worst_residency(micro.resident)
    assert worst["bytes"] == max(per_device)  # A, B, their moments, counters: no reference, no base copy
    grads = micro.args[0]
    assert [g.shape for g in jax.tree.leaves(grads)] == [a.shape for a in jax.tree.leaves(
        split_trainable(state.params)[0])]
    reference = scale_programs.build_reference(s)
    for r in reference.resident:
        assert scale_memory.resident_bytes(r)["parts"]["reference in compute dtype"] == 0
    report = scale.check(config, devices, programs=("update",))
    assert all(p["memory"]["peak"] > 0 for p in report["programs"])


def test_the_verdict_flips_at_the_device_memory():
    from reval_jax.tools import scale, scale_memory

    report = scale.check(_tiny_config(), jax.devices()[:8], programs=("reference",))
    r = report["programs"][0]
    assert r["holds"] == r["memory"]["peak"] + r["resident"]["bytes"] and r["resident"]["bytes"] > 0
    assert r["fits"] and report["setup"]["held_against"]["device"] == "NVIDIA H100 80GB"  # the CPU default
    program = scale.BUILDERS["reference"](scale.make_setup(_tiny_config(), jax.devices()[:8]))
    for memory, fits in ((r["holds"] - 1, False), (r["holds"], True), (r["holds"] + 1, True)):
        budget = scale_memory.device_budget("cpu", device_memory=str(memory))
        out = scale.holds(program, r["memory"]["peak"], budget)
        assert (out["fits"], out["headroom"], out["holds"]) == (fits, memory - r["holds"], r["holds"])
    report["programs"][0].update(scale.holds(program, r["memory"]["peak"], scale_memory.DeviceSpec("x", 1, "y")))
    assert "does not fit" in scale.format_report(report)


def test_device_memory_and_device_names():
    from reval_jax.errors import UserError
    from reval_jax.tools.scale_memory import DEVICES, device_budget, parse_bytes

    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("95.74 GB") == 95_740_000_000 and parse_bytes("8e10") == 8 * 10**10
    assert parse_bytes("123") == 123
    for bad in ("lots", "80 GX", "-5GB", "0", ""):
        with pytest.raises(UserError, match="--device_memory"):
            parse_bytes(bad)
    assert device_budget("cpu").memory == DEVICES["h100"].memory == 80 * 10**9
    assert device_budget("v5p").memory == 95_740_000_000 and device_budget("v5e").memory == 15_750_000_000
    assert device_budget("cpu", "V5E").name == "TPU v5e"
    assert device_budget("v5p", "h100", "1GB").memory == 10**9
    with pytest.raises(UserError, match="--device='h1000': expected one of h100"):
        device_budget("cpu", "h1000")


def test_cpu_float32_copies_of_bfloat16_are_measured_from_the_buffer_assignment(tmp_path):
    """A bfloat16 matmul on CPU keeps a float32 copy of its operand; in float32 there is none."""
    from reval_jax.tools import buffers

    found = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        w = jax.ShapeDtypeStruct((512, 512), dtype)
        directory = tmp_path / jnp.dtype(dtype).name
        compiled = buffers.compile_dumping(jax.jit(lambda w, x: jnp.tanh(w @ x) @ w).lower(w, w), str(directory))
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
        found[dtype] = buffers.upcasts_at_peak(str(directory), temp)
        assert found[dtype]["live"] <= found[dtype]["temp"] == temp
    assert found[jnp.float32]["upcast"] == 0
    assert found[jnp.bfloat16]["upcast"] > 0 and found[jnp.bfloat16]["upcast"] % (512 * 512 * 4) == 0
    assert buffers.upcasts_at_peak(str(tmp_path / "nothing"), 0) is None


@pytest.mark.e2e
@pytest.mark.parametrize("flag, message", [
    ("--device=h1000", "error: --device='h1000': expected one of h100, h200, v5p, v5e, v6e"),
    ("--device_memory=lots", "error: --device_memory='lots': expected bytes or a size such as 80GB"),
])
def test_bad_device_flags_are_one_line_exit_2(flag, message):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "reval_jax.scale", "--config=configs/qwen7b.py", flag],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


@pytest.mark.e2e
def test_command_line_device_memory_below_the_figure_does_not_fit(tmp_path):
    """`--device_memory` one byte under a program's share flips the command's verdict."""
    import inspect
    import json
    import subprocess
    import sys

    from reval_jax.tools import scale

    r = scale.check(_tiny_config(), jax.devices()[:8], programs=("reference",))["programs"][0]
    config = tmp_path / "tiny.py"  # _tiny_config as a config file
    body = inspect.getsource(_tiny_config).replace("def _tiny_config():", "def get_config():")
    config.write_text(body)
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "reval_jax.scale", f"--config={config}", "--programs=reference",
                          f"--device_memory={r['holds'] - 1}", f"--json={report}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(report.read_text())["programs"][0]
    assert (got["holds"], got["fits"], got["headroom"]) == (r["holds"], False, -1)
    assert "does not fit, 1 B over" in out.stdout
