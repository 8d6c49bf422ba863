"""Scale checker: compiles the real programs of a run config on abstract arrays (no accelerator, no
weights) and reports, per program, per-device memory, collective bytes and FLOPs.

    python -m reval_jax.scale --config=configs/qwen7b.py [--platform=cpu|v5p|v5e|v6e] [--devices=8]
        [--mean_tokens=682] [--config.tokens_per_device=16384 ...] [--programs=update,reference] [--json=PATH]

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

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# TPU topology per (platform, chips); --topology overrides it.
TOPOLOGIES = {
    "v5p": {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
}
PROGRAMS = ("update", "reference", "prefill", "decode")


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


def model_config(config):
    """ModelConfig from model.path/config.json if it exists, else from the preset model.preset."""
    from reval_jax.model.config import from_hf_config, preset

    overrides = dict(
        param_dtype=config.model.param_dtype, dtype=config.model.dtype, remat=config.model.remat,
        attention=config.model.get("attention", "auto"),
    )
    hf = Path(config.model.path or "/nonexistent") / "config.json"
    if hf.exists():
        return from_hf_config(json.loads(hf.read_text()), source=str(hf), **overrides)
    if config.model.get("preset", ""):
        return preset(config.model.preset, **overrides)
    raise ValueError(
        f"no model shapes: {hf} does not exist and config.model.preset is empty; set "
        "--config.model.preset to a name of reval_jax.model.config.PRESETS or model.path to a HF directory"
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every builder needs: the run config, the model, the mesh and the round's sizes."""

    config: Any  # the ml_collections run config
    cfg: Any  # ModelConfig
    mesh: Any  # the training mesh (config.mesh)
    graphdef: Any
    params: Any  # nnx.State of ShapeDtypeStructs carrying their NamedShardings
    rollout_mesh: Any  # the sampler's (dp, 1, tp) mesh over the same devices (config.rollout.tensor)
    rollout_graphdef: Any  # the sampler's model: rollout dtype, rollout mesh
    rollout_params: Any  # its abstract parameters in the rollout layout (rollout.layout.ROLLOUT_RULES)
    rollout_dtype: str  # the sampler's weight and compute dtype (config.rollout.dtype or model.dtype)
    seq_len: int  # T of an update batch: bucket(max_prompt_len) + max_new_tokens
    update_batch: int  # trajectories per update
    prompts_per_call: int  # prompts per sampler call
    bucket: int  # P, the prompt bucket of max_prompt_len
    max_new_tokens: int  # A
    num_samples: int  # N samples per prompt
    budget: Any  # packing.Budget of the update and reference passes
    rows_per_micro_batch: int  # rows of one packed micro-batch (all devices)
    mean_tokens: int  # tokens of an average trajectory (the sizes of a round's micro-batches)


