"""The algorithm registry: records, implied defaults and config checks (the same changes and errors
as the code they replace), and RLOO and DAPO against plain numpy loops on random data: advantages,
losses, the overlong reward shaping and the dynamic-sampling filter."""

import copy
import itertools

import numpy as np
import pytest

from configs import base, tiny
from reval_jax.data.batch import Trajectories
from reval_jax.errors import UserError
from reval_jax.objective import algorithms
from reval_jax.objective.algorithms import ALGORITHMS, Algorithm, apply_defaults, check, get, select_groups
from reval_jax.objective.losses import LOSSES, REWARD_TRANSFORMS, LossNorm, grpo_advantages
from reval_jax.objective.packing import pack_rows
from reval_jax.objective.train_step import StepConfig
from reval_jax.tools.plot import no_curve

# ----------------------------------------------------------------------------- what the registry replaces

# reval_jax/run/train.py's ALGORITHM_DEFAULTS and the algorithm checks of its check_config at 5d223e0,
# frozen here so that the registry is held to them after train.py stops carrying them
LEGACY_DEFAULTS = {
    "reval": {},
    "regression": {"reward.transform": "centered"},
    "tbrm": {"reward.transform": "binary", "reference.reset_every": 0,
             "replay.updates_per_iteration": 1, "replay.schedule": "on_policy_first"},
    "grpo": {"replay.updates_per_iteration": 1, "replay.schedule": "on_policy_first"},
}


def legacy_check(config) -> None:
    """The algorithm-related lines of train.check_config at 5d223e0, in their order."""
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


def legacy_apply(config) -> list[str]:
    changes = []
    if not config.get("algorithm_defaults", True):
        return changes
    for field, value in LEGACY_DEFAULTS.get(config.algorithm, {}).items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = getattr(node, p)
        if getattr(node, leaf) != value:
            changes.append(f"{field}: {getattr(node, leaf)!r} -> {value!r}")
            with config.unlocked():
                setattr(node, leaf, value)
    return changes


def registry_check(config) -> None:
    """What the run's config layer does: the generic reward.transform / replay.schedule checks, with
    the registry's check where the legacy code had its algorithm checks (an unknown name first)."""
    get(config.algorithm)
    if config.reward.transform not in REWARD_TRANSFORMS:
        raise UserError(f"config.reward.transform: {config.reward.transform!r} is not one of {REWARD_TRANSFORMS}")
    if config.replay.schedule not in ("on_policy_first", "buffer_only"):
        raise UserError(f"config.replay.schedule: {config.replay.schedule!r}: use on_policy_first or buffer_only")
    check(config)


def error_of(fn, config) -> str | None:
    try:
        fn(config)
    except UserError as e:
        return str(e)
    return None


def variants():
    """base.py with every combination of the fields the algorithms imply or check."""
    grid = itertools.product(sorted(LEGACY_DEFAULTS), REWARD_TRANSFORMS + ("bogus",), (1, 2),
                             ("on_policy_first", "buffer_only", "bogus"), (200, 0), (True, False))
    for algorithm, transform, k, schedule, reset, defaults in grid:
        c = base.get_config()
        c.algorithm, c.reward.transform, c.replay.updates_per_iteration = algorithm, transform, k
        c.replay.schedule, c.reference.reset_every, c.algorithm_defaults = schedule, reset, defaults
        yield c


def test_defaults_and_checks_reproduce_the_code_they_replace():
    for config in variants():
        ours, theirs = config, copy.deepcopy(config)
        assert apply_defaults(ours) == legacy_apply(theirs)
        assert ours.to_dict() == theirs.to_dict()
        assert error_of(registry_check, ours) == error_of(legacy_check, theirs), ours.algorithm
    unknown = base.get_config()
    unknown.algorithm = "ppo"
    assert apply_defaults(unknown) == []
    with pytest.raises(UserError, match=r"^config.algorithm: 'ppo' is not one of \['dapo', 'grpo', 'regression', "
                                        r"'reval', 'rloo', 'tbrm'\]$"):
        check(unknown)


# ----------------------------------------------------------------------------- the registry


