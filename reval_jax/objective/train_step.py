"""The sharded, jitted update: state, optimizer, reference statistics and one train step.

    update batch (Trajectories, reference terms filled in)
      -> packing.pack: micro-batches of packed rows sized by a token budget (host)
      -> per micro-batch: the forward program on the policy and on the reference (log-probs, V(s_1)),
         then one jitted call: loss contribution at those values -> its cotangents pulled back
         through the differentiated policy pass -> gradients added to a donated f32 accumulator
      -> one jitted apply: global-norm clip -> AdamW -> skipped (state unchanged) if the loss, the
         gradient norm, or the new parameters / optimizer state are not finite

The micro-batches run as a host loop over ONE compiled program per micro-batch shape, so the
number of micro-batches follows the data (a token budget) without recompiling, and the sum of
their contributions is exactly the full-batch value: every loss is normalised by the counts of the
whole update batch (`LossNorm`, computed on host before packing).

Exact calibration (paper Prop. 2). δ is a difference of policy and reference terms, which are equal
when π_θ = π_ref. Two differently compiled programs round differently in the last bits (float32:
|δ| ~ 1e-6, gradient norm ~ 1e-4 at init, which Adam turns into full-size steps), so with
`StepConfig.exact_reference` (the default) the reference's side of δ comes from the forward program
in every update (on the packed micro-batch, parameters in the compute dtype and layout), and when
the policy equals the reference bit for bit (`policy_is_reference`, checked on device once per
update: at the start and right after every reset) the policy's side is those same values: δ = −r/β
exactly. The gradient is the pull-back of ∂L/∂(logp, v), evaluated at those values, through the
differentiated pass (`jax.vjp`), so a zero δ gives an exactly zero gradient. Otherwise (π_θ ≠ π_ref,
δ is not zero anyway) the policy's side is the differentiated pass's own forward, a program that
rounds differently in the last bits. One compiled micro-step serves both (a device bool selects
the values). This costs one forward per micro-batch (the reference's) on top of the forward +
backward, and makes the reference terms stored with the rollouts unused (the run skips computing
them). The reference is exact in this sense when its dtype is the compute dtype
or wider (e.g. a bfloat16 reference with bfloat16 compute; not with float32 compute).

`TrainState` holds policy parameters (float32 master weights), optimizer state and the reference
parameters (same sharding, optionally bfloat16) with their version. Parameters are nnx.State trees
of the model's graphdef. Each forward casts its parameters to the compute dtype first (sharded, so
the FSDP all-gathers move compute-dtype weights) and goes through the same `batch_stats` function
for policy and reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reval_jax.errors import UserError
from reval_jax.model import lora
from reval_jax.objective import algorithms
from reval_jax.objective.logprobs import batch_stats
from reval_jax.objective.losses import LossNorm
from reval_jax.objective.packing import Layout, Packed
from reval_jax.parallel.distributed import to_global, to_host
from reval_jax.parallel.sharding import logical_to_spec, state_shardings

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one update computes (the typed slice of the run config the train step needs)."""

    loss: str = "reval"  # the algorithm's name: a record of reval_jax.objective.algorithms (reval, grpo, ...)
    beta: float = 0.02  # reward scale of the value losses
    stop_grad_v: bool = False  # ReVal: stop the gradient through V_θ(s_1)
    grpo_aggregation: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    is_cap: float = 2.0
    max_response_length: int | None = None  # Dr. GRPO's constant; default: the padded length
    chunk: int = 512  # positions of every row per unembedding chunk in logprobs.packed_stats
    exact_reference: bool = True  # policy and reference terms of δ from one compiled forward (above)
    temperature: float = 1.0  # logits / T everywhere, consistent with the sampler
    max_segment_len: int = 0  # the longest trajectory a packed row holds (0: unknown): attention's band

    def __post_init__(self):
        algorithms.get(self.loss)  # a UserError naming the registered algorithms

    @property
    def algorithm(self) -> algorithms.Algorithm:
        return algorithms.get(self.loss)

    @property
    def uses_reference(self) -> bool:
        """Whether the algorithm reads reference terms (the value losses do; GRPO, RLOO, DAPO not)."""
        return self.algorithm.uses_reference


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
    params: nnx.State  # policy, float32 master weights (with LoRA: the frozen base, A, B and s)
    opt_state: Any  # of the trained parameters: all of them, or A and B only with LoRA
    ref_params: nnx.State  # reference policy, same sharding (optionally bfloat16); with LoRA empty (`reference`)
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
    """A fresh train state; the reference starts equal to the policy (version 0). With adapters
    (reval_jax.model.lora) the optimizer takes A and B only and no reference copy is kept: the
    reference is the policy's own state with the adapter off (`reference`)."""
    # distinct buffers everywhere: the train step donates the whole state
    if lora.is_adapted(params):
        if ref_dtype is not None:
            raise UserError("model.ref_dtype does not apply to a LoRA run: its reference is the base itself "
                            "(no copy); store the base in bfloat16 with --config.lora.base_dtype=bfloat16")
        ref = nnx.State({})
    else:
        ref = jax.tree.map(jnp.copy, params) if ref_dtype is None else _cast(params, jnp.dtype(ref_dtype))
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(
        params=params,
        opt_state=optimizer.init(lora.split_trainable(params)[0]),
        ref_params=ref,
        ref_version=zero(),
        step=zero(),
        skipped=zero(),
        skipped_in_a_row=zero(),
    )


