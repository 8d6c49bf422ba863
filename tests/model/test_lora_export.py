"""LoRA export (reval_jax.model.peft): the PEFT adapter loads onto the HF base in Hugging Face `peft`
with our adapted model's logits, the merged model saved by save_hf loads in transformers with the same
logits (and equals peft's own merge_and_unload), save_hf refuses a model with adapters, and
merged_model leaves its input unchanged."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from models import FAMILIES, LONG, hf_dir, hf_logits, padded_batch

from reval_jax.errors import UserError
from reval_jax.model.hf import SafetensorsDir, load_hf, save_hf
from reval_jax.model.lora import TARGETS, LoraConfig, add_adapters, lora_config, merge
from reval_jax.model.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_model, merged_model, save_peft
from reval_jax.parallel.sharding import make_mesh

LORA = LoraConfig(rank=4, alpha=8.0)  # s = α/r = 2
SUBSET = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
# The HF parity tolerance of tests/model/test_hf.py (float32 logits of size ~5 against transformers).
TOL = 1e-4


def _roundings(w: np.ndarray) -> float:
    """Four float32 roundings at the size of the largest entry of `w`: how far two float32 evaluations of
    W + s·A·B in another order (peft's s·(B·A), or a partitioned product on a mesh) may differ. Measured:
    at most one rounding (2.4e-7 for entries up to 2.4)."""
    return 4 * float(np.finfo(np.float32).eps) * float(np.abs(w).max())


CASES = [(f, LORA) for f in FAMILIES] + [("qwen3", SUBSET)]
IDS = [f"{f}-all" for f in FAMILIES] + ["qwen3-q_v"]


def _adapted(family: str, lora: LoraConfig, mesh=None):
    """The tiny random HF model of `family` (float32) with adapters whose A and B are random normal
    (B is zero at init; a trained adapter's is not), so that the adapter moves the logits."""
    model = load_hf(hf_dir(family=family), load_tokenizer=False, mesh=mesh)[0]
    add_adapters(model, lora, seed=1)
    _randomize(model, seed=7)
    return model


def _randomize(model, seed: int) -> None:
    lora = lora_config(model)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(lora.targets)))
    for name in lora.targets:
        for part, std in (("a", 0.3), ("b", 0.3)):
            var = getattr(model.adapters, f"{name}_{part}")
            value = std * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
            var.set_value(jax.device_put(value, var[...].sharding))


def _ours(model) -> np.ndarray:
    tokens, mask, _ = padded_batch("left", length=LONG)
    return np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))


def _theirs(hf_model) -> np.ndarray:
    tokens, mask, positions = padded_batch("left", length=LONG)
    return hf_logits(hf_model, tokens, mask, positions)


def _mask():
    return padded_batch("left", length=LONG)[1]


def _hf_base(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()


def _peft_model(family: str, adapter_dir):
    """peft's model: a fresh copy of the HF base (PeftModel injects its layers in place) plus the adapter."""
    import peft

    return peft.PeftModel.from_pretrained(_hf_base(hf_dir(family=family)), str(adapter_dir)).eval()


@pytest.mark.parametrize("family, lora", CASES, ids=IDS)
def test_peft_adapter_loads_onto_the_base_with_our_logits(tmp_path, family, lora):
    model = _adapted(family, lora)
    ours, mask = _ours(model), _mask()
    base = _theirs(_hf_base(hf_dir(family=family)))
    assert np.abs(ours - base)[mask].max() > 0.1  # the adapter changes the model: the check below has teeth

    out = save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir(family=family)))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert config["target_modules"] == list(lora.targets)
    assert config["base_model_name_or_path"] == str(hf_dir(family=family))
    names = SafetensorsDir(out).names()
    assert len(names) == 2 * len(lora.targets) * model.cfg.num_layers
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names

    theirs = _peft_model(family, out)
    assert np.abs(ours - _theirs(theirs))[mask].max() <= TOL


@pytest.mark.parametrize("family, lora", CASES, ids=IDS)
def test_merged_model_saved_by_save_hf_has_our_logits_and_equals_peft_merge(tmp_path, family, lora):
    model = _adapted(family, lora)
    ours, mask = _ours(model), _mask()
    merged = merged_model(model)
    assert lora_config(merged) is None
    out = save_hf(merged, None, tmp_path / "merged")
    hf = _hf_base(out)
    assert np.abs(ours - _theirs(hf))[mask].max() <= TOL

    adapter = save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir(family=family)))
    unloaded = _peft_model(family, adapter).merge_and_unload()
    assert type(unloaded) is type(hf)
    assert np.abs(ours - _theirs(unloaded))[mask].max() <= TOL
    # the same weights as peft's merge: W + s·B·A in float32 both ways, up to float32 rounding of the sum
    mine, theirs = hf.state_dict(), unloaded.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, w in mine.items():
        w, ref = w.numpy(), theirs[name].numpy()
        np.testing.assert_allclose(w, ref, rtol=0, atol=_roundings(ref), err_msg=name)


