"""Scale checker: compiles the real programs of a run config on abstract arrays (no accelerator, no
weights) and reports, per program, per-device memory, collective bytes and FLOPs.

    python -m reval_jax.scale --config=configs/qwen7b.py [--platform=cpu|v5p|v5e|v6e] [--devices=8]
        [--mean_tokens=682] [--config.tokens_per_device=16384 ...] [--programs=update,reference] [--json=PATH]
        [--device=h100|h200|v5p|v5e|v6e] [--device_memory=80GB]

Programs (one builder each, see `BUILDERS`): `update` (train_step.Updater's micro-step on one packed
micro-batch, run once per micro-batch, and its apply step, once per update), `reference` (the
Updater's reference pass on one packed micro-batch), `prefill` and `decode` (the rollout engine's
programs, built by reval_jax.rollout.programs' `prefill_call` / `decode_call` on the cache geometry
`Engine` lays out, for one sampler call's prompts, in the rollout layout: weights in
config.rollout.dtype on the (devices / rollout.tensor, 1, rollout.tensor) mesh of
reval_jax.rollout.layout). Each builder returns a `Program`: the
jitted function, its abstract arguments, how often it runs per generation round, and its model
FLOPs. How many packed micro-batches a round needs depends on the trajectories' lengths:
`--mean_tokens` gives the average (prompt + response); by default every trajectory is assumed to
be full length (the worst case).

Figures, all per device:
  memory   `compiled.memory_analysis()`: argument, output, alias (output bytes that reuse donated
           argument buffers), temp; peak = `peak_memory_in_bytes` on TPU, argument + output + temp
           − alias on CPU (whose `peak_memory_in_bytes`, kept as xla_peak, is below its own temp).
  collect. bytes of each collective kind for one execution, read from the compiled HLO with loop
           trip counts multiplied in (reval_jax.tools.hlo: max(operand, result) bytes per collective).
           decode: "per step" is one trip of its data-dependent while loop's body; the program's
           total is what sits outside the loop plus A = max_new_tokens trips, the bound of the loop
           condition (it runs at most A − 1 steps, as prefill samples a_1; fewer when all rows stop).
           Its collectives depend on config.sampling: `--config.sampling.top_p=0.9` compiles top-p in.
  holds    peak + the resident state the run keeps on the device while the program runs and does
           not pass it (reval_jax.tools.scale_memory: e.g. the master weights, Adam's moments and the
           reference beside the micro-step, the whole train state beside the rollout's decode), with a
           fits / does-not-fit verdict against a named device (--device; default h100 for cpu, the
           chip itself for a TPU platform) or --device_memory. On CPU, the float32 copies of bfloat16
           arrays live at the temp's peak (a CPU-backend artefact: reval_jax.tools.buffers) are shown.
  flops    model FLOPs (analytic, `model_flops`) and `cost_analysis()["flops"]` for comparison (XLA
           counts a while-loop body once there, so it undercounts scanned layers and loops).

Platforms. cpu: `--xla_force_host_platform_device_count=N` fake devices (set here before jax is
imported). v5p / v5e / v6e: a deviceless compile for that TPU topology through
`jax.experimental.topologies`, which needs the libtpu wheel, kept out of requirements.txt:

    python -m venv /work/.venv-tpu
    /work/.venv-tpu/bin/pip install -r requirements.txt "libtpu==0.0.42.*"
    /work/.venv-tpu/bin/python -m reval_jax.scale --config=configs/qwen7b.py --platform=v5p

A TPU program that does not fit in HBM makes the compiler raise; it is reported as
"does not fit: <first line>" and the other programs still run.

Model shapes come from `model.path`/config.json when that directory exists, else from the preset
`model.preset` (reval_jax.model.config.PRESETS).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from reval_jax.errors import UserError
from reval_jax.tools.scale_memory import (
    DEFAULT_DEVICE,
    DEVICES,
    DeviceSpec,
    device_budget,
    verdict,
    worst_residency,
)
from reval_jax.tools.scale_programs import BUILDERS, PROGRAMS, Program, make_setup, micro_batches_for

# TPU topology per (platform, chips); --topology overrides it.
TOPOLOGIES = {
    "v5p": {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
}


# ----------------------------------------------------------------------------- setup


def devices_for(platform: str, count: int, topology: str = ""):
    """`count` devices of `platform`: fake CPU devices, or the abstract chips of a TPU topology."""
    import jax

    if platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise RuntimeError(
                f"{len(devices)} CPU devices visible, {count} asked for: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax is imported "
                "(python -m reval_jax.scale does)"
            )
        return devices[:count]
    if platform not in TOPOLOGIES:
        raise ValueError(f"--platform={platform!r}: expected cpu or one of {sorted(TOPOLOGIES)}")
    from jax.experimental import topologies

    name = topology or f"{platform}:{TOPOLOGIES[platform].get(count, '')}"
    if name.endswith(":"):
        raise ValueError(f"no {platform} topology known for {count} chips; pass --topology")
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # no libtpu, or a name it refuses
        raise RuntimeError(
            f"deviceless TPU compile for {name} failed ({str(e).splitlines()[0]}); it needs the libtpu "
            'wheel: pip install "libtpu==0.0.42.*" (see this module\'s docstring)'
        ) from e
    if len(devices) != count:
        raise ValueError(f"topology {name} has {len(devices)} chips, not --devices={count}")
    return list(devices)





# ----------------------------------------------------------------------------- measuring


def _fits_error(message: str) -> bool:
    return any(w in message for w in ("RESOURCE_EXHAUSTED", "out of memory", "Ran out of memory",
                                      "exceeds the memory", "HBM"))


def _compile(p: Program, platform: str):
    """(compiled, CPU float32-copy figures or None): on CPU the compile also dumps XLA's buffer
    assignment into a temporary directory, read by reval_jax.tools.buffers and removed."""
    from reval_jax.tools import buffers

    lowered = p.fn.lower(*p.args, **p.kwargs)
    if platform != "cpu":
        return lowered.compile(), None
    with tempfile.TemporaryDirectory(prefix="reval_scale_") as directory:
        compiled = buffers.compile_dumping(lowered, directory)
        try:
            upcast = buffers.upcasts_at_peak(directory, int(compiled.memory_analysis().temp_size_in_bytes))
        except (OSError, ValueError, KeyError) as e:  # a dump format this reader does not know
            print(f"  {p.name}: float32 copies not measured ({type(e).__name__}: {e})", file=sys.stderr)
            upcast = None
    return compiled, upcast


def _memory(compiled, platform: str) -> dict:
    m = compiled.memory_analysis()
    memory = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    memory["xla_peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    # CPU's peak_memory_in_bytes comes out below its own temp size: not a peak; use the sum there
    memory["peak"] = memory["xla_peak"] if platform == "tpu" and memory["xla_peak"] else (
        memory["argument"] + memory["output"] + memory["temp"] - memory["alias"])
    return memory


def holds(p: Program, peak: int, budget: DeviceSpec) -> dict:
    """The device's share while `p` runs: its peak plus the resident state it does not take as an
    argument (the call of it that leaves the most), and the verdict against `budget`."""
    resident = worst_residency(p.resident)
    total = peak + resident["bytes"]
    return {"resident": resident, "holds": total, **verdict(total, budget)}


def measure(p: Program, platform: str, dump_hlo: str = "", budget: DeviceSpec | None = None) -> dict:
    """Compiles `p` and returns its figures (per device; see the module docstring); with `dump_hlo`,
    writes the compiled HLO text to <dump_hlo>/<program>.hlo.txt. `budget`: the device memory the
    program's share is held against (default: the platform's, scale_memory.device_budget)."""
    start = time.perf_counter()
    out = {"program": p.name, "note": p.note, "runs": p.runs, "loop_bound": p.loop_bound,
           "model_flops": p.model_flops}
    try:
        compiled, upcast = _compile(p, platform)
    except Exception as e:  # a TPU program that does not fit raises here
        text = str(e).strip()
        first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
        out["error"] = ("does not fit: " if _fits_error(text) else "compile failed: ") + first
        out["compile_s"] = time.perf_counter() - start
        return out
    out["compile_s"] = time.perf_counter() - start
    memory = _memory(compiled, platform)
    out.update(memory=memory, **holds(p, memory["peak"], budget or device_budget(platform)))
    if upcast is not None:
        out["cpu_f32_copies"] = upcast
    text = compiled.as_text()
    if dump_hlo:
        Path(dump_hlo).mkdir(parents=True, exist_ok=True)
        (Path(dump_hlo) / f"{p.name}.hlo.txt").write_text(text)
    out.update(_collectives(p, text))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float((cost or {}).get("flops", 0.0))
    return out


def _collectives(p: Program, text: str) -> dict:
    """The collective figures of `measure` from the compiled HLO text."""
    from reval_jax.tools import hlo

    report = hlo.collectives(text)
    out = dict(collectives=report.bytes, collective_bytes=report.total_bytes,
               loops=[[loop.trip_count, loop.source] for loop in report.loops],
               largest=[[c.kind, c.bytes, c.count, c.op_name] for c in report.largest(3)])
    if p.loop_bound:  # the data-dependent loop counted once (+ outside) vs bound times (+ outside)
        once = hlo.collectives(text, infer=False).bytes
        step = {k: (report.bytes[k] - once[k]) // max(p.loop_bound - 1, 1) for k in once}
        out.update(collectives_per_step=step, collective_bytes_per_step=sum(step.values()),
                   collective_bytes_outside_loop=sum(once.values()) - sum(step.values()),
                   model_flops_per_step=p.model_flops, model_flops=p.model_flops * p.loop_bound)
    out["collective_bytes_per_round"] = out["collective_bytes"] * p.runs
    return out


def check(config, devices, programs=PROGRAMS, dump_hlo: str = "", mean_tokens: int = 0,
          budget: DeviceSpec | None = None) -> dict:
    """Builds and measures `programs` of `config` on `devices`. Returns {"setup": ..., "programs":
    [one `measure` dict each]} (the Python API behind the CLI). `mean_tokens`: see make_setup;
    `budget`: the device memory each program's share is held against (default: the platform's)."""
    import jax

    budget = budget or device_budget(devices[0].platform)
    s = make_setup(config, devices, mean_tokens)
    setup = {
        "devices": len(devices), "mesh_devices": int(s.mesh.devices.size), "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", ""), "mesh": dict(s.mesh.shape),
        "rollout_mesh": dict(s.rollout_mesh.shape), "rollout_dtype": s.rollout_dtype,
        "model_params": s.cfg.num_params(), "seq_len": s.seq_len, "update_batch": s.update_batch,
        "micro_batches": micro_batches_for(s, s.update_batch), "tokens_per_device": config.tokens_per_device,
        "row_len": s.budget.row_len, "rows_per_micro_batch": s.rows_per_micro_batch,
        "mean_tokens": s.mean_tokens, "prompts_per_call": s.prompts_per_call,
        "bucket": s.bucket, "max_new_tokens": s.max_new_tokens, "remat": s.cfg.remat,
        "param_dtype": s.cfg.param_dtype, "dtype": s.cfg.dtype, "jax": jax.__version__,
        "lora": _lora_setup(s),
        "held_against": {"device": budget.name, "memory": budget.memory, "source": budget.source},
    }
    results = []
    for name in programs:
        built = BUILDERS[name](s)
        for program in built if isinstance(built, (list, tuple)) else [built]:
            results.append(measure(program, devices[0].platform, dump_hlo, budget))
            print(f"  {program.name}: compiled in {results[-1]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    return {"setup": setup, "programs": results}


def _si(x: float, unit: str = "B") -> str:
    """1.23e10 -> '12.3 GB' (decimal prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _count(n: float) -> str:
    """835_000 -> '835k', 7.6e9 -> '7.6B'."""
    for prefix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{prefix}"
    return f"{n:g}"


def _lora_setup(s) -> dict | None:
    """The adapters of a LoRA config: rank, targets, trained parameters, the base's dtype."""
    import jax

    from reval_jax.model.lora import split_base, split_trainable
    from reval_jax.run.config import lora_settings

    lora = lora_settings(s.config)
    if lora is None:
        return None
    trained = sum(a.size for a in jax.tree.leaves(split_trainable(s.params)[0]))
    base_dtype = str(jax.tree.leaves(split_base(s.params)[0])[0].dtype)
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "trained_params": int(trained),
            "base_dtype": base_dtype}


