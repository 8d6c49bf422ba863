"""The training run (paper Algorithm 1): `run(config, workdir)` builds every part from one validated
run config, then hands them to the trainer (reval_jax/run/trainer.py).

    python -m reval_jax.train --config=configs/qwen7b.py [--config.beta=0.05 ...] [--workdir=DIR]

Each iteration: prompts -> sampler -> reward -> replay buffer -> K updates (on-policy first, then
buffer draws; or buffer only) -> reference reset every R updates -> metrics -> periodic evaluation
-> checkpoint. The sampler and the evaluation read a copy of the policy in the rollout layout
(config.rollout.*, reval_jax/rollout/layout.py), built from the master weights before they run and
freed after. Where a round's rollouts come from is the pipeline's (config.pipeline.*,
reval_jax/run/pipeline.py): generated at the top of the iteration (sync, the default), or ahead of
time under a policy at most `pipeline.max_staleness` updates older (async: time-sliced on every
device, or on a rollout device group while the others train); the loop body is the same, it takes
round i from the pipeline. The algorithm is one config field; what it implies and refuses is its
record's (reval_jax/run/config.py).

Build order: config checks -> the run's record (reval_jax/run/record.py: a start whose config
differs from the run's in a field that can change results is refused, unless
config.allow_config_change; a finished run stops here, untouched) -> devices and mesh -> model,
optimizer, state -> data, benchmarks, buffer, scorer -> producer, pipeline, checkpointer -> resume
-> the start's record (its config, metrics rewound to the checkpoint) -> hooks -> the loop. Nothing
is written to the workdir before the resume has succeeded, but a corrupt step moved aside to
checkpoints.corrupt/ (and the compilation cache, config.compile_cache, may gain entries): a start
that fails its checks leaves an existing run's record as it was. Everything built is closed on every
exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from flax import nnx

from reval_jax.data.replay import ReplayBuffer
from reval_jax.errors import UserError
from reval_jax.objective.train_step import Updater, init_state, make_optimizer, state_sharding
from reval_jax.parallel import distributed
from reval_jax.parallel.distributed import all_gather_rows
from reval_jax.parallel.sharding import make_mesh
from reval_jax.run import config as run_config
from reval_jax.run import record
from reval_jax.run.config import RunSettings
from reval_jax.run.config import packing_budget as packing_budget  # reval_jax.tools.scale imports it from here
from reval_jax.run.config import step_config as step_config  # reval_jax.tools.scale imports it from here
from reval_jax.run.hooks import CheckpointHook, EvalHook, MetricsHook, ProgressHook, StopOnSignal
from reval_jax.run.pipeline import Clock, Round, device_groups, make_pipeline
from reval_jax.run.policy import load_hf_policy
from reval_jax.run.producer import Producer
from reval_jax.run.trainer import Diverged, Learner, Trainer, staleness_of

if TYPE_CHECKING:
    from reval_jax.run.checkpoint import Restored


def enable_compile_cache(cache: str, workdir: Path) -> None:
    """JAX's persistent compilation cache under the workdir (config.compile_cache), unless one is
    already configured (JAX_COMPILATION_CACHE_DIR): restarts then skip recompiling."""
    if not cache or jax.config.jax_compilation_cache_dir:
        return
    path = Path(cache)
    jax.config.update("jax_compilation_cache_dir", str(path if path.is_absolute() else workdir / path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@dataclasses.dataclass
class Model:
    """The policy as the run holds it: its graph, the sharded train state and where copies go."""

    graphdef: nnx.GraphDef
    tokenizer: object
    mesh: jax.sharding.Mesh
    train_devices: list  # every process's training devices (the mesh's, in device order)
    rollout_layout: object  # the round producer's copy of the policy (the rollout group's, two groups)
    eval_layout: object  # the evaluation's (always on the training devices)
    updater: Updater


def build_model(config, s: RunSettings) -> tuple[Model, object]:
    """Devices, mesh, the policy's weights, the optimizer; and the train state, in one layout."""
    rollout_devices, train_devices = device_groups(s.pipeline)  # rollout: this process's own
    mesh = make_mesh(s.mesh, train_devices)
    policy, tokenizer = load_hf_policy(s.model, mesh)
    eval_layout = run_config.rollout_layout(config, mesh, policy.cfg)
    rollout_layout = run_config.rollout_layout(config, rollout_devices, policy.cfg) if rollout_devices \
        else eval_layout
    graphdef, params = nnx.split(policy)
    optimizer = make_optimizer(s.optimizer)
    state = init_state(params, optimizer, ref_dtype=s.model.ref_dtype)
    state = jax.device_put(state, state_sharding(state, optimizer, mesh))  # one layout from the start
    del policy, params
    updater = Updater(graphdef, optimizer, s.step, mesh, state)
    return Model(graphdef, tokenizer, mesh, train_devices, rollout_layout, eval_layout, updater), state