def test_registry_records():
    assert sorted(ALGORITHMS) == ["dapo", "grpo", "regression", "reval", "rloo", "tbrm"]
    assert {n for n, a in ALGORITHMS.items() if a.uses_reference} == {"reval", "tbrm", "regression"}
    assert {n for n, a in ALGORITHMS.items() if a.advantages} == {"grpo", "rloo", "dapo"}
    assert [n for n, a in ALGORITHMS.items() if a.filter_groups or a.shape_rewards] == ["dapo"]
    for name, algorithm in ALGORITHMS.items():
        assert get(name) is algorithm and algorithm.name == name and algorithm.summary
        assert algorithm.loss in LOSSES.values()
        assert StepConfig(loss=name).uses_reference == algorithm.uses_reference
        assert bool(algorithm.plot) == (not algorithm.uses_reference)  # every missing KL curve is explained
        with pytest.raises(TypeError):
            algorithm.defaults["x"] = 1  # read-only
    assert no_curve("kl_mean", "grpo") == "GRPO uses no reference policy: no KL curve"
    assert no_curve("kl_mean", "rloo") and no_curve("kl_mean", "dapo") and no_curve("kl_mean", "reval") is None
    with pytest.raises(UserError, match="config.algorithm: 'ppo' is not one of"):
        StepConfig(loss="ppo")
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register(Algorithm(name="grpo", loss=LOSSES["grpo"], options=lambda cfg: {}))


def test_register_adds_an_algorithm_with_one_record():
    record = Algorithm(name="reinforce_test", loss=LOSSES["grpo"], options=lambda cfg: {"aggregation": "token-mean"},
                       defaults={"replay.updates_per_iteration": 1}, advantages=lambda r, g: r,
                       uses_reference=False)
    try:
        assert algorithms.register(record) is record and get("reinforce_test") is record
        config = base.get_config()
        config.algorithm = "reinforce_test"
        assert apply_defaults(config) == ["replay.updates_per_iteration: 2 -> 1"]
        check(config)
        assert not StepConfig(loss="reinforce_test").uses_reference
    finally:
        del ALGORITHMS["reinforce_test"]


@pytest.mark.parametrize("name", ["rloo", "dapo"])
@pytest.mark.parametrize("make", [base.get_config, tiny.get_config])
def test_new_algorithms_are_one_flag(name, make):
    config = make()
    config.algorithm = name
    changes = apply_defaults(config)
    check(config)
    assert "replay.updates_per_iteration: 2 -> 1" in changes
    assert config.replay.updates_per_iteration == 1 and config.replay.schedule == "on_policy_first"
    assert not StepConfig(loss=name).uses_reference
    if name == "dapo":
        assert (config.reward.transform, config.grpo.aggregation) == ("binary", "token-mean")
        assert (config.grpo.clip_low, config.grpo.clip_high) == (0.2, 0.28)


CHECKS = [
    ("rloo", {"replay.updates_per_iteration": 2}, "config.replay.updates_per_iteration: 2: RLOO does not store"),
    ("rloo", {"sampling.num_samples": 1}, "config.sampling.num_samples: 1: RLOO takes the mean of the other"),
    ("dapo", {"replay.updates_per_iteration": 3}, "config.replay.updates_per_iteration: 3: DAPO does not store"),
    ("dapo", {"sampling.num_samples": 1}, "config.sampling.num_samples: 1: DAPO keeps the prompts"),
    ("dapo", {"reward.transform": "centered"}, "config.reward.transform: 'centered': DAPO's advantages"),
    ("dapo", {"grpo.aggregation": "seq-mean-token-mean"}, "config.grpo.aggregation: 'seq-mean-token-mean': DAPO"),
    ("dapo", {"dapo.overlong_cache": 1.0}, "config.dapo.overlong_cache: 1.0: L_cache is a fraction"),
    ("dapo", {"dapo.max_extra_generations": -1}, "config.dapo.max_extra_generations: -1 must be >= 0"),
]


@pytest.mark.parametrize(("name", "fields", "message"), CHECKS)
def test_new_algorithms_refuse_what_they_cannot_run(name, fields, message):
    config = base.get_config()
    config.algorithm = name
    apply_defaults(config)
    check(config)
    config.algorithm_defaults = False
    for field, value in fields.items():
        node, leaf = config, field.split(".")
        for p in leaf[:-1]:
            node = getattr(node, p)
        setattr(node, leaf[-1], value)
    assert apply_defaults(config) == []
    with pytest.raises(UserError) as e:
        check(config)
    assert str(e.value).startswith(message), str(e.value)


# ----------------------------------------------------------------------------- numpy references


