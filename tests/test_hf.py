"""Hugging Face conversion: export round trips, sharded checkpoints, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from models import hf_dir, hf_logits, padded_batch

import reval_jax
from reval_jax.config import preset
from reval_jax.hf import SafetensorsDir, write_safetensors


def _tensors(path) -> dict[str, np.ndarray]:
    st = SafetensorsDir(path)
    return {n: np.array(st.read(n)) for n in st.names()}


def test_ours_to_hf_to_transformers_gives_same_logits(tmp_path):
    import transformers

    for tie in (False, True):
        model = reval_jax.create_model(preset("tiny", tie_word_embeddings=tie), seed=3)
        out = reval_jax.save_hf(model, None, tmp_path / f"tie{tie}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
        tokens, mask, positions = padded_batch("left", vocab=model.cfg.vocab_size)
        ours = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
        ref = hf_logits(hf, tokens, mask, positions)
        assert np.abs(ours - ref)[mask].max() <= 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_to_ours_to_hf_gives_identical_tensors(tmp_path, tie):
    src = hf_dir(tie=tie)
    model, _ = reval_jax.load_hf(src, load_tokenizer=False)
    out = reval_jax.save_hf(model, None, tmp_path / "out")
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] == tie


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
    _edit_config(path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="unsupported model.*llama.*LlamaForCausalLM"):
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
