"""LoRA runs end to end (issue #28): the trainer trains the adapters only, a reference reset is a merge
(reported in the metrics), checkpoints hold the base only once a merge has changed it, a resumed run
equals the uninterrupted one bit for bit, the stored-reference path (recompute of stale terms) and the
flush option run, and the rollout copy holds the merged weights."""


import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import InlineScorer, metric_records, tiny_config

from reval_jax.model import lora
from reval_jax.run import train
from reval_jax.run.policy import load_checkpoint_policy, make_run_mesh

# the tests that compare with the module's straight run share one pytest-xdist worker (xdist_group)
pytestmark = pytest.mark.e2e
SHARED = pytest.mark.xdist_group("test_lora_run")

LORA = {"lora.rank": 2, "lora.targets": ("q_proj", "v_proj", "o_proj", "down_proj"), "reference.reset_every": 4,
        "optimizer.learning_rate": 1e-2}


def config(data_file, **overrides):
    return tiny_config(data_file, **{**LORA, **overrides})


class ParityScorer(InlineScorer):
    """Reward 1 for a response of an odd number of characters: the tiny random model never solves the
    arithmetic, and a LoRA run with all-zero rewards would leave B = 0 (nothing to merge)."""

    def score(self, pairs) -> list[float]:
        super().score(pairs)
        return [float(len(response) % 2) for response, _ in pairs]


def run(cfg, workdir):
    return train.run(cfg, str(workdir), scorer=ParityScorer())


def policy_state(workdir, cfg):
    model, _ = load_checkpoint_policy(workdir / "checkpoints", cfg, make_run_mesh(cfg))
    return jax.tree.map(np.asarray, nnx.state(model))