def snapshot(model: Model, s: RunSettings):
    """The rollout side's copy of the policy, made from the train state: the rollout layout's, or for
    a LoRA run on a rollout group of its own the adapters only, merged there (AdapterPush)."""
    if s.pipeline.two_groups and s.model.lora is not None:
        from reval_jax.rollout.layout import AdapterPush

        push = AdapterPush(model.rollout_layout, model.graphdef)
        return lambda state: push(state.params, int(state.ref_version))
    return lambda state: model.rollout_layout(model.graphdef, state.params)


def gather_round(r: Round, rows: int, devices) -> Round:
    """Every process's share of round r (prompt-major rows) put together, on the training devices."""
    from reval_jax.data.batch import Trajectories

    whole = {k: all_gather_rows(v, rows, devices) for k, v in r.batch.to_numpy().items()}
    seconds = all_gather_rows(np.asarray([r.generate_s]), jax.process_count(), devices)
    return Round(r.iteration, Trajectories.from_numpy(whole), all_gather_rows(r.truncated, rows, devices),
                 float(seconds.max()), info=r.info)


def load_data(s: RunSettings, tokenizer):
    """(prompt stream and its stats, benchmarks): every process reads the same batches."""
    from reval_jax.data.prompts import prompt_batches
    from reval_jax.run.evaluate import load_benchmarks, load_options

    d = s.data
    prompts, stats = prompt_batches(list(d.train_files), tokenizer, load_options(d), d.prompts_per_iteration, d.seed)
    benchmarks = load_benchmarks(tokenizer, d) if s.hooks.eval_every else {}
    return prompts, stats, benchmarks


def resume(ckpt, trainer: Trainer, s: RunSettings, prompts, scorer) -> Restored | None:
    """Restores the newest loadable checkpoint into the trainer, the prompt stream and the scorer's
    counters; returns it (None for a fresh run). Writes nothing but the move of a corrupt step aside."""
    from reval_jax.data.rewards import RewardStats

    pipe, buffer = trainer.pipeline, trainer.buffer
    restored = ckpt.restore_latest(trainer.state, {**buffer.state_dict(), **pipe.state_dict()})
    if restored is None:
        return None
    trainer.state = restored.state
    buffer.load_state_dict(restored.buffer)
    pipe.load_state_dict(restored.buffer)
    if pipe.queue and s.pipeline.mode == "sync":
        raise UserError(f"checkpoint {restored.iteration} in {ckpt.directory} was written by an asynchronous run "
                        f"with rounds {sorted(pipe.queue)} generated ahead: resume it with "
                        "--config.pipeline.mode=async")
    for i, rnd in pipe.queue.items():  # generated under the checkpoint's bound: refused if over this one's
        over = staleness_of(rnd.batch, (i - 1) * s.loop.updates_per_round).max(initial=0)
        if over > s.pipeline.max_staleness:
            raise UserError(f"checkpoint {restored.iteration} in {ckpt.directory} holds round {i} generated "
                            f"{over} updates ahead of its training, over pipeline.max_staleness="
                            f"{s.pipeline.max_staleness}: resume with --config.pipeline.max_staleness={over} "
                            "or more (or from an earlier checkpoint)")
    prompts.set_state(restored.meta["data"])
    scorer.restore_stats(RewardStats(**restored.meta["verifier"]))
    return restored