def make_setup(config, devices, mean_tokens: int = 0) -> Setup:
    """`mean_tokens`: the average trajectory length (prompt + response) that sets how many packed
    micro-batches an update needs; 0 = the worst case, every trajectory at full length."""
    import jax
    from flax import nnx

    from reval_jax.model.decoder import Qwen2
    from reval_jax.parallel.sharding import make_mesh, state_shardings
    from reval_jax.rollout.layout import layout_from_config
    from reval_jax.rollout.sampler import bucket_length

    cfg = model_config(config)
    mesh = make_mesh(tuple(config.mesh), devices=devices)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), mesh=mesh)))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, state_shardings(abstract, mesh),
    )
    layout = layout_from_config(config, mesh, cfg)
    rollout_graphdef, rollout_params = layout.abstract(cfg)
    bucket = bucket_length(config.data.max_prompt_len, tuple(config.sampling.buckets))
    N = config.sampling.num_samples
    rollouts = config.data.prompts_per_iteration * N
    per_call = (
        max(1, config.sampling.batch_size // N) if config.sampling.batch_size
        else config.data.prompts_per_iteration
    )
    from reval_jax.run.train import packing_budget

    budget = packing_budget(config, mesh)
    seq_len = bucket + config.sampling.max_new_tokens
    update_batch = config.replay.batch_size or rollouts
    rows = budget.rows_per_micro_batch
    if not rows:  # an explicit micro_batches: the worst case, every trajectory a whole row
        per_micro = -(-update_batch // budget.micro_batches)  # trajectories (= rows) per micro-batch
        rows = -(-per_micro // budget.devices) * budget.devices
    return Setup(
        config=config, cfg=cfg, mesh=mesh, graphdef=graphdef, params=params, rollout_mesh=layout.mesh,
        rollout_graphdef=rollout_graphdef, rollout_params=rollout_params, rollout_dtype=layout.dtype,
        seq_len=seq_len,
        update_batch=update_batch, prompts_per_call=per_call, bucket=bucket,
        max_new_tokens=config.sampling.max_new_tokens, num_samples=N, budget=budget,
        rows_per_micro_batch=rows, mean_tokens=mean_tokens or seq_len,
    )


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(cfg) -> int:
    """Parameters that multiply activations: every layer weight plus the unembedding (the embedding
    lookup and the final norm do no matmul)."""
    embed = cfg.vocab_size * cfg.hidden_size
    return cfg.num_params() - cfg.hidden_size - (0 if cfg.tie_word_embeddings else embed)


def model_flops(cfg, kind: str, rows: int, length: int, keys: int = 0, segment: int = 0) -> float:
    """Analytic model FLOPs (no rematerialisation, causal attention counted once):
      forward  = 2·P·rows·length + 2·L·N·H·rows·length·segment   (P = matmul_params; the causal
                 attention term is QKᵀ + AV = 4·L·N·H per query-key pair over segment²/2 pairs of
                 each of the length/segment sequences packed in a row; segment = length unpacked)
      update   = 3 × forward (backward = 2 × forward)
      prefill  = the forward of the layers on rows·length tokens, unembedding 1 token per row
      decode   = one token per row attending to `keys` cached slots: 2·P·rows + 4·L·N·H·rows·keys."""
    P, L, N, H = matmul_params(cfg), cfg.num_layers, cfg.num_heads, cfg.head_dim
    attn = 2.0 * L * N * H * rows * length * (segment or length)
    if kind == "forward":
        return 2.0 * P * rows * length + attn
    if kind == "update":
        return 3 * model_flops(cfg, "forward", rows, length, segment=segment)
    if kind == "prefill":
        unembed = cfg.vocab_size * cfg.hidden_size
        return 2.0 * (P - unembed) * rows * length + 2.0 * unembed * rows + attn
    if kind == "decode":
        return 2.0 * P * rows + 4.0 * L * N * H * rows * keys
    raise ValueError(kind)


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program of a round: `fn.lower(*args, **kwargs)` compiles it."""

    name: str
    fn: Callable  # a jax.jit-wrapped function
    args: tuple  # abstract arguments (ShapeDtypeStruct, shardings where fn has no in_shardings)
    runs: int  # executions per generation round
    model_flops: float  # per execution
    kwargs: dict = dataclasses.field(default_factory=dict)
    loop_bound: int = 0  # >0: the program is a data-dependent while loop run at most this often
    note: str = ""


def abstract_packed(s: Setup, rows: int):
    """A packed micro-batch of ShapeDtypeStructs: [rows, row_len] tokens, [rows, M] slots."""
    import jax

    from reval_jax.objective.packing import DTYPES, TOKEN_FIELDS, Packed

    L, M = s.budget.row_len, s.budget.max_segments
    return Packed(**{name: jax.ShapeDtypeStruct((rows, L) if name in TOKEN_FIELDS else (rows, M), dtype)
                     for name, dtype in DTYPES.items()})


def _optimizer_and_state(s: Setup):
    import jax

    from reval_jax.objective.train_step import OptimizerConfig, init_state, make_optimizer

    optimizer = make_optimizer(OptimizerConfig(**s.config.optimizer.to_dict()))
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s.params)
    state = jax.eval_shape(
        lambda p: init_state(p, optimizer, ref_dtype=s.config.model.ref_dtype or None), plain
    )
    return optimizer, state


def _updater(s: Setup):
    from reval_jax.objective.train_step import Updater
    from reval_jax.run.train import step_config

    optimizer, state = _optimizer_and_state(s)
    return Updater(s.graphdef, optimizer, step_config(s.config), s.mesh, state), state


def micro_batches_for(s: Setup, trajectories: int) -> int:
    """Micro-batches of `trajectories` packed ones: Σ tokens / tokens per micro-batch, with every
    trajectory `s.mean_tokens` long (ideal packing; the packer's measured overhead is ~4%, see
    benchmarks/packing_bench.py), or the explicit config.micro_batches."""
    if s.budget.micro_batches:
        return s.budget.micro_batches
    per_micro = s.rows_per_micro_batch * s.budget.row_len
    return max(1, -(-trajectories * s.mean_tokens // per_micro))


def _computing(updater, params):
    """Abstract parameters in the compute dtype, as `Updater.computing` hands them to the programs."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, updater.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def build_update(s: Setup) -> list[Program]:
    """Updater's programs of an update: the micro-step (forward, backward, gradients added to the
    donated accumulator) on one packed micro-batch, run once per micro-batch, and the apply step.
    With exact_reference the forward program's runs on both sides of δ are in `build_reference`."""
    import jax
    import jax.numpy as jnp

    from reval_jax.objective.losses import LossNorm

    updater, state = _updater(s)
    rows, K = s.rows_per_micro_batch, s.config.replay.updates_per_iteration
    n = micro_batches_for(s, s.update_batch)
    grads = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), state.params)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    norm = LossNorm(scalar, scalar, scalar)
    tokens = rows * s.budget.row_len
    mb = abstract_packed(s, rows)
    values = (mb.ref_logp, mb.ref_v) if updater.exact else None  # f32 [R, L] / [R, M], like the forward's
    return [
        Program(
            "update micro-step", updater._accumulate_fn, (grads, _computing(updater, state.params), mb, norm, values),
            runs=n * K, model_flops=model_flops(s.cfg, "update", rows, s.budget.row_len, segment=s.mean_tokens),
            note=f"[{rows}, {s.budget.row_len}] packed rows ({tokens // len(s.mesh.devices.flat)} tokens/device); "
                 f"{n} micro-batch(es) x {K} updates of {s.update_batch} trajectories of ~{s.mean_tokens} tokens",
        ),
        Program("update apply", updater._apply_fn, (state, grads, scalar), runs=K, model_flops=0.0,
                note="clip + AdamW + finite checks, once per update"),
    ]


def build_reference(s: Setup) -> Program:
    """Updater's forward program on one packed micro-batch. With exact_reference (default) it runs
    twice per update micro-batch (the policy's and the reference's side of δ) and the rollouts get
    no reference pass; otherwise once per micro-batch of a round's fresh rollouts (stale buffer
    draws add more runs)."""
    updater, state = _updater(s)
    rows = s.rows_per_micro_batch
    if updater.exact:
        K = s.config.replay.updates_per_iteration
        n = 2 * K * micro_batches_for(s, s.update_batch)
        when = f"{n} runs per round: policy and reference of each update micro-batch"
    else:
        n = micro_batches_for(s, s.config.data.prompts_per_iteration * s.num_samples)
        when = f"{n} micro-batch(es) per round; more when stale buffer draws are recomputed"
    return Program(
        "reference", updater._forward_fn, (_computing(updater, state.ref_params), abstract_packed(s, rows)),
        runs=n, model_flops=model_flops(s.cfg, "forward", rows, s.budget.row_len, segment=s.mean_tokens),
        note=f"[{rows}, {s.budget.row_len}] packed rows; {when}",
    )


def _sampling_config(s: Setup):
    from reval_jax.rollout.sampler import SamplingConfig

    c = s.config.sampling
    return SamplingConfig(
        max_new_tokens=c.max_new_tokens, num_samples=c.num_samples, temperature=c.temperature,
        top_k=c.top_k, top_p=c.top_p, stop_ids=(0,), buckets=tuple(c.buckets),
    )


def _prompt_args(s: Setup):
    import jax
    import jax.numpy as jnp

    from reval_jax.parallel.sharding import named_sharding

    B, P = s.prompts_per_call, s.bucket
    row = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=named_sharding(s.rollout_mesh, ("act_batch",) + (None,) * (len(shape) - 1), shape)
    )
    seed = jax.ShapeDtypeStruct((), jnp.uint32)
    return row((B, P), jnp.int32), row((B, P), jnp.bool_), row((B,), jnp.int32), seed


