"""Algorithms as records in a registry: everything that makes ReVal, a baseline or a new method
what it is, in one place.

    algorithm = algorithms.get(config.algorithm)     # an `Algorithm` record
    changes = algorithms.apply_defaults(config)      # what it implies (unless algorithm_defaults=False)
    algorithms.check(config)                         # the configs it refuses, naming the field
    reward = algorithm.rewards(raw, group_id, lengths, config)   # shaping + reward.transform, per round
    keep = algorithm.filter_groups(raw, group_id)    # dynamic sampling (DAPO), or None
    advantages = algorithm.batch_advantages(batch)   # [B] for the policy-gradient losses, or None
    loss_fn = algorithm.loss_fn(step_config)         # the pure loss with its options bound

A record holds: the pure loss (reval_jax.objective.losses), how the loss is configured from the
train step's `StepConfig`, the config fields it implies, its config checks, its advantages, whether
it needs the reference policy's terms, DAPO-style group filtering and reward shaping, and hints for
the plots. Adding an algorithm is one `register(Algorithm(...))` here (its math, pure functions, in
losses.py); `--config.algorithm=<name>` then selects it. docs/algorithms.md describes each one.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from reval_jax.errors import UserError
from reval_jax.objective.losses import (
    GrpoClip,
    LossFn,
    grpo_advantages,
    grpo_loss,
    overlong_penalty,
    regression_loss,
    reval_loss,
    rloo_advantages,
    tbrm_loss,
    transform_rewards,
    varied_groups,
)

AdvantageFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (reward [B], group_id [B]) -> [B]
FilterFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (raw [B], group_id [B]) -> keep mask [B]
ShapeFn = Callable[[np.ndarray, np.ndarray, Any], np.ndarray]  # (raw [B], policy-token lengths [B], config) -> [B]
OptionsFn = Callable[[Any], Mapping[str, Any]]  # StepConfig -> keyword options of the loss
CheckFn = Callable[[Any], None]  # run config -> None, or raises UserError("config.<field>: ...")


def _no_check(config) -> None:
    del config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
    """One algorithm: its loss and everything the rest of the run needs to know about it."""

    name: str  # the value of config.algorithm
    loss: LossFn  # the pure loss (logp, v, packed batch, norm, **options) -> (loss, metrics)
    options: OptionsFn  # its keyword options from the train step's StepConfig (e.g. beta, clip bounds)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted config fields it implies
    check: CheckFn = _no_check  # refuses configs it cannot run (after the defaults), naming the field
    advantages: AdvantageFn | None = None  # per-sample advantages of the policy-gradient losses
    advantages_from: str = "raw_reward"  # the batch field `advantages` reads: raw_reward | reward
    uses_reference: bool = True  # reads the reference policy's terms (log π_ref, V_ref)
    filter_groups: FilterFn | None = None  # dynamic sampling: which samples' groups to train on
    shape_rewards: ShapeFn | None = None  # reward shaping from the response lengths, before reward.transform
    plot: Mapping[str, str] = dataclasses.field(default_factory=dict)  # metric -> why it has no curve
    summary: str = ""  # one line: what it is, with its reference

    def __post_init__(self):
        if self.advantages_from not in ("raw_reward", "reward"):
            raise ValueError(f"{self.name}: advantages_from {self.advantages_from!r}: use raw_reward or reward")
        for field in ("defaults", "plot"):  # read-only views: a record is not changed after registration
            object.__setattr__(self, field, types.MappingProxyType(dict(getattr(self, field))))

    def loss_fn(self, step_config) -> LossFn:
        """The loss with its options bound: fn(logp, v, packed batch, norm) -> (loss, metrics)."""
        return functools.partial(self.loss, **self.options(step_config))

    def rewards(self, raw: np.ndarray, group_id: np.ndarray, lengths: np.ndarray, config) -> np.ndarray:
        """A round's training reward [B] f32: the raw verifier rewards, shaped (`shape_rewards`, from
        the response lengths in policy tokens, `Trajectories.response_lengths`: a multi-turn
        trajectory's environment tokens do not count) and then transformed by config.reward.transform."""
        raw = np.asarray(raw, np.float32)
        shaped = raw if self.shape_rewards is None else self.shape_rewards(raw, np.asarray(lengths), config)
        return np.asarray(transform_rewards(shaped, np.asarray(group_id), config.reward.transform), np.float32)

    def batch_advantages(self, batch) -> np.ndarray | None:
        """Advantages [B] of an update batch (a Trajectories) over its prompt groups, from the batch
        field `advantages_from`; None for the losses that take none."""
        if self.advantages is None:
            return None
        reward = np.asarray(getattr(batch, self.advantages_from), np.float32)
        return np.asarray(self.advantages(reward, np.asarray(batch.group_id)), np.float32)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Adds `algorithm` to the registry under its name (a name is registered once)."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get(name: str) -> Algorithm:
    """The record of `name`; a UserError naming config.algorithm and the choices otherwise."""
    if name not in ALGORITHMS:
        raise UserError(f"config.algorithm: {name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def _field(config, dotted: str):
    return functools.reduce(getattr, dotted.split("."), config)


def apply_defaults(config) -> list[str]:
    """Sets the fields the chosen algorithm implies, unless config.algorithm_defaults is False;
    returns the changes made, `"field: old -> new"`, for the log. An unknown algorithm implies
    nothing (`check` refuses it)."""
    changes = []
    algorithm = ALGORITHMS.get(config.algorithm)
    if algorithm is None or not config.get("algorithm_defaults", True):
        return changes
    for field, value in algorithm.defaults.items():
        *parents, leaf = field.split(".")
        node = functools.reduce(getattr, parents, config)
        if getattr(node, leaf) != value:
            changes.append(f"{field}: {getattr(node, leaf)!r} -> {value!r}")
            with config.unlocked():
                setattr(node, leaf, value)
    return changes


def check(config) -> None:
    """Refuses an unknown algorithm, then whatever the chosen one cannot run (its own `check`):
    every error names the config field and what to do."""
    get(config.algorithm).check(config)


# ----------------------------------------------------------------------------- checks


def _bad(field: str, message: str):
    raise UserError(f"config.{field}: {message}")


def _one_update(label: str) -> CheckFn:
    """The policy-gradient algorithms here are on-policy: old log-probs are not stored (ρ ≡ 1)."""

    def check_one_update(config) -> None:
        k = config.replay.updates_per_iteration
        if k > 1:
            _bad("replay.updates_per_iteration", f"{k}: {label} does not store the old log-probs (its ratio is 1, "
                 "the clip never acts), so it takes one update per round; use 1")

    return check_one_update


def _groups(label: str, why: str) -> CheckFn:
    def check_groups(config) -> None:
        n = config.sampling.num_samples
        if n < 2:
            _bad("sampling.num_samples", f"{n}: {label} {why}; use 2 or more samples per prompt")

    return check_groups


def _all(*checks: CheckFn) -> CheckFn:
    def check_all(config) -> None:
        for c in checks:
            c(config)

    return check_all


def _check_regression(config) -> None:
    if config.reward.transform != "centered":
        _bad("reward.transform", f"{config.reward.transform!r}: the regression variant (Eq. 8) is defined "
             "with r̂ = r − group mean; use 'centered' (algorithm_defaults=True sets it)")


def _check_dapo(config) -> None:
    if config.reward.transform != "binary":
        _bad("reward.transform", f"{config.reward.transform!r}: DAPO's advantages are computed from the reward "
             "plus its overlong penalty, which a transform would change; use 'binary' (algorithm_defaults=True "
             "sets it)")
    if config.grpo.aggregation != "token-mean":
        _bad("grpo.aggregation", f"{config.grpo.aggregation!r}: DAPO's loss is token-level (a sum over every "
             "response token of the batch over their count); use 'token-mean' (algorithm_defaults=True sets it)")
    if not 0.0 <= config.dapo.overlong_cache < 1.0:
        _bad("dapo.overlong_cache", f"{config.dapo.overlong_cache}: L_cache is a fraction of "
             "sampling.max_new_tokens in [0, 1) (the paper's 4096 of 20480 is 0.2; 0 = no length penalty)")
    if config.dapo.max_extra_generations < 0:
        _bad("dapo.max_extra_generations", f"{config.dapo.max_extra_generations} must be >= 0 (extra sampler calls "
             "per round to replace the groups that dynamic sampling drops; 0 = none)")


# ----------------------------------------------------------------------------- the records


def _value_options(cfg) -> dict[str, Any]:
    return {"beta": cfg.beta}


def _grpo_options(cfg) -> dict[str, Any]:
    clip = GrpoClip(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, is_cap=cfg.is_cap)
    return {"aggregation": cfg.grpo_aggregation, "clip": clip}


def _dapo_options(cfg) -> dict[str, Any]:
    return {**_grpo_options(cfg), "aggregation": "token-mean"}  # token-level loss, whatever the GRPO setting


def _dapo_rewards(raw: np.ndarray, lengths: np.ndarray, config) -> np.ndarray:
    """raw + the overlong penalty, L_max = sampling.max_new_tokens, L_cache = dapo.overlong_cache · L_max."""
    max_length = int(config.sampling.max_new_tokens)
    cache = int(round(config.dapo.overlong_cache * max_length))
    return np.asarray(raw, np.float32) + overlong_penalty(np.asarray(lengths), max_length, cache)


def _no_kl_curve(label: str) -> dict[str, str]:
    return {"kl_mean": f"{label} uses no reference policy: no KL curve"}


ON_POLICY = {"replay.updates_per_iteration": 1, "replay.schedule": "on_policy_first"}

register(Algorithm(
    name="reval", loss=reval_loss, options=lambda cfg: {"beta": cfg.beta, "stop_grad_v": cfg.stop_grad_v},
    summary="ReVal: trajectory Bellman residual of the logits read as soft Q-values (paper Eq. 2)",
))
register(Algorithm(
    name="tbrm", loss=tbrm_loss, options=_value_options,
    defaults={"reward.transform": "binary", "reference.reset_every": 0, **ON_POLICY},
    summary="TBRM (Yuan et al. 2025): the residual without V_ref(s_1), fixed reference, on-policy",
))
register(Algorithm(
    name="regression", loss=regression_loss, options=_value_options,
    defaults={"reward.transform": "centered"},  # Eq. 8: r̂ = r − mean_group(r), nothing else
    check=_check_regression,
    summary="regression variant (paper Eq. 8, close to Kimi k1.5 / OAPL): log π_θ/π_ref against r̂/β",
))
register(Algorithm(
    name="grpo", loss=grpo_loss, options=_grpo_options, defaults=ON_POLICY, check=_one_update("GRPO"),
    advantages=grpo_advantages, uses_reference=False, plot=_no_kl_curve("GRPO"),
    summary="GRPO as in verl: clipped ratio, dual clip, group-normalised advantages",
))
register(Algorithm(
    name="rloo", loss=grpo_loss, options=_grpo_options, defaults=ON_POLICY,
    check=_all(_one_update("RLOO"), _groups("RLOO", "takes the mean of the other samples of a prompt as "
                                                    "each sample's baseline")),
    advantages=rloo_advantages, uses_reference=False, plot=_no_kl_curve("RLOO"),
    summary="RLOO (Ahmadian et al. 2024): leave-one-out baseline A_i = r_i − mean of the others",
))
register(Algorithm(
    name="dapo", loss=grpo_loss, options=_dapo_options,
    defaults={"reward.transform": "binary", "grpo.aggregation": "token-mean", "grpo.clip_low": 0.2,
              "grpo.clip_high": 0.28, **ON_POLICY},
    check=_all(_one_update("DAPO"), _groups("DAPO", "keeps the prompts whose samples disagree"), _check_dapo),
    advantages=grpo_advantages, advantages_from="reward", uses_reference=False,
    filter_groups=varied_groups, shape_rewards=_dapo_rewards, plot=_no_kl_curve("DAPO"),
    summary="DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, overlong shaping",
))


# ----------------------------------------------------------------------------- dynamic sampling


def select_groups(keep: np.ndarray, group_id: np.ndarray, groups: int) -> np.ndarray:
    """Row indices [n] of the `groups` prompt groups a round trains on after dynamic sampling:
    the kept groups (`keep`, from `filter_groups`, over every sampler call of the round) in the
    order they were generated, then, when fewer were kept (dapo.max_extra_generations ran out),
    the earliest dropped ones (all-equal rewards: zero advantage, no gradient) so that the round
    keeps its size. Rows keep their order."""
    keep, group_id = np.asarray(keep, bool), np.asarray(group_id)
    _, first = np.unique(group_id, return_index=True)
    order = group_id[np.sort(first)]  # group ids in generation order
    kept = [g for g in order if keep[group_id == g].all()]
    dropped = [g for g in order if not keep[group_id == g].all()]
    if len(kept) + len(dropped) < groups:
        raise ValueError(f"{len(kept) + len(dropped)} groups generated, {groups} needed")
    return np.flatnonzero(np.isin(group_id, (kept + dropped)[:groups]))