def reference(state: TrainState) -> nnx.State:
    """The reference policy's parameters: the stored copy, or with LoRA the policy's state with the
    adapter off (the same arrays but s; the same compiled forward computes both)."""
    return lora.reference_state(state.params) if lora.is_adapted(state.params) else state.ref_params


def reset_reference(state: TrainState) -> TrainState:
    """π_ref ← π_θ (in the reference's dtype); the version bump marks buffered terms stale. (A LoRA
    run resets by a merge instead: `merge_reset`, `Updater.reset`.)"""
    # a copy even when the dtypes match: the train step donates params and reference separately
    ref = jax.tree.map(lambda p, r: jnp.array(p, dtype=r.dtype, copy=True), state.params, state.ref_params)
    return state.replace(ref_params=ref, ref_version=state.ref_version + 1)


def merge_reset(graphdef, optimizer: optax.GradientTransformation, state: TrainState):
    """The reference reset of a LoRA run, π_ref ← π_θ as a merge (ALGORITHMS.md, "Low-rank adapters"):
    W ← W + (α/r)·A·B in W's dtype, B ← 0, the adapters' optimizer state restarted, the version
    bumped. Afterwards policy and reference (s = 0) are the same function, bit for bit through one
    program. Pure (jit it); returns (state, lora.MergeStats)."""
    model = nnx.merge(graphdef, state.params)
    stats = lora.merge(model)
    params = nnx.state(model)
    opt_state = optimizer.init(lora.split_trainable(params)[0])
    return state.replace(params=params, opt_state=opt_state, ref_version=state.ref_version + 1), stats


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
        lora.split_trainable(params)[0],
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        params=params,
        opt_state=opt,
        ref_params=nnx.State({}) if lora.is_adapted(state.params) else params,
        ref_version=replicated,
        step=replicated,
        skipped=replicated,
        skipped_in_a_row=replicated,
    )


def packed_sharding(mesh: Mesh) -> NamedSharding:
    """Every field of a Packed micro-batch is split by rows over the data axes."""
    return NamedSharding(mesh, logical_to_spec(("act_batch", None), None, mesh))


# ----------------------------------------------------------------------------- the step


def compute_dtype(graphdef, params) -> jnp.dtype:
    """The dtype the model computes in (its config's `dtype`)."""
    return jnp.dtype(nnx.merge(graphdef, params).cfg.dtype)


def _stats(graphdef, params, mb: Packed, cfg: StepConfig):
    """(logp [R, L], v [R, M]) of the parameters `params` on a packed micro-batch; the parameters
    are cast to the compute dtype first (a no-op for parameters already in it)."""
    model = nnx.merge(graphdef, _cast(params, compute_dtype(graphdef, params)))
    return batch_stats(model, mb, chunk=cfg.chunk, temperature=cfg.temperature, max_segment_len=cfg.max_segment_len)


