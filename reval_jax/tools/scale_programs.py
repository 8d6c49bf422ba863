"""The programs the scale checker compiles, built by the same public builders the run uses.

`make_setup(config, devices)` turns a run config into abstract parameters (ShapeDtypeStructs with
their shardings) on the training mesh and in the rollout layout, and the round's sizes; every
typed setting comes from reval_jax.run.config (packing budget, step, optimizer, engine, sampling,
rollout layout), so the checker measures what a run would compile. Each builder returns `Program`s:
the jitted function the run calls (the Updater's `micro_step` / `apply_step` / `forward`, the
engine's `prefill_call` / `decode_call`), its abstract arguments, how often it runs per round and
its model FLOPs. reval_jax/tools/scale.py measures and reports them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRAMS = ("update", "reference", "prefill", "decode")


def model_config(config):
    """ModelConfig from model.path/config.json if it exists, else from the preset model.preset."""
    from reval_jax.model.config import from_hf_config, preset
    from reval_jax.run.config import model_settings

    m = model_settings(config)  # what the run's load_hf_policy applies to the checkpoint's config
    overrides = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention,
                     scan_layers=m.scan_layers)
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

    from reval_jax.model.decoder import Decoder
    from reval_jax.model.lora import add_adapters
    from reval_jax.parallel.sharding import make_mesh, state_shardings
    from reval_jax.run import config as run_config

    cfg = model_config(config)
    mesh = make_mesh(tuple(config.mesh), devices=devices)
    adapters = run_config.lora_settings(config)

    def build():
        model = Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        return model if adapters is None else add_adapters(model, adapters)  # a LoRA run's policy

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, state_shardings(abstract, mesh),
    )
    layout = run_config.rollout_layout(config, mesh, cfg)
    rollout_graphdef, rollout_params = layout.abstract(cfg)
    N = config.sampling.num_samples
    rollouts = config.data.prompts_per_iteration * N
    per_call = run_config.prompts_per_call(config)
    budget = run_config.packing_budget(config, mesh)
    seq_len = run_config.sequence_length(config)
    bucket = seq_len - config.sampling.max_new_tokens
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
    resident: tuple = ()  # scale_memory.Residency of each way the run calls it: what else is on the device


def abstract_packed(s: Setup, rows: int):
    """A packed micro-batch of ShapeDtypeStructs: [rows, row_len] tokens, [rows, M] slots."""
    import jax

    from reval_jax.objective.packing import DTYPES, TOKEN_FIELDS, Packed

    L, M = s.budget.row_len, s.budget.max_segments
    return Packed(**{name: jax.ShapeDtypeStruct((rows, L) if name in TOKEN_FIELDS else (rows, M), dtype)
                     for name, dtype in DTYPES.items()})


def _optimizer_and_state(s: Setup):
    """The run's optimizer and its abstract TrainState, every array carrying the sharding the trainer
    puts it in (train_step.state_sharding: parameters from their logical axes, moments alike)."""
    import jax

    from reval_jax.objective.train_step import init_state, make_optimizer, state_sharding
    from reval_jax.run.config import model_settings, optimizer_config

    optimizer = make_optimizer(optimizer_config(s.config))
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s.params)
    ref_dtype = model_settings(s.config).ref_dtype
    state = jax.eval_shape(lambda p: init_state(p, optimizer, ref_dtype=ref_dtype), plain)
    shardings = state_sharding(state, optimizer, s.mesh)
    return optimizer, jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shardings)


def _updater(s: Setup):
    from reval_jax.objective.train_step import Updater
    from reval_jax.run.config import step_config

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
    """Abstract parameters in the compute dtype, as `Updater.computing` hands them to the programs: the
    same arrays when they already are in it (no copy), else a cast copy in the same layout."""
    import jax
    import jax.numpy as jnp

    floats = [a for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    if all(a.dtype == updater.dtype for a in floats):
        return params
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, updater.dtype, sharding=a.sharding)
                        if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != updater.dtype else a, params)


def _reference(updater, state, params):
    """The reference in the compute dtype as the update holds it: a copy, or with LoRA the policy's own
    arrays (`params`, the compute copy; only the scale s differs)."""
    return params if updater.lora else _computing(updater, state.ref_params)


def _state_parts(state) -> dict:
    """The train state's arrays by what they are (scale_memory.Residency's live trees)."""
    counters = (state.ref_version, state.step, state.skipped, state.skipped_in_a_row)
    return {"master weights": state.params, "optimizer state": state.opt_state,
            "reference": state.ref_params, "counters": counters}


def _update_live(updater, state) -> tuple[dict, Any, Any]:
    """What `Updater.update` holds on the devices through its micro-batch loop: the train state, the
    gradient accumulator, the policy in the compute dtype and (exact_reference) the reference in it.
    Returns (live, the policy's compute copy, the reference's)."""
    import jax
    import jax.numpy as jnp

    from reval_jax.model.lora import split_trainable

    grads = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding),
                         split_trainable(state.params)[0])  # with LoRA: A's and B's only
    params = _computing(updater, state.params)
    ref = _reference(updater, state, params) if updater.exact else None
    live = {**_state_parts(state), "gradient accumulator": grads, "policy in compute dtype": params,
            "reference in compute dtype": ref}
    return live, params, ref


def build_update(s: Setup) -> list[Program]:
    """Updater's programs of an update: the micro-step (forward, backward, gradients added to the
    donated accumulator) on one packed micro-batch, run once per micro-batch, and the apply step.
    With exact_reference the forward program's runs on both sides of δ are in `build_reference`."""
    import jax
    import jax.numpy as jnp

    from reval_jax.objective.losses import LossNorm
    from reval_jax.tools.scale_memory import Residency

    updater, state = _updater(s)
    rows, K = s.rows_per_micro_batch, s.config.replay.updates_per_iteration
    n = micro_batches_for(s, s.update_batch)
    live, params, _ = _update_live(updater, state)
    grads = live["gradient accumulator"]
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    norm = LossNorm(scalar, scalar, scalar)
    tokens = rows * s.budget.row_len
    mb = abstract_packed(s, rows)
    values = (mb.ref_logp, mb.ref_v) if updater.exact else None  # f32 [R, L] / [R, M], like the forward's
    same = jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated)  # whether the loss is taken at `values`
    micro_args = (grads, params, mb, norm, values, same)
    apply_args = (state, grads, scalar)
    return [
        Program(
            "update micro-step", updater.micro_step, micro_args,
            runs=n * K, model_flops=model_flops(s.cfg, "update", rows, s.budget.row_len, segment=s.mean_tokens),
            note=f"[{rows}, {s.budget.row_len}] packed rows ({tokens // len(s.mesh.devices.flat)} tokens/device); "
                 f"{n} micro-batch(es) x {K} updates of {s.update_batch} trajectories of ~{s.mean_tokens} tokens",
            resident=(Residency(live, micro_args, "in Updater.update's micro-batch loop"),),
        ),
        Program("update apply", updater.apply_step, apply_args, runs=K, model_flops=0.0,
                note="clip + AdamW + finite checks, once per update",
                resident=(Residency({**_state_parts(state), "gradient accumulator": grads}, apply_args,
                                    "after the micro-batches, their compute copies freed"),)),
    ]


