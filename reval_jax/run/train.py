"""The training run (paper Algorithm 1), top to bottom in `run(config, workdir)`.

    python -m reval_jax.train --config=configs/qwen7b.py [--config.beta=0.05 ...] [--workdir=DIR]

Each iteration: prompts -> sampler -> reward -> replay buffer -> K updates (on-policy first, then
buffer draws; or buffer only) -> reference reset every R updates -> metrics -> periodic evaluation.
The sampler and the evaluation read a copy of the policy in the rollout layout (config.rollout.*,
reval_jax/rollout/layout.py), built from the master weights before they run and freed after.
Where a round's rollouts come from is the pipeline's (config.pipeline.*, reval_jax/run/pipeline.py):
generated at the top of the iteration (sync, the default), or ahead of time under a policy at most
`pipeline.max_staleness` updates older (async: time-sliced on every device, or on a rollout device
group while the others train); the loop body is the same, it takes round i from the pipeline.
The algorithm (reval | tbrm | regression | grpo) is one config field; `ALGORITHM_DEFAULTS` sets
what each baseline implies (TBRM: fixed reference, 0/1 reward, on-policy; GRPO: fresh rollouts
every update; regression: the centered reward of Eq. 8), unless `config.algorithm_defaults` is False,
in which case `check_config` refuses a regression run without the centered reward and a GRPO run
with more than one update per round (old log-probs are not stored: ρ ≡ 1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from reval_jax.data.batch import Trajectories, concatenate
from reval_jax.data.replay import ReplayBuffer
from reval_jax.errors import UserError
from reval_jax.objective.losses import LOSSES, REWARD_TRANSFORMS, LossNorm, grpo_advantages, transform_rewards
from reval_jax.objective.packing import Budget, pack
from reval_jax.objective.train_step import (
    OptimizerConfig,
    StepConfig,
    Updater,
    init_state,
    make_optimizer,
    reset_reference,
    state_sharding,
)
from reval_jax.parallel import distributed
from reval_jax.parallel.distributed import all_gather_rows, process_share, to_host
from reval_jax.rollout.engine import engine_config
from reval_jax.rollout.layout import layout_from_config
from reval_jax.rollout.sampler import SamplingConfig, bucket_length, generate
from reval_jax.run.pipeline import Clock, Round, device_groups, make_pipeline, pipeline_config
from reval_jax.run.policy import load_hf_policy, make_run_mesh

ALGORITHM_DEFAULTS = {
    "reval": {},
    "regression": {"reward.transform": "centered"},  # Eq. 8: r̂ = r − mean_group(r), nothing else
    "tbrm": {"reward.transform": "binary", "reference.reset_every": 0,
             "replay.updates_per_iteration": 1, "replay.schedule": "on_policy_first"},
    "grpo": {"replay.updates_per_iteration": 1, "replay.schedule": "on_policy_first"},
}
TRAIN_ECHO = ("accuracy", "loss", "delta_abs_max", "kl_mean", "grad_norm", "response_length",
              "generate_s", "update_s", "staleness_max")


# ----------------------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a config that cannot run, naming the field and what to do."""
    def bad(field, msg):
        raise UserError(f"config.{field}: {msg}")

    if config.algorithm not in LOSSES:
        bad("algorithm", f"{config.algorithm!r} is not one of {sorted(LOSSES)}")
    if config.reward.transform not in REWARD_TRANSFORMS:
        bad("reward.transform", f"{config.reward.transform!r} is not one of {REWARD_TRANSFORMS}")
    if config.replay.schedule not in ("on_policy_first", "buffer_only"):
        bad("replay.schedule", f"{config.replay.schedule!r}: use on_policy_first or buffer_only")
    if config.algorithm == "regression" and config.reward.transform != "centered":
        bad("reward.transform", f"{config.reward.transform!r}: the regression variant (Eq. 8) is defined "
            "with r̂ = r − group mean; use 'centered' (algorithm_defaults=True sets it)")
    if config.algorithm == "grpo" and config.replay.updates_per_iteration > 1:
        bad("replay.updates_per_iteration", f"{config.replay.updates_per_iteration}: GRPO does not store the "
            "old log-probs (its ratio is 1, the clip never acts), so it takes one update per round; use 1")
    if config.replay.on_reset not in ("recompute", "flush"):
        bad("replay.on_reset", f"{config.replay.on_reset!r}: use recompute or flush")
    if not config.model.path:
        bad("model.path", "empty: point it at a local Hugging Face directory")
    if not Path(config.model.path).is_dir():
        bad("model.path", f"{config.model.path!r} is not a directory (a local HF checkpoint)")
    for f in list(config.data.train_files) + list(config.eval.files if config.eval.every else ()):
        if not Path(f).exists():
            bad("data.train_files / eval.files", f"{f!r} does not exist")
    for field in ("num_iterations", "data.prompts_per_iteration", "sampling.num_samples",
                  "sampling.max_new_tokens", "replay.capacity", "replay.updates_per_iteration"):
        value = functools.reduce(getattr, field.split("."), config)
        if value < 1:
            bad(field, f"{value} must be >= 1")
    if config.beta <= 0:
        bad("beta", f"{config.beta} must be > 0")
    rollouts = config.data.prompts_per_iteration * config.sampling.num_samples
    batch = config.replay.batch_size or rollouts
    if batch > config.replay.capacity:
        bad("replay.batch_size", f"{batch} trajectories per update exceed replay.capacity {config.replay.capacity}")
    if config.replay.schedule == "on_policy_first" and batch != rollouts:
        bad("replay.batch_size", f"{batch} must equal prompts × samples = {rollouts} with on_policy_first")
    if config.tokens_per_device < 0 or config.micro_batches < 0:
        bad("tokens_per_device / micro_batches", "must be >= 0")
    if not (config.tokens_per_device or config.micro_batches):
        bad("tokens_per_device", "0 with micro_batches 0: set a token budget per device (or micro_batches)")
    row_len = row_length(config)
    if config.row_tokens and config.row_tokens < sequence_length(config):
        bad("row_tokens", f"{config.row_tokens} cannot hold the longest trajectory of {sequence_length(config)} "
            "tokens (prompt bucket + sampling.max_new_tokens): raise it, or 0 for one sequence per row")
    if config.tokens_per_device and not config.micro_batches and config.tokens_per_device < row_len:
        bad("tokens_per_device", f"{config.tokens_per_device} tokens do not hold one packed row of {row_len} "
            f"(prompt bucket + sampling.max_new_tokens): raise it to at least {row_len}, ideally a multiple")
    if config.max_segments_per_row < 1:
        bad("max_segments_per_row", f"{config.max_segments_per_row} must be >= 1")