def reference_stats(graphdef, ref_params: nnx.State, mb: Packed, cfg: StepConfig):
    """(log π per token [R, L], V(s_1) per slot [R, M]) — the forward program: the reference pass,
    and with `exact_reference` the values of both sides of δ in the update."""
    return _stats(graphdef, ref_params, mb, cfg)


def micro_loss_and_grads(graphdef, cfg: StepConfig, params: nnx.State, mb: Packed, norm: LossNorm,
                         values: tuple[Array, Array] | None = None, use_values: Array | bool = True):
    """Loss contribution, float32 gradients and metrics of one packed micro-batch.

    The loss is evaluated at `values` = (logp, v) when given and `use_values` holds (the forward
    program's outputs, see exact calibration above), else at the differentiated pass's own forward
    values; either way the gradient is J^T ∂L/∂(logp, v) with J the Jacobian of the differentiated
    pass. `use_values` may be a traced bool: one compiled program serves both cases."""
    loss_fn = cfg.algorithm.loss_fn(cfg)
    trained, frozen = lora.split_trainable(params)  # with LoRA the gradient is A's and B's only
    (logp, v), pullback = jax.vjp(lambda t: _stats(graphdef, lora.join(t, frozen), mb, cfg), trained)
    if values is not None:
        logp, v = (jnp.where(use_values, given, own) for given, own in zip(values, (logp, v), strict=True))
    (value, metrics), cotangents = jax.value_and_grad(
        lambda logp, v: loss_fn(logp, v, mb, norm), argnums=(0, 1), has_aux=True)(logp, v)
    (grads,) = pullback(cotangents)
    return value, jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics


def loss_and_grads(graphdef, cfg: StepConfig, params: nnx.State, micro: Sequence[Packed], norm: LossNorm):
    """Loss, float32 gradients and per-micro-batch metrics of a whole update batch given as its
    packed micro-batches (exactly the full-batch values). Pure: jit it whole for tests; the run uses
    `Updater`, which compiles one micro-batch at a time."""
    total, grads, metrics = 0.0, None, []
    for mb in micro:
        value, g, m = micro_loss_and_grads(graphdef, cfg, params, mb, norm)
        total = total + value
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics.append(m)
    return total, grads, metrics


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads, loss: Array):
    """Global-norm clip and AdamW from summed gradients. An update is skipped — parameters and
    optimizer untouched, counted — when the loss, the gradient norm or the resulting parameters or
    optimizer state are not finite. Returns (new state, {grad_norm, skipped})."""
    grad_norm = optax.tree.norm(grads)
    trained, frozen = lora.split_trainable(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    params = optax.apply_updates(trained, updates)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss) & _all_finite(params) & _all_finite(opt_state)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        params=lora.join(keep(params, trained), frozen),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1 - skipped,
        skipped=state.skipped + skipped,
        skipped_in_a_row=(state.skipped_in_a_row + 1) * skipped,
    )
    return new_state, {"grad_norm": grad_norm, "skipped": skipped.astype(jnp.float32)}


def summarize(loss, micro_metrics: Sequence[dict], layout: Layout, norm: LossNorm) -> dict[str, Any]:
    """Host metrics of one update from its micro-batches' metrics: per-trajectory arrays [R, M] are
    put back in the batch's order ([B]); scalar contributions are summed."""
    micro_metrics = [jax.tree.map(to_host, m) for m in micro_metrics]
    out: dict[str, Any] = {"loss": float(to_host(loss)), "num_tokens": float(norm.num_tokens)}
    per_traj = {k for k, v in micro_metrics[0].items() if np.ndim(v) == 2}
    if "delta" in per_traj:
        delta = layout.gather([m["delta"] for m in micro_metrics])
        out.update(delta_mean=float(np.mean(delta)), delta_std=float(np.std(delta)),
                   delta_abs_max=float(np.max(np.abs(delta))), abs_delta=np.abs(delta))
    for k in ("kl", "v_diff"):
        if k in per_traj:
            out[f"{k}_mean"] = float(np.mean(layout.gather([m[k] for m in micro_metrics])))
    for k in micro_metrics[0]:
        if k not in per_traj:
            out[k] = float(sum(np.asarray(m[k]) for m in micro_metrics))
    return out