def test_save_hf_refuses_a_model_with_adapters_and_merged_model_leaves_it_unchanged(tmp_path):
    model = _adapted("qwen2", LORA)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}
    logits = _ours(model)
    with pytest.raises(UserError, match="has LoRA adapters: export merged_model"):
        save_hf(model, None, tmp_path / "refused")
    assert not (tmp_path / "refused" / "config.json").exists()

    merged = merged_model(model)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(_ours(model), logits)
    assert lora_config(model) == LORA and lora_config(merged) is None
    # a plain model's graph: what the base had before add_adapters
    plain = load_hf(hf_dir(family="qwen2"), load_tokenizer=False)[0]
    assert nnx.graphdef(merged) == nnx.graphdef(plain)
    for name in nnx.state(plain):  # targets are new arrays, everything else is shared
        changed = getattr(merged, name)[...] is not getattr(model, name)[...]
        assert changed == (name in TARGETS), name
    base = base_model(model)
    assert nnx.graphdef(base) == nnx.graphdef(plain) and lora_config(base) is None
    assert all(getattr(base, name)[...] is getattr(model, name)[...] for name in nnx.state(plain))
    assert merged_model(plain) is plain and base_model(plain) is plain
    with pytest.raises(UserError, match="no adapters"):
        save_peft(plain, tmp_path / "none", base_model_name_or_path="x")


def test_after_a_merge_the_adapter_goes_on_the_exported_current_base(tmp_path):
    """After a reference reset (merge: W changed, B = 0) and more training (new B), the PEFT adapter
    reproduces the policy on base_model(model) saved by save_hf, not on the pretrained checkpoint."""
    import peft

    model = _adapted("llama", LORA)
    merge(model)
    _randomize(model, seed=8)
    ours, mask = _ours(model), _mask()
    base = save_hf(base_model(model), None, tmp_path / "base")
    assert lora_config(model) == LORA  # base_model left the adapters on the input
    adapter = save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    theirs = peft.PeftModel.from_pretrained(_hf_base(base), str(adapter)).eval()
    assert np.abs(ours - _theirs(theirs))[mask].max() <= TOL
    on_pretrained = _peft_model("llama", adapter)  # the adapter on the checkpoint before the merge
    assert np.abs(ours - _theirs(on_pretrained))[mask].max() > 0.1


def test_export_of_a_sharded_model_equals_the_unsharded_one(tmp_path):
    """On a (1, 2, 4) mesh of 8 devices: merged weights keep their base's sharding and equal the
    unsharded merge up to float32 rounding (the partitioned product may sum in another order), and
    the adapter files are byte for byte the ones of the same model on one device."""
    single = _adapted("qwen3", LORA)
    sharded = _adapted("qwen3", LORA, mesh=make_mesh((1, 2, 4)))
    m1, m8 = merged_model(single), merged_model(sharded)
    for name in TARGETS:
        w8 = getattr(m8, name)[...]
        assert w8.sharding == getattr(sharded, name)[...].sharding, name
        w1 = np.asarray(getattr(m1, name)[...])
        np.testing.assert_allclose(np.asarray(w8), w1, rtol=0, atol=_roundings(w1), err_msg=name)
    a = save_peft(single, tmp_path / "one", base_model_name_or_path="base")
    b = save_peft(sharded, tmp_path / "eight", base_model_name_or_path="base")
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_save_peft_dtype(tmp_path):
    model = _adapted("llama", SUBSET)
    f32 = SafetensorsDir(save_peft(model, tmp_path / "f32", base_model_name_or_path="base"))
    bf16 = SafetensorsDir(save_peft(model, tmp_path / "bf16", base_model_name_or_path="base", dtype="bfloat16"))
    assert f32.names() == bf16.names()
    for name in f32.names():
        assert f32.read(name).dtype == np.float32 and bf16.read(name).dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(bf16.read(name), f32.read(name).astype(ml_dtypes.bfloat16))
