"""The run config layer: the `ml_collections.ConfigDict` of a run (configs/base.py documents every
field) is validated once here and turned into the typed config of every part; nothing below this
module reads the ConfigDict.

    changes = prepare(config)                   # the algorithm's implied defaults, then every check
    run = run_settings(config, devices, procs)  # RunSettings: every part's typed slice
    sampling = sampling_config(config, stop_ids, pad_id)   # the stop ids come from the tokenizer
    budget = packing_budget(config, mesh)       # the data-parallel devices come from the mesh
    layout = rollout_layout(config, devices, model_cfg)

What an algorithm implies and which configs it refuses are its record's (reval_jax/objective/
algorithms.py), applied and called here; every error message names the field and what to do
(tests check them word for word).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from reval_jax.env.base import EnvConfig, resolve_environment
from reval_jax.env.sandbox import SandboxConfig
from reval_jax.errors import UserError
from reval_jax.model.lora import LoraConfig
from reval_jax.objective import algorithms
from reval_jax.objective.losses import REWARD_TRANSFORMS
from reval_jax.objective.packing import Budget
from reval_jax.objective.train_step import OptimizerConfig, StepConfig
from reval_jax.rollout.engine import EngineConfig
from reval_jax.rollout.layout import DTYPES, RolloutLayout, rollout_mesh
from reval_jax.rollout.sampler import SamplingConfig, bucket_length

MODES = ("sync", "async")
PICKUPS = ("round", "step")
IN_FLIGHT = ("continue", "finish")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Where a round's rollouts come from (reval_jax/run/pipeline.py)."""

    mode: str = "sync"
    max_staleness: int = 0  # updates a round may start training behind the weights it was sampled under
    sync_every: int = 1  # s: weights are pushed to the rollout side every s updates
    rollout_devices: int = 0  # 0: time-sliced on every device; n: the first n devices generate
    pickup: str = "round"  # round | step
    in_flight: str = "continue"  # continue | finish (step pickup)
    pickup_steps: int = 16  # decode steps between checks for new weights (step pickup)

    @property
    def two_groups(self) -> bool:
        return self.mode == "async" and self.rollout_devices > 0


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `reval_jax.run.evaluate.evaluate` samples."""

    k: int = 16  # samples per problem
    temperature: float = 1.0  # ignored when greedy
    greedy: bool = False  # argmax decoding (config.eval.temperature = 0): deterministic
    max_new_tokens: int = 1024
    stop_ids: tuple[int, ...] = ()
    buckets: tuple[int, ...] = (128, 256, 512, 1024)
    prompts_per_call: int = 64  # problems per sampler call
    seed: int = 0
    engine: EngineConfig | None = None  # the rollout engine's slots and cache (None: one slot per sample)


def _bad(field: str, msg: str):
    raise UserError(f"config.{field}: {msg}")


def _get(config, field: str):
    return functools.reduce(getattr, field.split("."), config)


# ----------------------------------------------------------------------------- validation


def apply_algorithm_defaults(config) -> list[str]:
    """Sets what the chosen algorithm implies (its record's defaults, unless algorithm_defaults is
    False); returns the changes made, for the log."""
    return algorithms.apply_defaults(config)


def check_config(config) -> None:
    """Refuses a config that cannot run, naming the field and what to do (the pipeline's fields
    are checked by `pipeline_config`, which needs the device count)."""
    algorithms.get(config.algorithm)  # an unknown name first: the other checks may depend on it
    if config.reward.transform not in REWARD_TRANSFORMS:
        _bad("reward.transform", f"{config.reward.transform!r} is not one of {REWARD_TRANSFORMS}")
    if config.replay.schedule not in ("on_policy_first", "buffer_only"):
        _bad("replay.schedule", f"{config.replay.schedule!r}: use on_policy_first or buffer_only")
    algorithms.check(config)  # what the algorithm refuses (its record's check)
    if config.replay.on_reset not in ("recompute", "flush"):
        _bad("replay.on_reset", f"{config.replay.on_reset!r}: use recompute or flush")
    fresh = config.replay.get("fresh_priority", "max")
    if fresh not in ("max", "delta"):
        _bad("replay.fresh_priority", f"{fresh!r}: use max or delta")
    if fresh == "delta" and config.replay.schedule != "on_policy_first":
        _bad("replay.fresh_priority", "'delta' takes each new trajectory's |δ| from the round's on-policy update: "
                                      "it needs replay.schedule='on_policy_first'")
    _check_files(config)
    _check_eval(config)
    lora_settings(config)
    for field in ("num_iterations", "data.prompts_per_iteration", "sampling.num_samples",
                  "sampling.max_new_tokens", "replay.capacity", "replay.updates_per_iteration"):
        if _get(config, field) < 1:
            _bad(field, f"{_get(config, field)} must be >= 1")
    if config.beta <= 0:
        _bad("beta", f"{config.beta} must be > 0")
    rollouts = config.data.prompts_per_iteration * config.sampling.num_samples
    batch = config.replay.batch_size or rollouts
    if batch > config.replay.capacity:
        _bad("replay.batch_size", f"{batch} trajectories per update exceed replay.capacity {config.replay.capacity}")
    if config.replay.schedule == "on_policy_first" and batch != rollouts:
        _bad("replay.batch_size", f"{batch} must equal prompts × samples = {rollouts} with on_policy_first")
    _check_packing(config)


def _check_eval(config) -> None:
    if config.eval.temperature < 0:
        _bad("eval.temperature", f"{config.eval.temperature} must be >= 0 (0 = greedy: the most likely token)")
    if config.eval.k < 1:
        _bad("eval.k", f"{config.eval.k} must be >= 1")


def _check_files(config) -> None:
    if not config.model.path:
        _bad("model.path", "empty: point it at a local Hugging Face directory")
    if not Path(config.model.path).is_dir():
        _bad("model.path", f"{config.model.path!r} is not a directory (a local HF checkpoint)")
    for f in list(config.data.train_files) + list(config.eval.files if config.eval.every else ()):
        if not Path(f).exists():
            _bad("data.train_files / eval.files", f"{f!r} does not exist")


def _check_packing(config) -> None:
    if config.tokens_per_device < 0 or config.micro_batches < 0:
        _bad("tokens_per_device / micro_batches", "must be >= 0")
    if not (config.tokens_per_device or config.micro_batches):
        _bad("tokens_per_device", "0 with micro_batches 0: set a token budget per device (or micro_batches)")
    row_len, seq_len = row_length(config), sequence_length(config)
    if config.row_tokens and config.row_tokens < seq_len:
        _bad("row_tokens", f"{config.row_tokens} cannot hold the longest trajectory of {seq_len} "
             "tokens (prompt bucket + sampling.max_new_tokens): raise it, or 0 for one sequence per row")
    if config.tokens_per_device and not config.micro_batches and config.tokens_per_device < row_len:
        _bad("tokens_per_device", f"{config.tokens_per_device} tokens do not hold one packed row of {row_len} "
             f"(prompt bucket + sampling.max_new_tokens): raise it to at least {row_len}, ideally a multiple")
    if config.max_segments_per_row < 1:
        _bad("max_segments_per_row", f"{config.max_segments_per_row} must be >= 1")


def prepare(config) -> list[str]:
    """The algorithm's implied defaults (returned, for the log), then every check of `check_config`."""
    changes = apply_algorithm_defaults(config)
    check_config(config)
    return changes