def _rewound(restored: Restored, writer, directory: Path, json_config: dict) -> None:
    """The metrics back at the restored checkpoint; says so, and which result-changing fields the
    checkpoint was written under another value of."""
    dropped = writer.rewind(restored.iteration)  # metrics.jsonl and TensorBoard events
    print(f"resumed from checkpoint {restored.iteration} in {directory} ({dropped} later metric records dropped)")
    for change in record.changes(restored.meta["config"], json_config):
        if record.needs_flag(change):
            print(f"warning: config differs from the checkpoint's: {change}")


def _record(config, s: RunSettings, workdir: Path, json_config: dict, first: int, stack: contextlib.ExitStack):
    """The run's record of a start that trains from iteration `first`: its config (process 0;
    reval_jax/run/record.py) and the metrics writer."""
    from reval_jax.run.metrics import MetricsWriter

    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and (path := record.write_start(workdir, json_config, first)) is not None:
        if path.name != record.ORIGINAL:
            print(f"this start's config is recorded in {path} (the run's earlier ones are kept)")
    writer = MetricsWriter(workdir, wandb_project=s.wandb_project, config=config.to_dict(),
                           enabled=jax.process_index() == 0)
    stack.callback(writer.close)
    return writer


def _hooks(trainer: Trainer, s: RunSettings, model: Model, evaluation, writer, ckpt, meta, fresh: bool) -> None:
    n = s.loop.num_iterations
    trainer.add_hook(MetricsHook(writer, s.hooks, n))
    if s.hooks.eval_every:
        def evaluate(params):
            return evaluation(model.eval_layout(model.graphdef, params))  # the rollout copy, freed on return

        trainer.add_hook(EvalHook(evaluate, writer, s.hooks, n, initial=fresh))
    trainer.add_hook(CheckpointHook(ckpt, s.hooks, n, meta))
    trainer.add_hook(ProgressHook(n))


def run(config: ml_collections.ConfigDict, workdir: str, *, scorer=None, hooks: tuple = ()) -> dict[str, float]:
    """Trains as `config` says, writing metrics (and checkpoints) under `workdir`. Returns the
    last iteration's train metrics ({} when there is nothing to train). `scorer` (default: a
    RewardScorer of config.reward, closed at the end) scores the answers; one passed in stays open.
    `hooks` (trainer.Hook) are attached after the run's own (metrics, evaluation, checkpoints,
    progress): an experiment's probes see every round as the run's hooks left it.

    A start on an existing run first compares its config with the run's record (reval_jax/run/
    record.py: a change that can alter results is refused unless config.allow_config_change); a
    finished run (its newest checkpoint is num_iterations or later) is left as it is: nothing is
    built, read or written."""
    from reval_jax.run.checkpoint import newest_step

    for change in run_config.prepare(config):
        print(f"algorithm {config.algorithm} implies {change}")
    s = run_config.run_settings(config, len(jax.devices()), jax.process_count())
    path = Path(workdir)
    json_config = json.loads(config.to_json_best_effort())
    for change in record.check_start(path, json_config, bool(config.get("allow_config_change", False))):
        print(f"config change from the run's record: {change}")
    if (done := newest_step(path / "checkpoints")) is not None and done >= s.loop.num_iterations:
        print(f"{workdir} is a finished run (checkpoint {done}, num_iterations={s.loop.num_iterations}): "
              f"nothing to train; nothing was changed. Delete {workdir} for a fresh run, or raise "
              "--config.num_iterations to go on.")
        return {}
    enable_compile_cache(s.compile_cache, path)
    with contextlib.ExitStack() as stack:
        return _run(config, s, path, json_config, stack, scorer, tuple(hooks))