def random_batch(seed: int, group_sizes=(4, 4, 1, 3, 4), t: int = 14) -> Trajectories:
    """Random trajectories in prompt groups of the given sizes, 0/1 rewards, varied lengths."""
    rng = np.random.default_rng(seed)
    b = sum(group_sizes)
    attn, resp = np.zeros((b, t), bool), np.zeros((b, t), bool)
    s1 = np.zeros(b, np.int32)
    for i in range(b):
        prompt, response = int(rng.integers(1, 4)), int(rng.integers(1, t - 3))
        attn[i, : prompt + response] = resp[i, prompt : prompt + response] = True
        s1[i] = prompt - 1
    raw = rng.integers(0, 2, b).astype(np.float32)
    group = np.repeat(np.arange(len(group_sizes)), group_sizes)
    return Trajectories.from_numpy(dict(
        tokens=np.where(attn, rng.integers(1, 50, (b, t)), 0), attn_mask=attn, response_mask=resp, s1_index=s1,
        group_id=group, reward=raw, raw_reward=raw, ref_logp=np.zeros((b, t)), ref_v=np.zeros(b),
        ref_version=np.zeros(b), sampler_logp=np.where(resp, -rng.exponential(1.0, (b, t)), 0.0),
        iteration=np.zeros(b)))


def policy_logps(batch: Trajectories, seed: int):
    """(log π_θ, log π_old) [B, T]: the ratio spreads over both clip bounds."""
    rng = np.random.default_rng(seed)
    old = np.where(batch.response_mask, batch.sampler_logp + rng.normal(0, 0.3, batch.tokens.shape), 0.0)
    logp = np.where(batch.response_mask, old + rng.uniform(-0.6, 0.6, batch.tokens.shape), 0.0)
    return logp.astype(np.float32), old.astype(np.float32)


def loop_rloo(raw, group_id):
    out = []
    for i in range(len(raw)):
        others = [float(raw[j]) for j in range(len(raw)) if group_id[j] == group_id[i] and j != i]
        out.append(float(raw[i]) - (sum(others) / len(others) if others else 0.0))
    return np.array(out)


def loop_grpo_advantages(reward, group_id, eps=1e-6):
    out = []
    for i in range(len(reward)):
        members = [float(reward[j]) for j in range(len(reward)) if group_id[j] == group_id[i]]
        n = len(members)
        mean = sum(members) / n if n > 1 else 0.0
        std = (sum((x - mean) ** 2 for x in members) / (n - 1)) ** 0.5 if n > 1 else 1.0
        out.append((float(reward[i]) - mean) / (std + eps))
    return np.array(out)


def loop_policy_loss(logp, old, batch, adv, lo, hi, aggregation, c=3.0, cap=2.0):
    """The clipped policy-gradient loss, one token at a time: token-mean or the mean of per-sequence means."""
    sums, counts = [], []
    for i in range(batch.batch_size):
        total, count = 0.0, 0
        for t in range(batch.length):
            if batch.response_mask[i, t]:
                ratio = np.exp(float(logp[i, t]) - float(old[i, t]))
                a = float(adv[i])
                loss = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
                loss = min(loss, -a * c) if a < 0 else loss
                total += loss * min(np.exp(float(old[i, t]) - float(batch.sampler_logp[i, t])), cap)
                count += 1
        sums.append(total)
        counts.append(count)
    if aggregation == "token-mean":
        return sum(sums) / sum(counts)
    return sum(s / n for s, n in zip(sums, counts, strict=True)) / len(sums)


def loop_overlong(length, max_length, cache):
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


def loop_keep(raw, group_id):
    return np.array([len({float(raw[j]) for j in range(len(raw)) if group_id[j] == group_id[i]}) > 1
                     for i in range(len(raw))])


# ----------------------------------------------------------------------------- RLOO


@pytest.mark.parametrize("seed", range(4))
def test_rloo_advantages_match_loop(seed):
    rng = np.random.default_rng(seed)
    raw = rng.normal(0, 1, 23).astype(np.float32)  # any real rewards, not only 0/1
    group_id = rng.integers(0, 7, 23)  # shuffled groups of varied sizes (singletons included)
    advantages = get("rloo").advantages(raw, group_id)
    np.testing.assert_allclose(advantages, loop_rloo(raw, group_id), rtol=1e-5, atol=1e-6)
    single = np.array([np.sum(group_id == g) == 1 for g in group_id])
    np.testing.assert_array_equal(advantages[single], raw[single])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_rloo_loss_matches_loop(aggregation):
    batch = random_batch(1)
    logp, old = policy_logps(batch, 1)
    algorithm = get("rloo")
    advantages = algorithm.batch_advantages(batch)
    np.testing.assert_allclose(advantages, loop_rloo(batch.raw_reward, batch.group_id), rtol=1e-5, atol=1e-6)
    cfg = StepConfig(loss="rloo", grpo_aggregation=aggregation, clip_low=0.2, clip_high=0.28)
    loss, metrics = algorithm.loss_fn(cfg)(logp, None, pack_rows(batch, advantages=advantages),
                                           LossNorm.for_batch(batch), old_logp=old)
    expected = loop_policy_loss(logp, old, batch, loop_rloo(batch.raw_reward, batch.group_id), 0.2, 0.28, aggregation)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < float(metrics["clip_frac_low"]) and 0 < float(metrics["clip_frac_high"])  # both bounds act