def pipeline_config(config, devices: int, processes: int = 1) -> PipelineConfig:
    """`config.pipeline`, validated against the run (K updates per round, device count)."""
    p = config.get("pipeline")
    if p is None:
        return PipelineConfig()
    cfg = PipelineConfig(mode=p.mode, max_staleness=int(p.max_staleness), sync_every=int(p.sync_every),
                         rollout_devices=int(p.rollout_devices), pickup=p.pickup, in_flight=p.in_flight,
                         pickup_steps=int(p.pickup_steps))

    def bad(field, msg):
        _bad(f"pipeline.{field}", msg)

    if cfg.mode not in MODES:
        bad("mode", f"{cfg.mode!r} is not one of {MODES}")
    if cfg.pickup not in PICKUPS:
        bad("pickup", f"{cfg.pickup!r} is not one of {PICKUPS}")
    if cfg.in_flight not in IN_FLIGHT:
        bad("in_flight", f"{cfg.in_flight!r} is not one of {IN_FLIGHT}")
    if cfg.max_staleness < 0 or cfg.sync_every < 1 or cfg.pickup_steps < 1:
        bad("max_staleness / sync_every / pickup_steps", "need max_staleness >= 0, sync_every >= 1, pickup_steps >= 1")
    K = config.replay.updates_per_iteration
    if cfg.mode == "async" and K % cfg.sync_every and cfg.sync_every > cfg.max_staleness + 1:
        bad("sync_every", f"{cfg.sync_every}: a round would wait for weights the trainer only reaches after "
            f"training it (K={K} updates per round, max_staleness={cfg.max_staleness}); use a sync_every that "
            f"divides {K} or is at most max_staleness + 1")
    if cfg.rollout_devices < 0 or cfg.rollout_devices >= devices and cfg.rollout_devices:
        bad("rollout_devices", f"{cfg.rollout_devices}: use 0 (time-sliced) or 1..{devices - 1} of the {devices} "
            "devices, leaving the rest to train")
    if cfg.rollout_devices and cfg.mode != "async":
        bad("rollout_devices", f"{cfg.rollout_devices} needs pipeline.mode='async' (sync generates on every device)")
    if cfg.rollout_devices and processes > 1:
        _check_process_split(config, cfg, devices, processes)
    if cfg.pickup == "step" and not cfg.two_groups:
        bad("pickup", "'step' picks up weights while the rollout group decodes: it needs rollout_devices > 0")
    return cfg