def _lora_words(lora: dict | None) -> str:
    if not lora:
        return ""
    return (f"; LoRA rank {lora['rank']} on {len(lora['targets'])} projections, "
            f"{_count(lora['trained_params'])} trained, {lora['base_dtype']} base")


def format_report(report: dict) -> str:
    """A plain-text table: memory and collectives per device, FLOPs summed over devices."""
    s = report["setup"]
    col = lambda x: f"{x:>12}"
    used = s.get("mesh_devices", s["devices"])
    on = f"{used} of {s['devices']}" if used != s["devices"] else f"{used} x"
    kind = f" {s['device_kind']}" if s["device_kind"] and s["device_kind"] != s["platform"] else ""
    lines = [
        f"mesh {s['mesh']} on {on} {s['platform']}{kind}  "
        f"{_count(s['model_params'])} params ({s['param_dtype']} weights, {s['dtype']} compute, "
        f"remat {s['remat']}{_lora_words(s.get('lora'))})  "
        f"update [{s['update_batch']}, {s['seq_len']}] in {s['micro_batches']} "
        f"micro-batch(es); sampler {s['prompts_per_call']} prompts x bucket {s['bucket']} + "
        f"{s['max_new_tokens']} on the rollout mesh {s['rollout_mesh']} in {s['rollout_dtype']}  (jax {s['jax']})",
        "",
        f"{'memory / device':<16}" + "".join(col(k) for k in ("argument", "output", "alias", "temp", "peak"))
        + col("compile"),
    ]
    for r in report["programs"]:
        if "error" in r:
            lines.append(f"{r['program']:<16}{r['error']}  ({r['compile_s']:.0f} s)")
            continue
        m = r["memory"]
        lines.append(f"{r['program']:<16}" + "".join(col(_si(m[k])) for k in ("argument", "output", "alias",
                     "temp", "peak")) + col(f"{r['compile_s']:.0f} s"))
    lines += _holds_lines(report)
    kinds = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    names = ("all-gather", "all-reduce", "red-scatter", "all-to-all", "permute")
    lines += ["", f"{'collect. / device':<16}" + "".join(col(k) for k in names)
              + col("total") + col("runs") + col("per round")]
    for r in report["programs"]:
        if "error" in r:
            continue
        rows = [("", r["collectives"], r["collective_bytes"])]
        if r["loop_bound"]:
            rows = [(" / step", r["collectives_per_step"], r["collective_bytes_per_step"]),
                    (f" x {r['loop_bound']}", r["collectives"], r["collective_bytes"])]
        for suffix, c, total in rows:
            per_round = "" if suffix == " / step" else _si(total * r["runs"])
            lines.append(f"{r['program'] + suffix:<16}" + "".join(col(_si(c[k])) for k in kinds)
                         + col(_si(total)) + col(r["runs"]) + col(per_round))
    lines += ["", "largest collectives (bytes x count, jax op)"]
    largest = [(r["program"], *c) for r in report["programs"] for c in r.get("largest", [])]
    for program, kind, nbytes, count, op in largest:
        lines.append(f"{program:<18}{kind:<20}{_si(nbytes):>10} x {count:<6} {op[-90:]}")
    if not largest:
        lines.append("(none: no program moves data between devices)")
    lines += ["", "FLOP per execution, all devices: model (analytic) | XLA cost_analysis x devices (it counts "
              "a loop body once)"]
    for r in report["programs"]:
        if "error" in r:
            continue
        step = f" ({_si(r['model_flops_per_step'], 'FLOP')} / step)" if r["loop_bound"] else ""
        lines.append(f"{r['program']:<12}{_si(r['model_flops'], 'FLOP'):>14}{step} | "
                     f"{_si(r['xla_flops'] * used, 'FLOP')}   {r['note']}")
    return "\n".join(lines)