# ----------------------------------------------------------------------------- DAPO


def test_overlong_penalty_matches_loop():
    config = base.get_config()
    config.algorithm, config.sampling.max_new_tokens, config.dapo.overlong_cache = "dapo", 100, 0.2
    apply_defaults(config)
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 101, 40), [80, 81, 90, 100, 101]])
    raw = rng.integers(0, 2, 45).astype(np.float32)
    group_id = np.arange(45) // 5
    shaped = get("dapo").rewards(raw, group_id, lengths, config)
    expected = [float(r) + loop_overlong(int(n), 100, 20) for r, n in zip(raw, lengths, strict=True)]
    np.testing.assert_allclose(shaped, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shaped[-5:] - raw[-5:], [0.0, -0.05, -0.5, -1.0, -1.0], atol=1e-6)
    config.dapo.overlong_cache = 0.0  # no shaping
    np.testing.assert_array_equal(get("dapo").rewards(raw, group_id, lengths.clip(max=100), config), raw)
    config.algorithm, config.reward.transform = "grpo", "centered"  # without shaping: the reward transform alone
    apply_defaults(config)
    np.testing.assert_allclose(get("grpo").rewards(raw, group_id, lengths, config),
                               raw - np.repeat(raw.reshape(9, 5).mean(1), 5), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_sampling_filter_matches_loop(seed):
    rng = np.random.default_rng(seed)
    group_id = rng.permutation(np.repeat(np.arange(9), 4))[: 30]  # shuffled, some groups cut short
    raw = rng.integers(0, 2, 30).astype(np.float32)
    raw[group_id == 0] = 1.0  # at least one all-right and one all-wrong group
    raw[group_id == 1] = 0.0
    keep = get("dapo").filter_groups(raw, group_id)
    np.testing.assert_array_equal(keep, loop_keep(raw, group_id))
    assert not keep[group_id <= 1].any() and keep.any()


def test_select_groups_keeps_varied_groups_first_then_tops_up():
    group_id = np.repeat([10, 11, 12, 13, 14], 2)
    keep = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    np.testing.assert_array_equal(select_groups(keep, group_id, 2), [2, 3, 6, 7])  # the first two kept
    np.testing.assert_array_equal(select_groups(keep, group_id, 3), [2, 3, 6, 7, 8, 9])
    np.testing.assert_array_equal(select_groups(keep, group_id, 4), [0, 1, 2, 3, 6, 7, 8, 9])  # + first dropped
    with pytest.raises(ValueError, match="5 groups generated, 6 needed"):
        select_groups(keep, group_id, 6)


@pytest.mark.parametrize("seed", range(2))
def test_dapo_loss_matches_loop(seed):
    """Shaped reward -> group-normalised advantages -> token-level clipped loss with clip-higher,
    whatever grpo.aggregation the StepConfig carries."""
    config = base.get_config()
    config.algorithm, config.sampling.max_new_tokens = "dapo", 10  # L_cache 2: lengths 9, 10 are penalised
    apply_defaults(config)
    batch = random_batch(seed + 10)
    lengths = np.asarray(batch.response_mask).sum(1)
    algorithm = get("dapo")
    reward = algorithm.rewards(batch.raw_reward, batch.group_id, lengths, config)
    expected_reward = [float(r) + loop_overlong(int(n), 10, 2)
                       for r, n in zip(batch.raw_reward, lengths, strict=True)]
    np.testing.assert_allclose(reward, expected_reward, atol=1e-6)
    assert np.any(reward != batch.raw_reward)  # the shaping acts on this data
    batch = batch.replace(reward=reward)
    advantages = algorithm.batch_advantages(batch)
    expected_adv = loop_grpo_advantages(expected_reward, batch.group_id)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grpo_advantages(reward, batch.group_id), advantages)
    logp, old = policy_logps(batch, seed)
    cfg = StepConfig(loss="dapo", grpo_aggregation="seq-mean-token-mean", clip_low=config.grpo.clip_low,
                     clip_high=config.grpo.clip_high)
    loss, metrics = algorithm.loss_fn(cfg)(logp, None, pack_rows(batch, advantages=advantages),
                                           LossNorm.for_batch(batch), old_logp=old)
    expected = loop_policy_loss(logp, old, batch, expected_adv, 0.2, 0.28, "token-mean")
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    assert 0 < float(metrics["clip_frac_high"])  # the higher bound 1.28 acts