def build_reference(s: Setup) -> Program:
    """Updater's forward program on one packed micro-batch. With exact_reference (default) it runs
    once per update micro-batch (the reference's side of δ; the policy's too when they are equal) and
    the rollouts get no reference pass; otherwise once per micro-batch of a round's fresh rollouts
    (stale buffer draws add more runs)."""
    from reval_jax.tools.scale_memory import Residency

    updater, state = _updater(s)
    rows = s.rows_per_micro_batch
    mb = abstract_packed(s, rows)
    if updater.exact:
        K = s.config.replay.updates_per_iteration
        n = K * micro_batches_for(s, s.update_batch)
        when = f"{n} runs per round: the reference's side of δ of each update micro-batch"
        live, params, ref = _update_live(updater, state)
        resident = (Residency(live, (ref, mb), "the reference's side of δ, in Updater.update"),)
    else:
        n = micro_batches_for(s, s.config.data.prompts_per_iteration * s.num_samples)
        when = f"{n} micro-batch(es) per round; more when stale buffer draws are recomputed"
        ref = _reference(updater, state, _computing(updater, state.params))
        resident = (Residency({**_state_parts(state), "reference in compute dtype": ref}, (ref, mb),
                              "Updater.reference on a round's rollouts"),)
    return Program(
        "reference", updater.forward, (ref, mb),
        runs=n, model_flops=model_flops(s.cfg, "forward", rows, s.budget.row_len, segment=s.mean_tokens),
        note=f"[{rows}, {s.budget.row_len}] packed rows; {when}", resident=resident,
    )


def _rollout_resident(s: Setup, args: tuple) -> tuple:
    """What stays on the devices beside the rollout's programs: the whole train state when the
    rollout shares the training devices (sync, or async time-sliced: generation and updates take
    turns); with two device groups, the weight pushes waiting for the rollout group instead."""
    import jax

    from reval_jax.model.lora import is_adapted, split_base
    from reval_jax.parallel.sharding import state_shardings
    from reval_jax.rollout.layout import ROLLOUT_RULES
    from reval_jax.run.pipeline import PUSHES_WAITING
    from reval_jax.tools.scale_memory import Residency

    p = s.config.pipeline
    if p.mode == "async" and p.rollout_devices:
        waiting = 1 if p.pickup == "step" else PUSHES_WAITING
        if is_adapted(s.params):  # LoRA: adapter pushes (rollout.layout.AdapterPush) and the base they go on
            base, adapters = split_base(s.params)
            on_rollout = lambda tree: jax.tree.map(  # noqa: E731
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree,
                state_shardings(tree, s.rollout_mesh, ROLLOUT_RULES))
            live = {"the base on the rollout group": on_rollout(base),
                    "adapter pushes waiting": [on_rollout(adapters) for _ in range(waiting)]}
            return (Residency(live, args, f"two device groups, LoRA: the base (master dtype) and {waiting} "
                                          "adapter pushes may wait (not the train state)"),)
        copies = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                               s.rollout_params) for _ in range(waiting)]
        return (Residency({"weight pushes waiting": copies}, args,
                          f"two device groups: {waiting} pushed rollout copies may wait (not the train state)"),)
    _, state = _optimizer_and_state(s)
    return (Residency(_state_parts(state), args, "the train state stays on the devices while they generate"),)


def _sampling_config(s: Setup):
    from reval_jax.run.config import sampling_config

    return sampling_config(s.config, stop_ids=(0,), pad_id=0)  # the stop ids change no shape


def _engine(s: Setup):
    """The rollout engine's config for this run, its cache geometry (R data replicas, each with its
    slots and G pages, its trash page included) and its abstract pool / slots on the rollout mesh,
    as `Engine` lays them out."""
    from reval_jax.rollout.engine import EngineConfig
    from reval_jax.rollout.page_table import CacheGeometry
    from reval_jax.rollout.programs import abstract_state
    from reval_jax.run.config import engine_config

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
        resident=_rollout_resident(s, (call.args, call.kwargs)),
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
        resident=_rollout_resident(s, (call.args, call.kwargs)),
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
