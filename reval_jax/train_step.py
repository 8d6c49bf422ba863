"""The sharded, jitted update: state, optimizer, reference statistics and one train step.

    batch (Trajectories, reference terms filled in)
      -> per micro-batch: policy forward (chunked log-probs, V(s_1)) -> loss contribution -> grads
      -> sum over micro-batches (exactly the full-batch gradient: losses use global counts)
      -> global-norm clip -> AdamW -> skipped (state unchanged) if the gradient is not finite

`TrainState` holds policy parameters (float32 master weights), optimizer state and the reference
parameters (same sharding, optionally bfloat16) with their version. Parameters are nnx.State trees
of the model's graphdef; the same `sequence_stats` function computes policy and reference terms,
which is what makes ReVal's calibrated initialisation (δ = 0 when π_θ = π_ref, r = 0) exact.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reval_jax.batch import Trajectories
from reval_jax.logprobs import sequence_stats
from reval_jax.losses import LOSSES, LossNorm, grpo_advantages
from reval_jax.sharding import logical_to_spec, state_shardings

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one update computes (the typed slice of the run config the train step needs)."""

    loss: str = "reval"  # reval | tbrm | regression | grpo
    beta: float = 0.02  # reward scale of the value losses
    stop_grad_v: bool = False  # ReVal: stop the gradient through V_θ(s_1)
    grpo_aggregation: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    is_cap: float = 2.0
    max_response_length: int | None = None  # Dr. GRPO's constant; default: the batch length
    micro_batches: int = 1  # gradient accumulation steps per update
    chunk: int = 1024  # tokens per unembedding chunk in sequence_stats
    temperature: float = 1.0  # logits / T everywhere, consistent with the sampler

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; defaults are the paper's."""

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(
            cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        ),
    )


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # policy, float32 master weights
    opt_state: Any
    ref_params: nnx.State  # reference policy, same sharding (optionally bfloat16)
    ref_version: Array  # [] int32, bumped at every reference reset
    step: Array  # [] int32, updates applied
    skipped: Array  # [] int32, updates skipped for a non-finite gradient (total)
    skipped_in_a_row: Array  # [] int32, consecutive skipped updates


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def init_state(
    params: nnx.State, optimizer: optax.GradientTransformation, *, ref_dtype: str | None = None
) -> TrainState:
    """A fresh train state; the reference starts equal to the policy (version 0)."""
    # distinct buffers everywhere: the train step donates the whole state
    ref = (
        jax.tree.map(jnp.copy, params) if ref_dtype is None else _cast(params, jnp.dtype(ref_dtype))
    )
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        ref_params=ref,
        ref_version=zero(),
        step=zero(),
        skipped=zero(),
        skipped_in_a_row=zero(),
    )


def reset_reference(state: TrainState) -> TrainState:
    """π_ref ← π_θ (in the reference's dtype); the version bump marks buffered terms stale."""
    # a copy even when the dtypes match: the train step donates params and reference separately
    ref = jax.tree.map(lambda p, r: jnp.array(p, dtype=r.dtype, copy=True), state.params, state.ref_params)
    return state.replace(ref_params=ref, ref_version=state.ref_version + 1)


