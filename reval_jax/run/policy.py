"""Loading a policy model: from a Hugging Face directory, or from a training checkpoint.

Below train, evaluate and export (which all load policies) and above checkpoint, so that none of
them imports another to get a model.
"""

from __future__ import annotations

import os

import jax

from reval_jax.parallel.sharding import make_mesh
from reval_jax.run.config import ModelSettings, model_settings, optimizer_config


def make_run_mesh(config, devices=None):
    """The device mesh of a run config (`config.mesh`), over `devices` (default: all)."""
    return make_mesh(tuple(config.mesh), devices)


def load_hf_policy(model: ModelSettings, mesh, path: str | None = None):
    """The policy model (sharded on `mesh`) and its tokenizer from a local HF directory
    (`model.path` unless `path`), with the run's adapters when `model.lora` is set."""
    from reval_jax.model.hf import load_hf
    from reval_jax.model.lora import add_adapters

    policy, tokenizer = load_hf(path or model.path, mesh=mesh, param_dtype=model.param_dtype, dtype=model.dtype,
                                remat=model.remat, attention=model.attention, scan_layers=model.scan_layers)
    if model.lora is not None:  # the base as loaded, the adapters (B = 0) from the run's seed
        add_adapters(policy, model.lora, seed=model.seed)
    return policy, tokenizer


def load_checkpoint_policy(checkpoint: str | os.PathLike, config, mesh, log=print, info: dict | None = None):
    """The policy model of a training checkpoint, placed on `mesh`, with its tokenizer from
    `config.model.path`. `checkpoint` is a step directory `checkpoints/<i>` (that step only), a
    `checkpoints/` directory or a workdir holding one: the newest step that loads and matches its
    checksums is taken, and the steps skipped on the way are reported. A LoRA run's policy comes with
    its adapters (on the base as its last merge left it). `info`, when given, receives the step's
    `iteration` and `ref_version` (the merges a LoRA run has made)."""
    from flax import nnx

    from reval_jax.model import lora
    from reval_jax.objective.train_step import init_state, make_optimizer, state_sharding
    from reval_jax.run.checkpoint import Checkpointer, failure_reason, find_checkpoints

    directory, only = find_checkpoints(checkpoint)
    settings = model_settings(config)
    model, tokenizer = load_hf_policy(settings, mesh)
    graphdef, params = nnx.split(model)
    del model
    optimizer = make_optimizer(optimizer_config(config))
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, ref_dtype=settings.ref_dtype), params)
    shardings = state_sharding(abstract, optimizer, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if lora.is_adapted(params):  # the base as loaded: a step written before any merge does not hold it
        base, _ = lora.split_base(params)
        target = target.replace(params=lora.join(base, lora.split_base(target.params)[1]))
    del params
    ckpt = Checkpointer(directory, read_only=True)
    steps = [only] if only is not None else list(reversed(ckpt.steps()))
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint found")
    failures = []
    try:
        for step in steps:
            try:
                out, verified = ckpt.restore(step, target)
            except Exception as e:  # noqa: BLE001 — any failure to read means: not usable
                failures.append(f"checkpoint {step}: {failure_reason(e)}")
                log(f"checkpoint {step} in {directory} is corrupt or partial and is skipped ({failure_reason(e)})")
                continue
            if not verified:
                log(f"warning: checkpoint {step} in {directory} predates checksums; loaded unverified")
            if failures:
                log(f"loaded checkpoint {step} (the newest usable one) from {directory}")
            if info is not None:
                info.update(iteration=int(out.meta["iteration"]), ref_version=int(out.state.ref_version))
            return nnx.merge(graphdef, out.state.params), tokenizer
    finally:
        ckpt.close()
    raise FileNotFoundError(f"{directory}: no usable checkpoint; " + "; ".join(failures))