def apply_algorithm_defaults(config: ml_collections.ConfigDict) -> list[str]:
    """Sets what the chosen baseline implies; returns the changes made (for the log)."""
    changes = []
    if not config.get("algorithm_defaults", True):
        return changes
    for field, value in ALGORITHM_DEFAULTS.get(config.algorithm, {}).items():
        *parents, leaf = field.split(".")
        node = functools.reduce(getattr, parents, config)
        if getattr(node, leaf) != value:
            changes.append(f"{field}: {getattr(node, leaf)!r} -> {value!r}")
            with config.unlocked():
                setattr(node, leaf, value)
    return changes


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
                  max_segments=config.max_segments_per_row)


def enable_compile_cache(config, workdir: Path) -> None:
    """JAX's persistent compilation cache under the workdir (config.compile_cache), unless one is
    already configured (JAX_COMPILATION_CACHE_DIR): restarts then skip recompiling."""
    if not config.compile_cache or jax.config.jax_compilation_cache_dir:
        return
    path = Path(config.compile_cache)
    jax.config.update("jax_compilation_cache_dir", str(path if path.is_absolute() else workdir / path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def step_config(config) -> StepConfig:
    return StepConfig(
        loss=config.algorithm, beta=config.beta, stop_grad_v=config.stop_grad_v,
        grpo_aggregation=config.grpo.aggregation, clip_low=config.grpo.clip_low,
        clip_high=config.grpo.clip_high, dual_clip=config.grpo.dual_clip, is_cap=config.grpo.is_cap,
        max_response_length=config.sampling.max_new_tokens, chunk=config.chunk,
        temperature=config.sampling.temperature, exact_reference=config.exact_reference,
    )


def progress_line(iteration: int, total: int, durations: list[float]) -> str:
    """`iteration i/N (3.2s; about 4m10s left)`: the estimate averages the iterations run so far,
    leaving out the first (it compiles) once there are others."""
    steady = durations[1:] or durations
    left = round(float(np.mean(steady)) * (total - iteration))
    eta = f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"
    return f"iteration {iteration}/{total} ({durations[-1]:.1f}s; about {eta} left)"


# ----------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains as `config` says, writing metrics (and checkpoints) under `workdir`. Returns the
    last iteration's train metrics."""
    from reval_jax.data.prompts import prompt_batches
    from reval_jax.data.rewards import RewardScorer, RewardStats
    from reval_jax.data.templates import stop_token_ids
    from reval_jax.run.checkpoint import Checkpointer, config_differences
    from reval_jax.run.evaluate import evaluate, load_benchmarks, score_rollout, settings_from_config
    from reval_jax.run.metrics import MetricsWriter

    changes = apply_algorithm_defaults(config)
    check_config(config)
    for c in changes:
        print(f"algorithm {config.algorithm} implies {c}")
    # nothing is written to the workdir before the model, the data and the evaluation sets have
    # loaded: a start that fails its checks leaves an existing run's record as it was (only the
    # compilation cache, config.compile_cache, may gain entries)
    enable_compile_cache(config, Path(workdir))

    # --- devices: all of them train and generate in turn, or (async, two groups) the first
    # pipeline.rollout_devices generate while the others train (reval_jax/run/pipeline.py)
    pipe_cfg = pipeline_config(config, len(jax.devices()), jax.process_count())
    rollout_devices, train_devices = device_groups(pipe_cfg)  # rollout: this process's own
    mesh = make_run_mesh(config, train_devices)
    # two groups on several processes: each process's rollout group generates its share of a round
    shares = pipe_cfg.two_groups and jax.process_count() > 1

    # --- model, optimizer, state
    policy, tokenizer = load_hf_policy(config, mesh)
    # the sampler's layout (reval_jax.rollout.layout): built from the master weights once per round
    # (evaluation always samples on the training devices)
    eval_layout = layout_from_config(config, mesh, policy.cfg)
    rollout_layout = layout_from_config(config, rollout_devices, policy.cfg) if rollout_devices else eval_layout
    engine = engine_config(config)  # the rollout engine's slots and KV cache (None: one slot per sample)
    graphdef, params = nnx.split(policy)
    optimizer = make_optimizer(OptimizerConfig(**config.optimizer.to_dict()))
    state = init_state(params, optimizer, ref_dtype=config.model.ref_dtype or None)
    state = jax.device_put(state, state_sharding(state, optimizer, mesh))  # one layout from the start
    del policy, params
    step_cfg = step_config(config)
    stops = tuple(stop_token_ids(tokenizer))
    sampling = SamplingConfig(
        max_new_tokens=config.sampling.max_new_tokens, num_samples=config.sampling.num_samples,
        temperature=config.sampling.temperature, top_k=config.sampling.top_k,
        top_p=config.sampling.top_p, stop_ids=stops, buckets=tuple(config.sampling.buckets),
        pad_id=tokenizer.pad_token_id or 0,
    )
    seq_len = sequence_length(config)
    rollouts = config.data.prompts_per_iteration * sampling.num_samples
    update_batch = config.replay.batch_size or rollouts
    # prompts per sampler call (sampling.batch_size rollouts); samples are keyed by prompt id, so
    # chunking does not change them
    prompts_per_call = max(1, config.sampling.batch_size // sampling.num_samples) if config.sampling.batch_size \
        else config.data.prompts_per_iteration
    # reference terms stored with the rollouts (and recomputed when stale); with exact_reference the
    # update computes both sides of δ itself (train_step, exact calibration) and never reads them
    stores_reference = step_cfg.uses_reference and not step_cfg.exact_reference
    budget = packing_budget(config, mesh)
    updater = Updater(graphdef, optimizer, step_cfg, mesh, state)

    def fill_reference(batch: Trajectories) -> Trajectories:
        """Reference terms under the current reference, packed by the token budget like the update."""
        micro, layout = pack(batch, budget)
        logps, vs = updater.reference(state.ref_params, micro)
        return batch.replace(ref_logp=layout.unpack_tokens(logps), ref_v=layout.gather(vs).astype(np.float32),
                             ref_version=np.full(batch.batch_size, int(state.ref_version), np.int32))

    def recompute(stale: Trajectories):
        filled = fill_reference(stale)
        return filled.ref_logp, filled.ref_v

    def update(state, train_batch: Trajectories, weights: np.ndarray):
        advantages = grpo_advantages(train_batch.raw_reward, train_batch.group_id) \
            if config.algorithm == "grpo" else None
        micro, layout = pack(train_batch, budget, weights=weights, advantages=advantages)
        norm = LossNorm.for_batch(train_batch, step_cfg.max_response_length)
        return updater.update(state, micro, layout, norm)

    # --- data, rewards, replay, evaluation
    data_iter, data_stats = prompt_batches(
        list(config.data.train_files), tokenizer, config.data.template, config.data.max_prompt_len,
        config.data.prompts_per_iteration, config.seed, problem_key=config.data.problem_key,
        answer_key=config.data.answer_key, strict=config.data.strict,
        enable_thinking=config.data.get("enable_thinking"))  # every process reads the same batch
    benchmarks = {}
    if config.eval.every:
        benchmarks = load_benchmarks(list(config.eval.files), tokenizer, config.data.template,
                                     limit=config.eval.limit, seed=config.seed,
                                     max_prompt_len=config.data.max_prompt_len,
                                     problem_key=config.data.problem_key,
                                     answer_key=config.data.answer_key, strict=config.data.strict,
                                     enable_thinking=config.data.get("enable_thinking"))
    buffer = ReplayBuffer(config.replay.capacity, seq_len, seed=config.seed,
                          prioritized=config.replay.prioritized, alpha=config.replay.alpha,
                          beta_is=config.replay.beta_is, pad_id=sampling.pad_id)
    scorer = RewardScorer(config.reward.name, template=config.data.template,
                          num_workers=config.reward.num_workers, timeout_s=config.reward.timeout_s)
    eval_settings = settings_from_config(config, stops)

    # --- the run's record: everything above loaded, so this start is valid
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_config = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(json_config, indent=2))
    writer = MetricsWriter(workdir, wandb_project=config.wandb_project, config=config.to_dict(),
                           enabled=jax.process_index() == 0)

    def run_eval(iteration: int):
        start = time.perf_counter()
        model = eval_layout(graphdef, state.params)  # the rollout copy, freed on return
        results = evaluate(model, tokenizer, benchmarks, eval_settings, scorer, progress=config.progress)
        del model
        results["eval_s"] = time.perf_counter() - start
        writer.write("eval", iteration, results, echo=(f"avg@{config.eval.k}",))
        return results[f"avg@{config.eval.k}"]

    # --- generation: one round of prompts -> sampler -> rewards, on whichever side the pipeline runs it
    def produce(iteration: int, model, version: int, weights=None) -> Round:
        """Round `iteration` sampled by `model` (the policy at `version`, in the rollout layout);
        `weights` lets newer pushes in between decode calls (two-group async, step pickup)."""
        t0 = time.perf_counter()
        examples = next(data_iter)  # the round's prompts, the same on every process
        base_id = iteration * config.data.prompts_per_iteration
        if shares:
            mine = process_share(len(examples))
            examples, base_id = examples[mine], base_id + mine.start
        parts, raws, truncated = [], [], []
        for start_row in tqdm(range(0, len(examples), prompts_per_call), desc=f"generate {iteration}",
                              disable=not config.progress or len(examples) <= prompts_per_call, leave=False):
            chunk = examples[start_row : start_row + prompts_per_call]
            rollout = generate(model, [e.prompt_ids for e in chunk], sampling, engine=engine,
                               seed=(config.seed * 1_000_003 + iteration) % 2**32,
                               prompt_ids=[base_id + start_row + j for j in range(len(chunk))],
                               version=version, weights=weights, max_steps=pickup_steps,
                               in_flight=pipe_cfg.in_flight)
            raws.append(score_rollout(scorer, tokenizer, rollout, [e.answer for e in chunk], shared=not shares))
            truncated.append(to_host(rollout.truncated))
            parts.append(rollout.to_trajectories(iteration=iteration, pad_id=sampling.pad_id).pad_to(seq_len))
            if weights is not None:  # the next call starts under the newest weights taken so far
                version, model = pipe.in_use()
        batch, raw = concatenate(parts), np.concatenate(raws)
        reward = transform_rewards(raw, np.asarray(batch.group_id), config.reward.transform)
        batch = batch.replace(raw_reward=raw, reward=np.asarray(reward, np.float32))
        return Round(iteration, batch, np.concatenate(truncated), time.perf_counter() - t0, local=shares)

    def gather_round(r: Round) -> Round:
        """Every process's share of round r (prompt-major rows) put together, on the training devices."""
        n = rollouts
        whole = {k: all_gather_rows(v, n, train_devices) for k, v in r.batch.to_numpy().items()}
        seconds = all_gather_rows(np.asarray([r.generate_s]), jax.process_count(), train_devices)
        return Round(r.iteration, Trajectories.from_numpy(whole), all_gather_rows(r.truncated, n, train_devices),
                     float(seconds.max()))

    pickup_steps = pipe_cfg.pickup_steps if pipe_cfg.pickup == "step" else 0
    clock = Clock()
    pipe = make_pipeline(pipe_cfg, config.replay.updates_per_iteration, config.num_iterations, produce,
                         lambda s: rollout_layout(graphdef, s.params), clock, gather=gather_round)

    # --- resume from the newest loadable checkpoint, if any
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    restored = ckpt.restore_latest(state, {**buffer.state_dict(), **pipe.state_dict()})
    start = 1
    if restored is None:
        writer.write("data", 0, {k: v for k, v in vars(data_stats).items() if k != "files"},
                     echo=("kept", "skipped_missing", "dropped_too_long"))
    else:
        state, start = restored.state, restored.iteration + 1
        buffer.load_state_dict(restored.buffer)
        pipe.load_state_dict(restored.buffer)
        if pipe.queue and pipe_cfg.mode == "sync":
            raise UserError(f"checkpoint {restored.iteration} in {ckpt.directory} was written by an asynchronous run "
                            f"with rounds {sorted(pipe.queue)} generated ahead: resume it with "
                            "--config.pipeline.mode=async")
        for i, rnd in pipe.queue.items():  # generated under the checkpoint's bound: refused if over this one's
            over = staleness_of(rnd.batch, (i - 1) * config.replay.updates_per_iteration).max(initial=0)
            if over > pipe_cfg.max_staleness:
                raise UserError(f"checkpoint {restored.iteration} in {ckpt.directory} holds round {i} generated "
                                f"{over} updates ahead of its training, over pipeline.max_staleness="
                                f"{pipe_cfg.max_staleness}: resume with --config.pipeline.max_staleness={over} "
                                "or more (or from an earlier checkpoint)")
        data_iter.set_state(restored.meta["data"])
        scorer.restore_stats(RewardStats(**restored.meta["verifier"]))
        dropped = writer.rewind(restored.iteration)  # metrics.jsonl and TensorBoard events
        print(f"resumed from checkpoint {restored.iteration} in {ckpt.directory} "
              f"({dropped} later metric records dropped)")
        for diff in config_differences(restored.meta["config"], json_config):
            print(f"warning: config differs from the checkpoint's: {diff}")

    def save(iteration: int):
        pipe.quiesce()  # the rounds generated ahead, and the data position after them, at one point
        meta = {"data": data_iter.get_state(), "verifier": dataclasses.asdict(scorer.stats),
                "config": json_config}
        ckpt.save(iteration, state, {**buffer.state_dict(), **pipe.state_dict()}, meta)

    # --- SIGTERM / SIGINT: finish the iteration, checkpoint, exit (a second SIGINT aborts)
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signum)
        print(f"received {signal.Signals(signum).name}: checkpointing after this iteration, then stopping")

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    last: dict[str, float] = {}
    durations: list[float] = []
    if start > config.num_iterations:
        print(f"{workdir} is a finished run (checkpoint {start - 1}, num_iterations={config.num_iterations}): "
              f"nothing to train. Delete {workdir} for a fresh run, or raise --config.num_iterations to go on.")
    try:
        if config.eval.every and restored is None:
            print("evaluating the initial policy (the first sampler call compiles: slow)", flush=True)
            run_eval(0)
        if start <= config.num_iterations:
            pipe.start(state, start)  # async: generates (or starts generating) the rounds due now
        window = time.perf_counter()
        for iteration in range(start, config.num_iterations + 1):
            ckpt.poll()  # a failed background write of the last checkpoint stops the run here
            # --- this round's rollouts: generated now (sync: from the policy after the last round's
            # updates, in the rollout layout and dtype), or ahead of time under an older policy (async)
            t0 = time.perf_counter()
            if iteration == start:
                print(f"iteration {iteration}/{config.num_iterations}: compiling the sampler and the train step "
                      "(the first iteration is slow)", flush=True)
            rnd = pipe.take(iteration, state)
            batch, truncated, generate_s = rnd.batch, rnd.truncated, rnd.generate_s
            raw, reward = np.asarray(batch.raw_reward), np.asarray(batch.reward)
            lengths = np.asarray(batch.response_mask).sum(1)
            staleness = staleness_of(batch, int(state.step))
            if stores_reference:
                batch = fill_reference(batch)
            buffer.add(batch)

            # --- K updates: on-policy first (or buffer only), reference reset every R updates
            t1 = time.perf_counter()
            update_metrics, update_staleness = [], []
            for k in range(config.replay.updates_per_iteration):
                if k == 0 and config.replay.schedule == "on_policy_first":
                    train_batch, weights, indices = batch, np.ones(update_batch, np.float32), None
                else:
                    sample = buffer.sample(update_batch, iteration=iteration,
                                           ref_version=int(state.ref_version) if stores_reference else None,
                                           recompute_fn=recompute if stores_reference else None)
                    train_batch, weights, indices = sample.batch, sample.weights, sample.indices
                update_staleness.append(staleness_of(train_batch, int(state.step)))
                with clock.busy("train"):
                    state, m = update(state, train_batch, weights)
                if indices is not None and config.replay.prioritized:
                    buffer.update_priorities(indices, m["abs_delta"])
                update_metrics.append({k: v for k, v in m.items() if np.ndim(v) == 0})
                if int(state.skipped_in_a_row) >= config.max_skipped_in_a_row:
                    ckpt.wait()  # every step on disk was saved from a finite state (or verified)
                    raise RuntimeError(
                        f"stopping at iteration {iteration}: {int(state.skipped_in_a_row)} updates in a row had a "
                        f"non-finite loss or gradient (config.max_skipped_in_a_row={config.max_skipped_in_a_row}). "
                        f"The last good checkpoint ({ckpt.last_good() or 'none'}) in "
                        f"{ckpt.directory} is kept; check beta, the learning rate and the rewards.")
                if config.reference.reset_every and int(state.step) % config.reference.reset_every == 0 \
                        and not m["skipped"]:
                    state = reset_reference(state)
                    if config.replay.on_reset == "flush":
                        buffer.flush()
                pipe.updated(state)  # async: rounds whose weights have come are generated / pushed
            update_s = time.perf_counter() - t1

            # --- metrics
            last = {k: float(np.mean([u[k] for u in update_metrics])) for k in update_metrics[0]}
            last.update(
                reward_mean=float(np.mean(reward)), accuracy=float(np.mean(raw)),
                response_length=float(np.mean(lengths)),
                truncation_rate=float(np.mean(truncated)),
                generate_s=generate_s, update_s=update_s,
                generate_tokens_per_s=float(lengths.sum()) / max(generate_s, 1e-9),
                updates=int(state.step), skipped_total=int(state.skipped),
                ref_version=int(state.ref_version), verifier_timeouts=scorer.stats.timeouts,
                verifier_errors=scorer.stats.errors,
                staleness_mean=float(staleness.mean()), staleness_max=float(staleness.max()),
                update_staleness_mean=float(np.mean(np.concatenate(update_staleness))),
                update_staleness_max=float(np.max(np.concatenate(update_staleness))),
                rounds_ahead=len(pipe.queue),
                **{f"buffer_{k}": v for k, v in buffer.stats().items()},
                **clock.window(window, time.perf_counter()),
            )
            window = time.perf_counter()
            last["iteration"] = iteration
            if iteration % config.log_every == 0 or iteration == config.num_iterations:
                writer.write("train", iteration, last, echo=TRAIN_ECHO)
            reached = False
            if config.eval.every and (iteration % config.eval.every == 0 or iteration == config.num_iterations):
                score = run_eval(iteration)
                reached = config.eval.stop_at > 0 and score >= config.eval.stop_at
            if iteration % config.checkpoint.every == 0 or iteration == config.num_iterations or stop_signal \
                    or reached:
                save(iteration)
            durations.append(time.perf_counter() - t0)
            print(progress_line(iteration, config.num_iterations, durations), flush=True)
            if stop_signal:
                print(f"stopped after iteration {iteration}; rerun the same command to resume")
                break
            if reached:
                print(f"evaluation reached eval.stop_at={config.eval.stop_at} at iteration {iteration}; done")
                break
        ckpt.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        pipe.close()
        ckpt.close()
        scorer.close()
        writer.close()
    return last


def staleness_of(batch: Trajectories, version: int) -> np.ndarray:
    """[B] updates between the oldest policy a trajectory's response was sampled under and
    `version`, the policy it is trained at (0 for a trajectory without recorded versions)."""
    v = np.asarray(batch.sampler_version)
    none = np.iinfo(np.int32).max
    oldest = np.where(np.asarray(batch.response_mask) & (v >= 0), v, none).min(1)
    return np.where(oldest == none, 0, version - oldest).astype(np.int64)


def default_workdir(config_file: str) -> str:
    """runs/<config file stem>: `configs/tiny.py` (or `configs/tiny.py:arg`) -> `runs/tiny`."""
    return os.path.join("runs", Path(config_file.split(":", 1)[0]).stem)


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    FLAGS = flags.FLAGS
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    print(f"workdir {workdir}")
    run(FLAGS.config, workdir)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from reval_jax.run import cli

    config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", "", "Where metrics, checkpoints and plots go (default runs/<config>).")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run "
                        "(auto-detected on TPU pods and under SLURM).")
    flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
    flags.mark_flags_as_required(["config"])
    cli.run_absl(main)