def state_sharding(
    state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """NamedShardings of a TrainState: parameters from their logical axes, optimizer moments like
    the parameters they belong to, counters replicated."""
    params = state_shardings(state.params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        params=params,
        opt_state=opt,
        ref_params=params,
        ref_version=replicated,
        step=replicated,
        skipped=replicated,
        skipped_in_a_row=replicated,
    )


def batch_sharding(batch: Trajectories, mesh: Mesh) -> Trajectories:
    """Every field split over the data axes along the batch dimension."""
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh, logical_to_spec(("act_batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
        ),
        batch,
    )


# ----------------------------------------------------------------------------- the step


def _stats(graphdef, params, batch: Trajectories, cfg: StepConfig):
    model = nnx.merge(graphdef, params)
    return sequence_stats(
        model,
        batch.tokens,
        batch.attn_mask,
        batch.response_mask,
        batch.s1_index,
        chunk=cfg.chunk,
        temperature=cfg.temperature,
    )


def reference_stats(graphdef, ref_params: nnx.State, batch: Trajectories, cfg: StepConfig):
    """(log π_ref per token [B, T], V_ref(s_1) [B]) — the same function the policy goes through."""
    s = _stats(graphdef, ref_params, batch, cfg)
    return s.logp, s.v0


def _loss_fn(cfg: StepConfig):
    fn = LOSSES[cfg.loss]
    if cfg.loss == "grpo":
        return functools.partial(
            fn,
            aggregation=cfg.grpo_aggregation,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            is_cap=cfg.is_cap,
        )
    if cfg.loss == "reval":
        return functools.partial(fn, beta=cfg.beta, stop_grad_v=cfg.stop_grad_v)
    return functools.partial(fn, beta=cfg.beta)


def _split(tree, n: int):
    """[B, ...] -> [n, B/n, ...] for every leaf."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), tree)


def loss_and_grads(
    graphdef, cfg: StepConfig, params: nnx.State, batch: Trajectories, weights: Array
):
    """Loss, float32 gradients and metrics of one update batch, accumulated over
    `cfg.micro_batches` (exactly the full-batch values: every loss is normalised by the counts of
    the whole batch). `weights` [B] are per-trajectory importance weights."""
    B = batch.tokens.shape[0]
    if B % cfg.micro_batches:
        raise ValueError(
            f"batch of {B} trajectories does not split into {cfg.micro_batches} micro-batches"
        )
    norm = LossNorm.for_batch(batch, cfg.max_response_length)
    loss_fn = _loss_fn(cfg)
    extra = {}
    if cfg.loss == "grpo":  # group-normalised advantages over the whole batch, never a micro-batch
        extra["advantages"] = grpo_advantages(batch.raw_reward, batch.group_id)

    def micro_loss(params, mb: Trajectories, w: Array, extra: dict):
        s = _stats(graphdef, params, mb, cfg)
        kwargs = dict(extra) if cfg.loss == "grpo" else {"weights": w}
        return loss_fn(s.logp, s.v0, mb, norm, **kwargs)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(grads, xs):
        (loss, metrics), g = grad_fn(params, *xs)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), (loss, metrics)

    n = cfg.micro_batches
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (losses, metrics) = jax.lax.scan(
        accumulate, zeros, (_split(batch, n), _split(weights, n), _split(extra, n))
    )
    # per-trajectory metrics [n, B/n] -> [B]; scalar contributions [n] -> their sum
    metrics = {k: v.reshape(B) if v.ndim == 2 else jnp.sum(v) for k, v in metrics.items()}
    return jnp.sum(losses), grads, {**metrics, "num_tokens": norm.num_tokens}


def train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    cfg: StepConfig,
    state: TrainState,
    batch: Trajectories,
    weights: Array,
):
    """One update on `batch` (B trajectories with reference terms filled in): gradients,
    global-norm clip and AdamW; a non-finite loss or gradient norm leaves parameters and optimizer
    untouched and is counted. Pure; `jit_train_step` jits it. Returns (new state, metrics)."""
    loss, grads, metrics = loss_and_grads(graphdef, cfg, state.params, batch, weights)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1 - skipped,
        skipped=state.skipped + skipped,
        skipped_in_a_row=(state.skipped_in_a_row + 1) * skipped,
    )

    out = {
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": skipped.astype(jnp.float32),
        "num_tokens": metrics.pop("num_tokens"),
    }
    if "delta" in metrics:
        delta = metrics.pop("delta")
        out.update(
            delta_mean=jnp.mean(delta),
            delta_std=jnp.std(delta),
            delta_abs_max=jnp.max(jnp.abs(delta)),
            abs_delta=jnp.abs(delta),
        )
    for k in ("kl", "v_diff"):
        if k in metrics:
            out[f"{k}_mean"] = jnp.mean(metrics.pop(k))
    out.update({k: v for k, v in metrics.items() if v.ndim == 0})
    return new_state, out


def jit_train_step(
    graphdef,
    optimizer,
    cfg: StepConfig,
    state: TrainState,
    batch: Trajectories,
    mesh: Mesh | None = None,
):
    """`train_step` jitted with donated state and, given a mesh, explicit in/out shardings."""
    fn = functools.partial(train_step, graphdef, optimizer, cfg)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    s_sh, b_sh = state_sharding(state, optimizer, mesh), batch_sharding(batch, mesh)
    w_sh = NamedSharding(mesh, logical_to_spec(("act_batch",), (batch.tokens.shape[0],), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        fn, in_shardings=(s_sh, b_sh, w_sh), out_shardings=(s_sh, replicated), donate_argnums=(0,)
    )


def timed_update(step_fn, state: TrainState, batch: Trajectories, weights: Array):
    """Runs one jitted update and adds wall-clock `seconds` and `tokens_per_s` (all tokens of the
    batch, prompt included) to its host-side metrics."""
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, weights)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - start
    tokens = float(jnp.sum(batch.attn_mask))
    metrics = {**metrics, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return state, metrics