@pytest.fixture(scope="module")
def straight(data_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_straight")
    run(config(data_file, num_iterations=4), workdir)
    return workdir


@SHARED
def test_a_lora_run_trains_the_adapters_and_merges_at_resets(straight, data_file):
    train_records = [r for r in metric_records(straight) if r["kind"] == "train"]
    assert [r["updates"] for r in train_records] == [2, 4, 6, 8]
    assert [r["ref_version"] for r in train_records] == [0, 1, 1, 2]  # a reset every 4 updates = a merge
    merged = [r for r in train_records if "lora/merge_update" in r]
    assert [r["iteration"] for r in merged] == [2, 4]
    assert all(r["lora/merge_update"] > 0 and r["lora/merge_rounding"] == 0.0 for r in merged)  # float32 base
    assert all(np.isfinite(r["loss"]) for r in train_records)
    # the checkpoint holds the base only once a merge has changed it
    steps = straight / "checkpoints"
    assert not (steps / "1" / "base").exists() and (steps / "2" / "base").exists()
    cfg = config(data_file, num_iterations=4)
    state = policy_state(straight, cfg)
    assert lora.is_adapted(state)
    base0 = nnx.state(train_policy(cfg))  # the model the run started from
    for name in ("q_proj", "v_proj", "o_proj", "down_proj"):
        assert np.abs(state[name].get_value() - np.asarray(base0[name].get_value())).max() > 0  # merged into W
    for name in ("k_proj", "up_proj", "embed"):  # not adapted: never changes
        np.testing.assert_array_equal(state[name].get_value(), np.asarray(base0[name].get_value()))


def train_policy(cfg):
    from reval_jax.run.config import model_settings
    from reval_jax.run.policy import load_hf_policy

    return load_hf_policy(model_settings(cfg), make_run_mesh(cfg))[0]


@SHARED
def test_a_resumed_lora_run_is_bitwise_the_uninterrupted_one(straight, data_file, tmp_path):
    run(config(data_file, num_iterations=1), tmp_path)
    assert not (tmp_path / "checkpoints" / "1" / "base").exists()  # no merge yet: the base is the start's
    run(config(data_file, num_iterations=4), tmp_path)  # resumes at 2, merges at 2 and 4
    assert metric_records(tmp_path) == metric_records(straight)
    cfg = config(data_file, num_iterations=4)
    a, b = policy_state(straight, cfg), policy_state(tmp_path, cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@SHARED
@pytest.mark.parametrize("on_reset", ["recompute", "flush"])
def test_stored_reference_terms_with_lora(on_reset, straight, data_file, tmp_path):
    """Without exact_reference the run stores reference terms (the base's: the adapter off) with the
    rollouts and recomputes them when a merge made them stale (or flushes the buffer). With recompute
    its losses are the exact-reference run's up to float32 rounding (the loss is evaluated at the
    differentiated pass's own values there); the flush changes what the updates after the merge draw."""
    run(config(data_file, num_iterations=3, exact_reference=False, **{"replay.on_reset": on_reset}), tmp_path)
    records = [r for r in metric_records(tmp_path) if r["kind"] == "train"]
    exact = [r for r in metric_records(straight) if r["kind"] == "train"][:3]
    assert [r["ref_version"] for r in records] == [0, 1, 1]
    same = 3 if on_reset == "recompute" else 2
    np.testing.assert_allclose([r["loss"] for r in records[:same]], [r["loss"] for r in exact[:same]], rtol=1e-3)
    if on_reset == "recompute":
        assert records[2]["buffer_num_recomputed"] > 0  # the merge made the stored terms stale
    else:
        assert records[2]["buffer_size"] < exact[2]["buffer_size"]  # flushed at the merge


def test_lora_config_errors_are_one_line(data_file, tmp_path):
    from reval_jax.errors import UserError

    with pytest.raises(UserError, match=r"config.lora.alpha: 2.2 gives a scale alpha / rank = 1.1 that bfloat16"):
        run(config(data_file, **{"lora.alpha": 2.2, "model.dtype": "bfloat16"}), tmp_path / "a")
    with pytest.raises(UserError, match=r"config.model.ref_dtype: 'bfloat16' does not apply with lora.rank > 0"):
        run(config(data_file, **{"model.ref_dtype": "bfloat16"}), tmp_path / "b")
    with pytest.raises(UserError, match=r"lora targets \['qproj'\] are not projections"):
        run(config(data_file, **{"lora.targets": ("qproj",)}), tmp_path / "c")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


@SHARED
def test_export_of_a_lora_run_writes_the_merged_model_and_a_peft_adapter_on_its_base(straight, data_file, tmp_path):
    """`reval_jax.export` of a LoRA run that merged twice: DIR is the merged model, DIR/base the merged
    base (the pretrained model is no longer the adapter's base), DIR/adapter the PEFT adapter naming it;
    transformers on DIR and peft on DIR/base + DIR/adapter give the run's policy's logits."""
    import peft
    import torch
    import transformers
    from models import hf_logits

    from reval_jax.run.export import export

    out = export(str(straight), str(tmp_path / "hf"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").absolute())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0
    cfg = config_of(data_file)
    policy, _ = load_checkpoint_policy(straight / "checkpoints", cfg, make_run_mesh(cfg))
    tokens = np.array([[5, 9, 13, 17, 21, 25, 29, 33]])
    mask, positions = np.ones_like(tokens), np.arange(tokens.shape[1])[None]
    ours = np.asarray(policy(jax.numpy.asarray(tokens), mask=jax.numpy.asarray(mask)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    for theirs in (hf_logits(merged, tokens, mask, positions), hf_logits(adapted, tokens, mask, positions)):
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.path, torch_dtype=torch.float32)
    wrong = peft.PeftModel.from_pretrained(pretrained, str(out / "adapter")).eval()
    assert np.abs(hf_logits(wrong, tokens, mask, positions) - ours).max() > 1e-3  # the base matters


def config_of(data_file):
    return config(data_file, num_iterations=4)


def test_a_lora_run_on_two_device_groups_pushes_adapters_and_runs_the_time_sliced_schedule(data_file, tmp_path,
                                                                                           monkeypatch):
    """Async on two device groups (rollouts on devices 0-3, updates on device 4): each push moves the
    adapters only (rollout.layout.AdapterPush) and the rollout group merges them; the rounds, their
    versions and the numbers are the time-sliced run's (same tokens: the merged copies are equal bit
    for bit; the losses to the rounding of the other layout), merges included."""
    from reval_jax.rollout import layout

    pushes = []
    real = layout.AdapterPush.__call__

    def counting(self, params, ref_version):
        pushes.append(ref_version)
        return real(self, params, ref_version)

    async2 = {"pipeline.mode": "async", "pipeline.max_staleness": 2}
    run(config(data_file, num_iterations=4, **async2), tmp_path / "sliced")
    monkeypatch.setattr(layout.AdapterPush, "__call__", counting)
    run(config(data_file, num_iterations=4, **async2, **{"pipeline.rollout_devices": 4}), tmp_path / "groups")
    assert pushes and pushes[-1] >= 1  # adapter pushes, after a merge too
    a, b = ([r for r in metric_records(tmp_path / w) if r["kind"] == "train"] for w in ("sliced", "groups"))
    for ra, rb in zip(a, b, strict=True):
        for k in ("staleness_max", "updates", "ref_version", "response_length", "accuracy"):
            assert ra[k] == rb[k], k
        np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-4, atol=1e-6)