class Updater:
    """The update and the reference pass as jitted programs, one per micro-batch shape.

        updater = Updater(graphdef, optimizer, cfg, mesh, state)
        state, metrics = updater.update(state, micro, layout, norm)    # micro: host Packed list
        logp, v = updater.reference(state.ref_params, micro)           # host [R, L] / [R, M] lists

    Its public programs (jitted; reval_jax.tools.scale compiles these same objects): `forward` (the
    forward program: reference pass, and both sides of δ with `exact_reference`), `micro_step`
    (loss at given values, gradients through the differentiated pass, added to a donated
    accumulator) and `apply_step` (clip, optimizer, finite checks); `_cast_fn` casts parameters to
    the compute dtype once per update. With a mesh, parameters keep their `state_sharding` layout,
    micro-batches are split by rows over the data axes (placed from host arrays that every process
    holds whole), the state and the gradient accumulator are donated."""

    def __init__(self, graphdef, optimizer: optax.GradientTransformation, cfg: StepConfig,
                 mesh: Mesh | None, state: TrainState):
        self.mesh, self.cfg = mesh, cfg
        self.exact = cfg.exact_reference and cfg.uses_reference
        self.dtype = compute_dtype(graphdef, state.params)
        self.lora = lora.is_adapted(state.params)
        accumulate = functools.partial(self._accumulate, graphdef, cfg)
        apply = functools.partial(apply_gradients, optimizer)
        forward = functools.partial(reference_stats, graphdef, cfg=cfg)
        cast = functools.partial(_cast, dtype=self.dtype)
        reset = functools.partial(merge_reset, graphdef, optimizer)
        if mesh is None:
            self._zeros = jax.jit(_zeros)
            self._same = jax.jit(policy_is_reference)
            self._cast_fn = jax.jit(cast)
            self.micro_step = jax.jit(accumulate, donate_argnums=(0,))
            self.apply_step = jax.jit(apply, donate_argnums=(0,))
            self.forward = jax.jit(forward)
            self.reset_step = jax.jit(reset, donate_argnums=(0,))
            return
        s_sh = state_sharding(state, optimizer, mesh)
        g_sh = lora.split_trainable(s_sh.params)[0]  # the gradients': the trained parameters' layout
        b_sh, replicated = packed_sharding(mesh), NamedSharding(mesh, PartitionSpec())
        norm_sh = LossNorm(replicated, replicated, replicated)
        self._zeros = jax.jit(_zeros, in_shardings=(g_sh,), out_shardings=g_sh)
        self._cast_fn = jax.jit(cast, in_shardings=(s_sh.params,), out_shardings=s_sh.params)
        self._same = jax.jit(policy_is_reference, out_shardings=replicated)

        def accumulate_in_layout(*args):  # the accumulator keeps the parameters' layout
            grads, value, metrics = accumulate(*args)
            return jax.lax.with_sharding_constraint(grads, g_sh), value, metrics

        self.micro_step = jax.jit(accumulate_in_layout, donate_argnums=(0,),
                                      in_shardings=(g_sh, s_sh.params, b_sh, norm_sh, b_sh, replicated))
        self.apply_step = jax.jit(apply, in_shardings=(s_sh, g_sh, replicated),
                                 out_shardings=(s_sh, replicated), donate_argnums=(0,))
        self.forward = jax.jit(forward, in_shardings=(s_sh.params, b_sh), out_shardings=(b_sh, b_sh))
        self.reset_step = jax.jit(reset, in_shardings=(s_sh,), out_shardings=(s_sh, replicated), donate_argnums=(0,))

    @staticmethod
    def _accumulate(graphdef, cfg, grads, params, mb: Packed, norm: LossNorm, values, use_values=True):
        value, g, metrics = micro_loss_and_grads(graphdef, cfg, params, mb, norm, values, use_values)
        return jax.tree.map(jnp.add, grads, g), value, metrics

    def computing(self, params: nnx.State) -> nnx.State:
        """`params` in the compute dtype (the same arrays when they already are): what the forward
        program and the micro-step take, so the policy and a reference of the compute dtype go
        through the same compiled forward."""
        floating = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
        if all(x.dtype == self.dtype for x in floating):
            return params
        if any(x.dtype == self.dtype for x in floating):  # e.g. a bfloat16 LoRA base: cast the adapters only
            return jax.tree.map(lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                params)
        return self._cast_fn(params)

    def put(self, mb: Packed) -> Packed:
        """A host micro-batch onto the mesh (the same arrays on every process)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, mb)
        sharding = packed_sharding(self.mesh)
        return jax.tree.map(lambda x: to_global(x, sharding), mb)

    def update(self, state: TrainState, micro: Sequence[Packed], layout: Layout, norm: LossNorm):
        """One update from host micro-batches; returns (state, host metrics incl. seconds). With
        `exact_reference` the micro-batches' stored reference terms are not read: both sides of δ
        are computed here by the forward program."""
        start = time.perf_counter()
        grads = self._zeros(lora.split_trainable(state.params)[0])
        params = self.computing(state.params)
        ref = (lora.reference_state(params) if self.lora else self.computing(state.ref_params)) if self.exact else None
        loss, metrics = 0.0, []
        same = self._same(params, ref) if self.exact else None  # π_θ = π_ref bit for bit (a device bool)
        for mb in micro:
            mb = self.put(mb)
            if self.exact:  # the reference's side of δ; the policy's is the same values when π_θ = π_ref
                ref_logp, ref_v = self.forward(ref, mb)
                mb = mb.replace(ref_logp=ref_logp, ref_v=ref_v)
                grads, value, m = self.micro_step(grads, params, mb, norm, (ref_logp, ref_v), same)
            else:
                grads, value, m = self.micro_step(grads, params, mb, norm, None, np.bool_(False))
            loss, metrics = loss + value, metrics + [m]
        del params, ref
        state, out = self.apply_step(state, grads, loss)
        host = summarize(loss, metrics, layout, norm)
        host.update({k: float(v) for k, v in jax.device_get(out).items()})
        seconds = time.perf_counter() - start
        real = int(layout.length.sum())
        host.update(seconds=seconds, tokens_per_s=real / seconds, micro_batches=float(len(micro)),
                    tokens_processed=float(layout.tokens_processed),
                    padding_fraction=1.0 - real / max(layout.tokens_processed, 1))
        return state, host

    def reset(self, state: TrainState) -> tuple[TrainState, dict[str, float]]:
        """π_ref ← π_θ: a copy of the policy (`reset_reference`), or with LoRA a merge (`merge_reset`,
        its MergeStats as metrics: lora/merge_update, lora/merge_rounding and per target)."""
        if not self.lora:
            return reset_reference(state), {}
        state, stats = self.reset_step(state)
        return state, stats.metrics()

    def reference(self, ref_params: nnx.State, micro: Sequence[Packed]):
        """Reference terms of every micro-batch: lists of host logp [R, L] and v [R, M]."""
        ref = self.computing(ref_params)
        outs = [self.forward(ref, self.put(mb)) for mb in micro]
        return [to_host(lp) for lp, _ in outs], [to_host(v) for _, v in outs]


def policy_is_reference(params: nnx.State, ref: nnx.State) -> Array:
    """[] bool: whether the policy and the reference compute the same function bit for bit on the same
    program: every array equal, or for an adapted policy (whose reference is its own state with s = 0)
    every B exactly zero. True at the start and right after each reference reset."""
    if lora.is_adapted(params):
        _, adapters = lora.split_base(params)
        zeros = [jnp.all(v.get_value() == 0) for k, v in adapters["adapters"].items() if k.endswith("_b")]
        return jnp.all(jnp.stack(zeros))
    equal = [jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True)]
    return jnp.all(jnp.stack(equal))


def _zeros(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