def _calls_per_round(s: Setup) -> int:
    return -(-s.config.data.prompts_per_iteration // s.prompts_per_call)


def _engine(s: Setup):
    """The rollout engine's config for this run, its cache geometry (R data replicas, each with its
    slots and G pages, its trash page included) and its abstract pool / slots on the rollout mesh,
    as `Engine` lays them out."""
    from reval_jax.rollout.engine import EngineConfig, engine_config
    from reval_jax.rollout.page_table import CacheGeometry
    from reval_jax.rollout.programs import abstract_state

    engine = engine_config(s.config) or EngineConfig.one_slot_per_sample(s.prompts_per_call, s.num_samples)
    geometry = CacheGeometry.of(engine, samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                                prompt_bucket=s.bucket, mesh=s.rollout_mesh)
    pool, slots = abstract_state(s.cfg, geometry, s.rollout_mesh, s.rollout_dtype)
    return engine, geometry, pool, slots


def build_prefill(s: Setup) -> Program:
    """The engine's prefill on the rollout layout: `prefill_rows` prompts, one chunk of C tokens each,
    written into the paged pool (a prompt is prefilled once for its N samples)."""
    from reval_jax.rollout.programs import prefill_call, prefill_shape

    engine, g, pool, _ = _engine(s)
    per_call = min(engine.prefill_rows, s.prompts_per_call)  # prompts admitted per prefill call at most
    # the engine's call shape for them (R blocks of rows, one per replica) with bucket-long prompts
    n, C = prefill_shape(engine, g, -(-per_call // g.replicas), s.bucket)
    call = prefill_call(s.rollout_graphdef, s.rollout_params, pool, engine, g, (n, C))
    chunks = -(-s.bucket // C)
    calls = -(-s.config.data.prompts_per_iteration // per_call) * chunks
    return Program(
        "prefill", call.fn, call.args, kwargs=call.kwargs, runs=calls,
        model_flops=model_flops(s.cfg, "prefill", n, C),
        note=f"[{n}, {C}] prompt tokens per call (bucket {s.bucket}: {chunks} chunk(s)); pool of "
             f"{g.replicas} x {g.pages} pages x {g.page_size} tokens",
    )


def build_decode(s: Setup) -> Program:
    """The engine's decode loop on the rollout layout: every slot one token per step, each row reading
    the pages it has filled. Steps per round: rollouts × mean response / slots (ideal refill), the mean
    response taken as min(max_new_tokens, mean_tokens)."""
    from reval_jax.rollout.page_table import decode_chunk
    from reval_jax.rollout.programs import decode_call

    engine, g, pool, slots = _engine(s)
    A = s.max_new_tokens
    rollouts = s.config.data.prompts_per_iteration * s.num_samples
    mean_response = min(A, s.mean_tokens)
    steps = -(-rollouts * mean_response // engine.slots)
    # the decode attention's block: as many (row, page) pairs as a replica's rows fill on average
    fill = -(-(s.mean_tokens or s.bucket + A // 2) // engine.page_size)  # a trajectory's tokens: above its mean fill
    chunk = decode_chunk(engine, s.rollout_mesh.devices.ravel()[0].platform, g.rows * fill, g.rows * g.width)
    # no weight pickup inside a call (async step pickup lowers max_steps): a call runs at most A steps
    # (its condition's bound); a round is ~steps of them: ⌈steps / A⌉ calls
    sampling = _sampling_config(s)
    call = decode_call(s.rollout_graphdef, s.rollout_params, pool, slots, sampling, chunk)
    return Program(
        "decode", call.fn, call.args, kwargs=call.kwargs, runs=-(-steps // A), loop_bound=A,
        model_flops=model_flops(s.cfg, "decode", engine.slots, 1, keys=s.bucket + mean_response // 2),
        note=f"{engine.slots} slots, {g.replicas} x {g.pages} pages x {engine.page_size} tokens ({g.cached_tokens} "
             f"cached tokens); ~{steps} steps per round = {rollouts} rollouts x {mean_response} tokens / slots; "
             f"sampling top_k {sampling.top_k} top_p {sampling.top_p:g} (0, 1: off)",
    )


# name -> builder. A builder takes the Setup and returns a Program (or a list of them, e.g. a
# jitted micro-step run micro_batches × K times and an apply step run K times); swap one here when
# the program it builds changes, the measuring and the report do not care what it compiles.
BUILDERS: dict[str, Callable[[Setup], Program | list[Program]]] = {
    "update": build_update,
    "reference": build_reference,
    "prefill": build_prefill,
    "decode": build_decode,
}


# ----------------------------------------------------------------------------- measuring


def _fits_error(message: str) -> bool:
    return any(w in message for w in ("RESOURCE_EXHAUSTED", "out of memory", "Ran out of memory",
                                      "exceeds the memory", "HBM"))


def measure(p: Program, platform: str, dump_hlo: str = "") -> dict:
    """Compiles `p` and returns its figures (per device; see the module docstring); with `dump_hlo`,
    writes the compiled HLO text to <dump_hlo>/<program>.hlo.txt."""
    from reval_jax.tools import hlo

    start = time.perf_counter()
    out = {"program": p.name, "note": p.note, "runs": p.runs, "loop_bound": p.loop_bound,
           "model_flops": p.model_flops}
    try:
        compiled = p.fn.lower(*p.args, **p.kwargs).compile()
    except Exception as e:  # a TPU program that does not fit raises here
        text = str(e).strip()
        first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
        out["error"] = ("does not fit: " if _fits_error(text) else "compile failed: ") + first
        out["compile_s"] = time.perf_counter() - start
        return out
    out["compile_s"] = time.perf_counter() - start
    m = compiled.memory_analysis()
    memory = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    memory["xla_peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    # CPU's peak_memory_in_bytes comes out below its own temp size: not a peak; use the sum there
    memory["peak"] = memory["xla_peak"] if platform == "tpu" and memory["xla_peak"] else (
        memory["argument"] + memory["output"] + memory["temp"] - memory["alias"])
    text = compiled.as_text()
    if dump_hlo:
        Path(dump_hlo).mkdir(parents=True, exist_ok=True)
        (Path(dump_hlo) / f"{p.name}.hlo.txt").write_text(text)
    report = hlo.collectives(text)
    out.update(memory=memory, collectives=report.bytes, collective_bytes=report.total_bytes,
               loops=[[loop.trip_count, loop.source] for loop in report.loops],
               largest=[[c.kind, c.bytes, c.count, c.op_name] for c in report.largest(3)])
    if p.loop_bound:  # the data-dependent loop counted once (+ outside) vs bound times (+ outside)
        once = hlo.collectives(text, infer=False).bytes
        step = {k: (report.bytes[k] - once[k]) // max(p.loop_bound - 1, 1) for k in once}
        out.update(collectives_per_step=step, collective_bytes_per_step=sum(step.values()),
                   collective_bytes_outside_loop=sum(once.values()) - sum(step.values()),
                   model_flops_per_step=p.model_flops, model_flops=p.model_flops * p.loop_bound)
    out["collective_bytes_per_round"] = out["collective_bytes"] * p.runs
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float((cost or {}).get("flops", 0.0))
    return out


def check(config, devices, programs=PROGRAMS, dump_hlo: str = "", mean_tokens: int = 0) -> dict:
    """Builds and measures `programs` of `config` on `devices`. Returns {"setup": ..., "programs":
    [one `measure` dict each]} (the Python API behind the CLI). `mean_tokens`: see make_setup."""
    import jax

    s = make_setup(config, devices, mean_tokens)
    setup = {
        "devices": len(devices), "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", ""), "mesh": dict(s.mesh.shape),
        "rollout_mesh": dict(s.rollout_mesh.shape), "rollout_dtype": s.rollout_dtype,
        "model_params": s.cfg.num_params(), "seq_len": s.seq_len, "update_batch": s.update_batch,
        "micro_batches": config.micro_batches, "tokens_per_device": config.tokens_per_device,
        "row_len": s.budget.row_len, "rows_per_micro_batch": s.rows_per_micro_batch,
        "mean_tokens": s.mean_tokens, "prompts_per_call": s.prompts_per_call,
        "bucket": s.bucket, "max_new_tokens": s.max_new_tokens, "remat": s.cfg.remat,
        "param_dtype": s.cfg.param_dtype, "dtype": s.cfg.dtype, "jax": jax.__version__,
    }
    results = []
    for name in programs:
        built = BUILDERS[name](s)
        for program in built if isinstance(built, (list, tuple)) else [built]:
            results.append(measure(program, devices[0].platform, dump_hlo))
            print(f"  {program.name}: compiled in {results[-1]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    return {"setup": setup, "programs": results}


def _si(x: float, unit: str = "B") -> str:
    """1.23e10 -> '12.3 GB' (decimal prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_report(report: dict) -> str:
    """A plain-text table: memory and collectives per device, FLOPs summed over devices."""
    s = report["setup"]
    col = lambda x: f"{x:>12}"
    lines = [
        f"{s['devices']} x {s['platform']} {s['device_kind']}  mesh {s['mesh']}  "
        f"{s['model_params'] / 1e9:.2f}B params ({s['param_dtype']} weights, {s['dtype']} compute, "
        f"remat {s['remat']})  update [{s['update_batch']}, {s['seq_len']}] in {s['micro_batches']} "
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
    for r in report["programs"]:
        for kind, nbytes, count, op in r.get("largest", []):
            lines.append(f"{r['program']:<12}{kind:<20}{_si(nbytes):>10} x {count:<6} {op[-90:]}")
    lines += ["", "FLOP per execution, all devices: model (analytic) | XLA cost_analysis x devices (it counts "
              "a loop body once)"]
    for r in report["programs"]:
        if "error" in r:
            continue
        step = f" ({_si(r['model_flops_per_step'], 'FLOP')} / step)" if r["loop_bound"] else ""
        lines.append(f"{r['program']:<12}{_si(r['model_flops'], 'FLOP'):>14}{step} | "
                     f"{_si(r['xla_flops'] * s['devices'], 'FLOP')}   {r['note']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.platform == "cpu" and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    programs = [p.strip() for p in FLAGS.programs.split(",") if p.strip()]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"--programs: unknown {unknown}; choose from {PROGRAMS}")
    devices = devices_for(FLAGS.platform, FLAGS.devices, FLAGS.topology)
    report = check(FLAGS.config, devices, programs, FLAGS.dump_hlo, FLAGS.mean_tokens)
    report["setup"]["command"] = " ".join(["python -m reval_jax.scale", *sys.argv[1:]])
    print(format_report(report))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
    flags.DEFINE_enum("platform", "cpu", ["cpu", *TOPOLOGIES], "Compile for fake CPU devices or a TPU topology.")
    flags.DEFINE_integer("devices", 8, "Devices (CPU) or chips (TPU).")
    flags.DEFINE_string("topology", "", "TPU topology name overriding the default, e.g. v5p:2x2x2.")
    flags.DEFINE_string("programs", ",".join(PROGRAMS), "Comma-separated programs to compile.")
    flags.DEFINE_string("json", "", "Also write the report as JSON here.")
    flags.DEFINE_string("dump_hlo", "", "Write each compiled program's HLO text into this directory.")
    flags.DEFINE_integer("mean_tokens", 0, "Average trajectory tokens (prompt + response), which sets the packed "
                         "micro-batches per update; 0 = every trajectory at full length (the worst case).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