def _environment(s: RunSettings, tokenizer, scorer, stack: contextlib.ExitStack):
    """The environment of multi-turn episodes (closed with the run), or None for one turn."""
    if not s.env.multi_turn:
        return None
    from reval_jax.env.base import get_environment

    return stack.enter_context(get_environment(s.env.name, s.env.config, tokenizer, scorer))


def _run(config, s: RunSettings, workdir: Path, json_config: dict, stack: contextlib.ExitStack,
         scorer, hooks: tuple = ()) -> dict[str, float]:
    from reval_jax.data.rewards import RewardScorer
    from reval_jax.data.templates import stop_token_ids
    from reval_jax.run.checkpoint import Checkpointer
    from reval_jax.run.evaluate import Evaluation

    model, state = build_model(config, s)
    stops = tuple(stop_token_ids(model.tokenizer))
    sampling = run_config.sampling_config(config, stops, model.tokenizer.pad_token_id)
    prompts, data_stats, benchmarks = load_data(s, model.tokenizer)
    buffer = ReplayBuffer(s.replay.capacity, s.replay.seq_len, seed=s.replay.seed, prioritized=s.replay.prioritized,
                          alpha=s.replay.alpha, beta_is=s.replay.beta_is, pad_id=sampling.pad_id)
    if scorer is None:
        scorer = stack.enter_context(RewardScorer(s.reward.name, template=s.reward.template,
                                                  num_workers=s.reward.num_workers, timeout_s=s.reward.timeout_s))
    evaluation = Evaluation(model.tokenizer, benchmarks, run_config.eval_settings(config, stops), scorer, s.progress,
                            _environment(s, model.tokenizer, scorer, stack))  # its own: it may run beside rounds
    ckpt = Checkpointer(workdir / "checkpoints", keep=s.hooks.checkpoint_keep, async_save=s.hooks.async_save)
    stack.callback(ckpt.close)
    producer = Producer(s.rounds, sampling, s.engine, prompts, scorer, model.tokenizer, s.rewarding,
                        _environment(s, model.tokenizer, scorer, stack))
    clock, rows = Clock(), s.rounds.prompts_per_round * sampling.num_samples
    pipe = stack.enter_context(make_pipeline(
        s.pipeline, s.loop.updates_per_round, s.loop.num_iterations, producer,
        snapshot(model, s), clock,
        gather=lambda r: gather_round(r, rows, model.train_devices)))
    learner = Learner(model.updater, run_config.packing_budget(config, model.mesh), s.step.max_response_length,
                      s.advantages)
    trainer = Trainer(s.loop, state, learner, buffer, pipe, clock, lambda: scorer.stats)
    del state  # the trainer owns the state from here
    restored = resume(ckpt, trainer, s, prompts, scorer)
    start = 1 if restored is None else restored.iteration + 1
    writer = _record(config, s, workdir, json_config, start, stack)  # everything above loaded: this start trains
    if restored is None:
        writer.write("data", 0, {k: v for k, v in vars(data_stats).items() if k != "files"},
                     echo=("kept", "skipped_missing", "dropped_too_long"))
    else:
        _rewound(restored, writer, ckpt.directory, json_config)

    def meta():
        return {"data": prompts.get_state(), "verifier": dataclasses.asdict(scorer.stats), "config": json_config}

    _hooks(trainer, s, model, evaluation, writer, ckpt, meta, fresh=restored is None)
    for hook in hooks:
        trainer.add_hook(hook)
    stack.enter_context(StopOnSignal(trainer))
    try:
        return trainer.train(start)
    except Diverged as e:
        ckpt.wait()  # every step on disk was saved from a finite state (or verified)
        raise Diverged(f"{e} The last good checkpoint ({ckpt.last_good() or 'none'}) in {ckpt.directory} is kept; "
                       "check beta, the learning rate and the rewards.") from None


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
