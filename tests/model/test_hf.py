"""Hugging Face conversion: export round trips, sharded checkpoints, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO_ROOT
from models import FAMILIES, LLAMA3_ROPE, LONG, hf_dir, hf_logits, padded_batch

import reval_jax
from reval_jax.model.config import family_switches, preset
from reval_jax.model.hf import SafetensorsDir, write_safetensors

ASSETS = f"{REPO_ROOT}/reval_jax/assets/tiny_arith"  # the demo model


def _tensors(path) -> dict[str, np.ndarray]:
    st = SafetensorsDir(path)
    return {n: np.array(st.read(n)) for n in st.names()}


ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def _tiny(family: str, **overrides):
    """preset("tiny") in `family`; Llama with scaled RoPE (positions up to LONG cross every band)."""
    if family == "llama":
        overrides["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    return preset("tiny", **family_switches(family), **overrides)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_ours_to_hf_to_transformers_gives_same_logits(tmp_path, family):
    import transformers

    for tie in (False, True):
        model = reval_jax.create_model(_tiny(family, tie_word_embeddings=tie), seed=3)
        out = reval_jax.save_hf(model, None, tmp_path / f"tie{tie}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
        assert type(hf).__name__ == ARCHITECTURES[family]
        assert hf.num_parameters() == model.cfg.num_params()
        tokens, mask, positions = padded_batch("left", vocab=model.cfg.vocab_size, length=LONG)
        ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
        ref = hf_logits(hf, tokens, mask, positions)
        assert np.abs(ours - ref)[mask].max() <= 1e-4
        again, _ = reval_jax.load_hf(out, load_tokenizer=False)
        assert again.cfg == model.cfg


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_ours_to_hf_gives_identical_tensors(tmp_path, family, tie):
    src = hf_dir(tie=tie, family=family)
    model, _ = reval_jax.load_hf(src, load_tokenizer=False)
    out = reval_jax.save_hf(model, None, tmp_path / "out")
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURES[family]] and cfg["tie_word_embeddings"] == tie
    assert cfg["model_type"] == family


def test_both_rope_spellings_of_config_json_load_alike(tmp_path):
    """transformers 5.x writes `rope_parameters` (holding rope_theta); Llama-3.1's own config.json
    (transformers 4.x) has `rope_theta` and `rope_scaling`."""
    path = _copy(tmp_path, family="llama")
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    assert params["rope_type"] == "llama3"
    new, _ = reval_jax.load_hf(path, load_tokenizer=False)
    cfg.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
    (path / "config.json").write_text(json.dumps(cfg))
    old, _ = reval_jax.load_hf(path, load_tokenizer=False)
    assert old.cfg == new.cfg and old.cfg.rope_scaling.original_max_position_embeddings == 32


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False)
    sharded_dir = hf_dir(max_shard_size="40KB")  # transformers' own sharded format
    assert (sharded_dir / "model.safetensors.index.json").exists()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    sharded, _ = reval_jax.load_hf(sharded_dir, load_tokenizer=False)
    tokens = jnp.asarray(padded_batch("none")[0])
    np.testing.assert_array_equal(np.asarray(single(tokens)), np.asarray(sharded(tokens)))

    # and our own sharded export, loaded back by transformers and by us
    import transformers

    out = reval_jax.save_hf(single, None, tmp_path / "ours", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    again, _ = reval_jax.load_hf(out, load_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(single(tokens)), np.asarray(again(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
    t, m, p = padded_batch("none")
    assert np.abs(hf_logits(hf, t, m, p) - np.asarray(single(tokens))).max() <= 1e-4


def test_bfloat16_checkpoint_round_trip(tmp_path):
    model, _ = reval_jax.load_hf(hf_dir(), load_tokenizer=False, param_dtype="bfloat16")
    out = reval_jax.save_hf(model, None, tmp_path / "bf16")
    tensors = _tensors(out)
    assert all(str(x.dtype) == "bfloat16" for x in tensors.values())
    again, _ = reval_jax.load_hf(out, load_tokenizer=False, param_dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(model.q_proj[...]), np.asarray(again.q_proj[...]))
    ref = _tensors(hf_dir())["model.layers.1.mlp.up_proj.weight"]
    got = tensors["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-2)  # one bfloat16 rounding of float32 weights


def test_tokenizer_travels_with_the_model(tmp_path):
    from helpers import tiny_tokenizer

    model, tok = reval_jax.load_hf(hf_dir(tokenizer=True))
    assert tok is not None and tok.chat_template
    text = "Compute 7-3+4.\n 12 + 30 = \\boxed{42}"
    assert tok.encode(text) == tiny_tokenizer().encode(text)  # exactly the tokenizer that was saved
    out = reval_jax.save_hf(model, tok, tmp_path / "with_tok")
    _, tok2 = reval_jax.load_hf(out)
    text = "What is 12 + 30? \\boxed{42}"
    assert tok2.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_exported_char_tokenizer_loads_with_auto_tokenizer(tmp_path):
    """AutoTokenizer builds a Qwen2Tokenizer for any model_type qwen2 directory; the exported
    files must give it the same ids as the character tokenizer (it dropped spaces and newlines)."""
    import transformers

    model, tok = reval_jax.load_hf(hf_dir(tokenizer=True))
    out = reval_jax.save_hf(model, tok, tmp_path / "exported")
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = auto("a b\nc", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and auto.decode(ids) == "a b\nc"
    for text in ("a b\nc", "Compute 7-3+4.\n\t 12 + 30 = \\boxed{42} é€ <think>x</think><|im_end|>"):
        assert auto(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert auto.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    _, ours = reval_jax.load_hf(out)  # load_hf's own path gives the same ids too
    assert ours("a b\nc", add_special_tokens=False)["input_ids"] == ids
    assert auto.eos_token_id == tok.eos_token_id and auto.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------- errors


def _copy(tmp_path, **kw):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_dir(**kw), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = _tensors(path)
    fn(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such Hugging Face model directory"):
        reval_jax.load_hf(tmp_path / "nope")


def test_unsupported_architecture_is_named(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(ValueError, match="unsupported model.*qwen3_moe.*Qwen3MoeForCausalLM"):
        reval_jax.load_hf(path, load_tokenizer=False)
    _edit_config(path, model_type="llama", architectures=["Qwen2ForCausalLM"])  # disagreeing
    with pytest.raises(ValueError, match="unsupported model.*llama.*Qwen2ForCausalLM"):
        reval_jax.load_hf(path, load_tokenizer=False)


@pytest.mark.parametrize("family, changes, pattern", [
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported for model_type 'llama'"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true is not supported for model_type 'qwen3'"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 32}},
     "rope_parameters rope_type='yarn' is not supported"),
    ("qwen2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling rope_type='dynamic' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     r"rope_parameters of rope_type 'llama3' lacks \['low_freq_factor'"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]},
     r"layer_types \['sliding_attention'\] are not supported"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
], ids=["llama-attention-bias", "qwen3-attention-bias", "mlp-bias", "yarn", "dynamic",
        "llama3-incomplete", "sliding-window", "layer-types", "gelu"])
def test_unsupported_field_is_named(tmp_path, family, changes, pattern):
    from reval_jax.errors import UserError

    path = _copy(tmp_path, family=family)
    _edit_config(path, **changes)
    with pytest.raises(UserError, match=pattern):
        reval_jax.load_hf(path, load_tokenizer=False)


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"):
        reval_jax.load_hf(path, load_tokenizer=False)


def test_unexpected_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    extra = "model.layers.2.mlp.up_proj.weight"
    _edit_tensors(path, lambda t: t.update({extra: t["model.layers.1.mlp.up_proj.weight"]}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\]"):
        reval_jax.load_hf(path, load_tokenizer=False)


def test_shape_mismatch_is_named(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, intermediate_size=96)
    pattern = r"shape mismatch for tensor model.layers.0.mlp.gate_proj.weight.*\(96, 32\).*\(64, 32\)"
    with pytest.raises(ValueError, match=pattern):
        reval_jax.load_hf(path, load_tokenizer=False)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        reval_jax.load_hf(_copy(tmp_path))


@pytest.mark.slow
def test_export_generates_in_transformers_and_stops_where_our_sampler_stops(tmp_path):
    """The demo model, saved: config.json and generation_config.json name the sampler's stop ids, and
    transformers' greedy generate() gives our greedy tokens and stops at the same stop token."""
    import torch
    import transformers

    from reval_jax.data.templates import encode_prompt, stop_token_ids
    from reval_jax.rollout.sampler import SamplingConfig, generate

    model, tok = reval_jax.load_hf(ASSETS)
    out = reval_jax.save_hf(model, tok, tmp_path / "demo", sampling={"temperature": 0.0})
    stops = stop_token_ids(tok)
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == (stops if len(stops) > 1 else stops[0]) and saved["do_sample"] is False
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == saved["eos_token_id"]

    problems = ["Compute 5+1-4+1.", "Compute 8-5-2-1.", "Compute 2+2+3-1."]
    prompts = [encode_prompt(tok, p, "plain") for p in problems]
    A = 48
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=A, num_samples=1, greedy=True,
                                                   stop_ids=tuple(stops), buckets=(48,), pad_id=tok.pad_token_id))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    stopped = 0
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=A)[0, len(prompt):].tolist()  # generation_config's defaults
        n = int(np.asarray(ours.response_length)[i])
        want = np.asarray(ours.response_tokens)[i, :n].tolist()
        assert seq == want, (problems[i], seq, want)  # same tokens, and nothing after the stop token
        stopped += want[-1] in stops
    assert stopped == len(prompts)  # every answer ended on a stop token, within A tokens