def _holds_lines(report: dict) -> list[str]:
    """The 'device holds' section: each program's peak plus the resident state that is not its
    argument, against the device memory; on CPU, the float32 copies of bfloat16 arrays in its temp."""
    held = report["setup"].get("held_against")
    if not held:
        return []
    col = lambda x: f"{x:>12}"
    lines = ["", f"device holds / device: the program's peak + resident state that is not its argument, against "
             f"{held['device']} = {_si(held['memory'])} ({held['source']})",
             f"{'':<16}" + "".join(col(k) for k in ("peak", "resident", "holds")) + "   verdict"]
    for r in report["programs"]:
        if "error" in r:
            continue
        room = r["headroom"]
        verdict = f"fits, {_si(room)} headroom" if r["fits"] else f"does not fit, {_si(-room)} over"
        lines.append(f"{r['program']:<16}" + "".join(col(_si(x)) for x in (r["memory"]["peak"],
                     r["resident"]["bytes"], r["holds"])) + f"   {verdict}")
        parts = ", ".join(f"{name} {_si(n)}" for name, n in r["resident"]["parts"].items() if n)
        lines.append(f"{'':<18}resident: {parts or 'nothing beside its arguments'} ({r['resident']['when']})")
        if (c := r.get("cpu_f32_copies")) is not None:
            lines.append(f"{'':<18}CPU backend artefact: {_si(c['upcast'])} of the {_si(c['live'])} of temp live "
                         "at its peak are float32 copies of bfloat16 arrays (no bfloat16 dot on CPU; a GPU or "
                         "TPU computes in bfloat16 without them)")
    if report["setup"]["platform"] == "cpu" and not any("cpu_f32_copies" in r for r in report["programs"]):
        lines.append("(CPU compile: its temp includes float32 copies of bfloat16 arrays that a GPU or TPU does "
                     "not make; not measured here)")
    return lines