def _check_process_split(config, cfg: PipelineConfig, devices: int, processes: int) -> None:
    if cfg.rollout_devices % processes:
        _bad("pipeline.rollout_devices",
             f"{cfg.rollout_devices} on {processes} processes of {devices // processes} devices "
             "each: every process gives the same number of its own devices to the rollout group (and keeps one "
             f"to train at least), so use a multiple of {processes} below {devices} (or 0: async time-sliced on "
             "every device)")
    prompts = config.data.prompts_per_iteration
    if prompts % processes:
        raise UserError(f"config.data.prompts_per_iteration: {prompts} does not split over the {processes} "
                        "processes' rollout groups (each generates its share of a round's prompts): use a "
                        f"multiple of {processes}")
    if algorithms.get(config.algorithm).filter_groups is not None:
        raise UserError(f"config.algorithm: {config.algorithm!r} samples dynamically (a round's size depends on "
                        "its rewards), which the processes' separate rollout groups cannot agree on: use "
                        "pipeline.rollout_devices=0 on several processes")


# ----------------------------------------------------------------------------- typed configs


def sequence_length(config) -> int:
    """Tokens of the longest trajectory: the prompt bucket of max_prompt_len + max_new_tokens."""
    return bucket_length(config.data.max_prompt_len, tuple(config.sampling.buckets)) + config.sampling.max_new_tokens


def row_length(config) -> int:
    """Tokens per packed row: config.row_tokens, or one sequence length."""
    return config.row_tokens or sequence_length(config)


def packing_budget(config, mesh) -> Budget:
    """How the update, the reference pass and the stale-reference recompute pack their rows."""
    return Budget(row_len=row_length(config), tokens_per_device=config.tokens_per_device,
                  micro_batches=config.micro_batches, devices=mesh.shape["data"] * mesh.shape["fsdp"],
                  max_segments=config.max_segments_per_row, max_segment_len=sequence_length(config))


def step_config(config) -> StepConfig:
    """What one update computes."""
    return StepConfig(
        loss=config.algorithm, beta=config.beta, stop_grad_v=config.stop_grad_v,
        grpo_aggregation=config.grpo.aggregation, clip_low=config.grpo.clip_low,
        clip_high=config.grpo.clip_high, dual_clip=config.grpo.dual_clip, is_cap=config.grpo.is_cap,
        max_response_length=config.sampling.max_new_tokens, chunk=config.chunk,
        temperature=config.sampling.temperature, exact_reference=config.exact_reference,
        max_segment_len=sequence_length(config),  # packing_budget refuses longer trajectories
    )


def optimizer_config(config) -> OptimizerConfig:
    return OptimizerConfig(**config.optimizer.to_dict())


def sampling_config(config, stop_ids, pad_id: int | None) -> SamplingConfig:
    """The training rounds' sampling; `stop_ids` and `pad_id` come from the tokenizer."""
    s = config.sampling
    return SamplingConfig(max_new_tokens=s.max_new_tokens, num_samples=s.num_samples, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, stop_ids=tuple(stop_ids), buckets=tuple(s.buckets),
                          pad_id=pad_id or 0)


def engine_config(config) -> EngineConfig | None:
    """The run config's `rollout.*` engine fields; None (generate's default: one slot per sample of a
    call) when `rollout.slots` is 0."""
    r = config.rollout
    if not r.get("slots", 0):
        return None
    return EngineConfig(slots=r.slots, page_size=r.page_size, cache_tokens=r.cache_tokens,
                        prefill_chunk=r.prefill_chunk, prefill_rows=max(1, min(r.slots, 64)),
                        decode_chunk=r.get("decode_chunk", 0))


@dataclasses.dataclass(frozen=True)
class LayoutSettings:
    """`config.rollout`'s layout fields: tensor-parallel size, storage dtype, bytes moved at a time."""

    tensor: int
    dtype: str
    chunk_bytes: int


def layout_settings(config) -> LayoutSettings:
    r = config.rollout
    if r.dtype not in ("", *DTYPES):
        raise UserError(f"config.rollout.dtype: {r.dtype!r} is not one of {DTYPES} ('' = model.dtype)")
    if r.chunk_mb < 1:
        raise UserError(f"config.rollout.chunk_mb: {r.chunk_mb} must be >= 1 (MiB moved at a time)")
    return LayoutSettings(int(r.tensor), r.dtype or config.model.dtype, int(r.chunk_mb) * 2**20)


def rollout_layout(config, devices, model_cfg=None) -> RolloutLayout:
    """The sampler's layout (reval_jax.rollout.layout) on `devices` (a mesh or a device list),
    validated against the model config."""
    s = layout_settings(config)
    return RolloutLayout(mesh=rollout_mesh(devices, s.tensor, model_cfg), dtype=s.dtype, chunk_bytes=s.chunk_bytes)


def eval_settings(config, stop_ids) -> EvalSettings:
    """What the evaluation samples; `eval.temperature` 0 means greedy (argmax) decoding."""
    _check_eval(config)
    greedy = config.eval.temperature == 0
    return EvalSettings(
        k=config.eval.k, temperature=1.0 if greedy else float(config.eval.temperature), greedy=greedy,
        max_new_tokens=config.eval.max_new_tokens or config.sampling.max_new_tokens,
        stop_ids=tuple(stop_ids), buckets=tuple(config.sampling.buckets), seed=config.seed,
        prompts_per_call=max(1, (config.sampling.batch_size or 1024) // config.eval.k),
        engine=engine_config(config),
    )


# ----------------------------------------------------------------------------- the run's settings


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`config.model`: where the policy's weights are and how it computes."""

    path: str
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "full"
    attention: str = "auto"
    scan_layers: bool = True
    ref_dtype: str | None = None  # None: the reference is stored like the parameters
    lora: LoraConfig | None = None  # adapters on the loaded model (config.lora); None: full fine-tuning
    seed: int = 0  # of the adapters' initialisation


def model_settings(config) -> ModelSettings:
    m = config.model
    return ModelSettings(path=m.path, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                         attention=m.get("attention", "auto"), scan_layers=bool(m.get("scan_layers", True)),
                         ref_dtype=m.ref_dtype or None, lora=lora_settings(config), seed=config.seed)


def lora_settings(config) -> LoraConfig | None:
    """`config.lora` as a LoraConfig (None for rank 0: full fine-tuning), checked: a rank >= 0, the
    reference stored by the run only without adapters, and a scale alpha / rank that the compute
    dtype holds exactly (the forward multiplies by the scale in the compute dtype, a merge by the
    exact one: they must agree for calibrated initialisation to stay exact across resets)."""
    lo = config.get("lora")
    if lo is None or lo.rank == 0:
        return None
    if lo.rank < 0:
        _bad("lora.rank", f"{lo.rank} must be >= 0 (0 = full fine-tuning, no adapters)")
    if config.model.ref_dtype:
        _bad("model.ref_dtype", f"{config.model.ref_dtype!r} does not apply with lora.rank > 0: the reference "
             "of a LoRA run is the base itself (no copy); set it to '' (store the base with lora.base_dtype)")
    alpha = float(lo.alpha) or 2.0 * lo.rank
    scale = alpha / lo.rank
    if float(jnp.asarray(scale, jnp.dtype(config.model.dtype))) != scale:
        _bad("lora.alpha", f"{alpha:g} gives a scale alpha / rank = {scale:g} that {config.model.dtype} does not "
             f"hold exactly; choose alpha = rank times a power of two (e.g. {2 * lo.rank} for scale 2)")
    return LoraConfig(rank=int(lo.rank), alpha=alpha, targets=tuple(lo.targets), base_dtype=lo.base_dtype or None)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training prompts and the evaluation benchmarks (reval_jax.data.prompts)."""

    train_files: tuple[str, ...]
    template: str
    max_prompt_len: int
    prompts_per_iteration: int
    seed: int
    problem_key: str = "problem"
    answer_key: str = "answer"
    strict: bool = False
    enable_thinking: bool | None = None
    eval_files: tuple[str, ...] = ()  # the benchmarks (evaluated every eval.every iterations, if > 0)
    eval_limit: int = 0


def data_settings(config) -> DataSettings:
    d = config.data
    return DataSettings(train_files=tuple(d.train_files), template=d.template, max_prompt_len=d.max_prompt_len,
                        prompts_per_iteration=d.prompts_per_iteration, seed=config.seed, problem_key=d.problem_key,
                        answer_key=d.answer_key, strict=d.strict, enable_thinking=d.get("enable_thinking"),
                        eval_files=tuple(config.eval.files), eval_limit=config.eval.limit)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    name: str
    template: str
    num_workers: int
    timeout_s: float


def reward_settings(config) -> RewardSettings:
    r = config.reward
    return RewardSettings(r.name, config.data.template, r.num_workers, r.timeout_s)


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The environment of multi-turn episodes (reval_jax.env); name "single_turn": none, one turn."""

    name: str
    config: EnvConfig

    @property
    def multi_turn(self) -> bool:
        return self.name != "single_turn"


def env_settings(config, processes: int = 1) -> EnvSettings:
    e = config.env
    if e.max_turns < 1:
        _bad("env.max_turns", f"{e.max_turns} must be >= 1")
    if e.max_output_chars < 1:
        _bad("env.max_output_chars", f"{e.max_output_chars} must be >= 1")
    if min(e.sandbox_workers, e.sandbox_timeout_s, e.sandbox_memory_mb) <= 0:
        _bad("env.sandbox_workers", "env.sandbox_workers, sandbox_timeout_s and sandbox_memory_mb must be > 0")
    resolve_environment(e.name)  # an unknown name or a bad "module:Class" path: one line naming it
    if e.name != "single_turn" and processes > 1:
        _bad("env.name", f"multi-turn episodes ({e.name!r}) run in one process so far; use one process per run")
    sandbox = SandboxConfig(timeout_s=float(e.sandbox_timeout_s), cpu_s=max(1, math.ceil(e.sandbox_timeout_s)),
                            memory_mb=int(e.sandbox_memory_mb), workers=int(e.sandbox_workers),
                            site_packages=bool(e.sandbox_site_packages))
    return EnvSettings(e.name, EnvConfig(max_turns=e.max_turns, max_tokens=config.sampling.max_new_tokens,
                                         max_output_chars=e.max_output_chars, sandbox=sandbox))


@dataclasses.dataclass(frozen=True)
class ReplaySettings:
    """The replay buffer (reval_jax.data.replay) and how the K updates of a round draw from it."""

    capacity: int
    seq_len: int
    seed: int
    prioritized: bool
    alpha: float
    beta_is: float


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What Algorithm 1's loop needs (reval_jax.run.trainer)."""

    num_iterations: int
    updates_per_round: int  # K
    update_batch: int  # trajectories per update
    on_policy_first: bool  # the first update of a round trains the fresh round; the others draw from the buffer
    reset_every: int  # R: π_ref ← π_θ every R updates (0: never)
    flush_on_reset: bool  # empty the buffer on a reset (else its reference terms are recomputed when drawn)
    prioritized: bool  # update the buffer's priorities with |δ|
    stores_reference: bool  # reference terms are stored with the rollouts (and recomputed when stale)
    max_skipped_in_a_row: int
    fresh_priority_from_delta: bool = False  # the fresh round's priorities: its on-policy update's |δ| (else the max)


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """What the round producer needs (reval_jax.run.producer)."""

    prompts_per_round: int  # global, all processes
    prompts_per_call: int  # prompts per sampler call (samples are keyed by prompt id: chunking changes nothing)
    seed: int
    seq_len: int  # trajectories are padded to it
    num_iterations: int
    shares: bool = False  # each process generates its share of a round (two groups on several processes)
    pickup_steps: int = 0  # decode steps between checks for new weights (0: no step pickup)
    in_flight: str = "continue"
    progress: bool = False
    max_extra_calls: int = 0  # dynamic sampling: extra generation calls at most to fill a round


RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (raw, group_id, lengths) [B] -> reward [B]
GroupFilter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (raw [B], group_id [B]) -> keep [B] bool
Advantages = Callable[[object], "np.ndarray | None"]  # update batch (Trajectories) -> advantages [B] or None


@dataclasses.dataclass(frozen=True)
class Rewarding:
    """How a round's verifier scores become its training rewards: the algorithm's reward (its
    shaping from the response lengths, then reward.transform within each prompt group) and its
    group filter (dynamic sampling; None: every group is trained on)."""

    rewards: RewardFn
    filter_groups: GroupFilter | None = None


def rewarding(config) -> Rewarding:
    alg = algorithms.get(config.algorithm)
    return Rewarding(functools.partial(alg.rewards, config=config), alg.filter_groups)


@dataclasses.dataclass(frozen=True)
class HookSchedule:
    """When the hooks act: metrics every `log_every`, evaluation every `eval_every` (0: never),
    checkpoints every `checkpoint_every` iterations (and at the last one, and on a stop)."""

    log_every: int
    eval_every: int
    eval_k: int
    stop_at: float
    checkpoint_every: int
    checkpoint_keep: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Every part's typed slice of one validated run config."""

    algorithm: str
    model: ModelSettings
    mesh: tuple[int, ...]
    data: DataSettings
    reward: RewardSettings
    env: EnvSettings
    replay: ReplaySettings
    step: StepConfig
    optimizer: OptimizerConfig
    pipeline: PipelineConfig
    engine: EngineConfig | None
    loop: LoopConfig
    rounds: RoundConfig
    rewarding: Rewarding
    advantages: Advantages  # the algorithm's advantages of an update batch (None: its loss takes none)
    hooks: HookSchedule
    compile_cache: str
    wandb_project: str
    progress: bool


def run_settings(config, devices: int, processes: int = 1) -> RunSettings:
    """The typed settings of a config that `prepare` has validated, for `devices` in `processes`."""
    pipe = pipeline_config(config, devices, processes)
    step = step_config(config)
    seq_len = sequence_length(config)
    rollouts = config.data.prompts_per_iteration * config.sampling.num_samples
    return RunSettings(
        algorithm=config.algorithm, model=model_settings(config), mesh=tuple(config.mesh),
        data=data_settings(config),
        reward=reward_settings(config),
        env=env_settings(config, processes),
        replay=ReplaySettings(config.replay.capacity, seq_len, config.seed, config.replay.prioritized,
                              config.replay.alpha, config.replay.beta_is),
        step=step, optimizer=optimizer_config(config), pipeline=pipe, engine=engine_config(config),
        loop=_loop_config(config, step, rollouts), rounds=_round_config(config, pipe, processes, seq_len),
        rewarding=rewarding(config), advantages=algorithms.get(config.algorithm).batch_advantages,
        hooks=HookSchedule(config.log_every, config.eval.every, config.eval.k, config.eval.stop_at,
                           config.checkpoint.every, config.checkpoint.keep, config.checkpoint.async_save),
        compile_cache=config.compile_cache, wandb_project=config.wandb_project, progress=config.progress,
    )


def _loop_config(config, step: StepConfig, rollouts: int) -> LoopConfig:
    r = config.replay
    return LoopConfig(
        num_iterations=config.num_iterations, updates_per_round=r.updates_per_iteration,
        update_batch=r.batch_size or rollouts, on_policy_first=r.schedule == "on_policy_first",
        reset_every=config.reference.reset_every, flush_on_reset=r.on_reset == "flush", prioritized=r.prioritized,
        fresh_priority_from_delta=r.prioritized and r.get("fresh_priority", "max") == "delta",
        # with exact_reference the update computes both sides of δ itself and never reads stored terms
        stores_reference=step.uses_reference and not step.exact_reference,
        max_skipped_in_a_row=config.max_skipped_in_a_row,
    )


def prompts_per_call(config) -> int:
    """Prompts per sampler call: sampling.batch_size rollouts' worth, or the whole round."""
    s = config.sampling
    return max(1, s.batch_size // s.num_samples) if s.batch_size else config.data.prompts_per_iteration


def _round_config(config, pipe: PipelineConfig, processes: int, seq_len: int) -> RoundConfig:
    return RoundConfig(
        prompts_per_round=config.data.prompts_per_iteration, prompts_per_call=prompts_per_call(config),
        seed=config.seed,
        seq_len=seq_len, num_iterations=config.num_iterations,
        shares=pipe.two_groups and processes > 1, pickup_steps=pipe.pickup_steps if pipe.pickup == "step" else 0,
        in_flight=pipe.in_flight, progress=config.progress,
        max_extra_calls=config.dapo.max_extra_generations if "dapo" in config else 0,
    )