# ----------------------------------------------------------------------------- CLI


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    FLAGS = flags.FLAGS
    if FLAGS.platform == "cpu" and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    programs = [p.strip() for p in FLAGS.programs.split(",") if p.strip()]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise UserError(f"--programs: unknown {unknown}; choose from {PROGRAMS}")
    budget = device_budget(FLAGS.platform, FLAGS.device, FLAGS.device_memory)
    devices = devices_for(FLAGS.platform, FLAGS.devices, FLAGS.topology)
    report = check(FLAGS.config, devices, programs, FLAGS.dump_hlo, FLAGS.mean_tokens, budget)
    report["setup"]["command"] = " ".join(["python -m reval_jax.scale", *sys.argv[1:]])
    print(format_report(report))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from reval_jax.run import cli

    config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
    flags.DEFINE_enum("platform", "cpu", ["cpu", *TOPOLOGIES], "Compile for fake CPU devices or a TPU topology.")
    flags.DEFINE_integer("devices", 8, "Devices (CPU) or chips (TPU).")
    flags.DEFINE_string("topology", "", "TPU topology name overriding the default, e.g. v5p:2x2x2.")
    flags.DEFINE_string("programs", ",".join(PROGRAMS), "Comma-separated programs to compile.")
    flags.DEFINE_string("json", "", "Also write the report as JSON here.")
    flags.DEFINE_string("dump_hlo", "", "Write each compiled program's HLO text into this directory.")
    flags.DEFINE_integer("mean_tokens", 0, "Average trajectory tokens (prompt + response), which sets the packed "
                         "micro-batches per update; 0 = every trajectory at full length (the worst case).")
    flags.DEFINE_string("device", "", "Hold each program's share against this device's memory: "
                        f"{', '.join(DEVICES)}; default per platform {DEFAULT_DEVICE}.")
    flags.DEFINE_string("device_memory", "", "Device memory to hold the figures against, in bytes or e.g. 80GB, "
                        "16GiB (overrides --device's).")
    flags.mark_flags_as_required(["config"])
    cli.run_absl(main)
