"""A tiny, fully local character tokenizer for the project's test and toy models.

One token per character of ``alphabet`` (default: printable ASCII, newline and tab); any other
character is spelled as its UTF-8 bytes (``<0xNN>`` tokens, byte fallback), so every string
round-trips exactly. Special tokens follow the Qwen2.5 conventions that the rest of the code relies
on: ``<|endoftext|>`` (EOS and padding), ``<|im_start|>``, ``<|im_end|>``, plus ``<think>`` /
``</think>`` (ordinary added tokens: kept when decoding with ``skip_special_tokens=True``, like in
the real R1-Distill tokenizer) and ``<unk>``. The chat template is ``QWEN_CHAT_TEMPLATE``.

Ids are a pure function of ``alphabet``:

    0 <|endoftext|>  1 <|im_start|>  2 <|im_end|>  3 <think>  4 </think>  5 <unk>
    6..261 the bytes <0x00>..<0xFF>  262.. the characters of the alphabet, in order

Nothing is downloaded. ``save_hf`` exports it through ``byte_level_char_tokenizer`` (the same ids,
spelled the ByteLevel way), because ``AutoTokenizer`` builds a ``Qwen2Tokenizer`` for a Qwen2 model
directory whatever ``tokenizer_config.json`` says.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from reval_jax.data.templates import QWEN_CHAT_TEMPLATE, THINK_CLOSE, THINK_TAG

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN_TOKEN = THINK_TAG
THINK_CLOSE_TOKEN = THINK_CLOSE
UNK_TOKEN = "<unk>"

SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
TEXT_TOKENS = (THINK_OPEN_TOKEN, THINK_CLOSE_TOKEN)

DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def _vocab(alphabet: str) -> dict[str, int]:
    tokens = [*SPECIAL_TOKENS, *TEXT_TOKENS, UNK_TOKEN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab[token] = len(vocab)
    for char in alphabet:
        if char not in vocab:
            vocab[char] = len(vocab)
    return vocab


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Builds the character tokenizer described in the module docstring.

    Args:
      alphabet: characters that get their own token; ``None`` for printable ASCII plus ``\\n`` and
        ``\\t``. Repeated characters are ignored. Characters outside it are encoded as bytes.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    if not alphabet:
        raise ValueError("alphabet must hold at least one character")
    # BPE without merges: each character is looked up on its own; unknown ones fall back to bytes.
    model = models.BPE(vocab=_vocab(alphabet), merges=[], unk_token=UNK_TOKEN, byte_fallback=True)
    backend = Tokenizer(model)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK_TOKEN)]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ``pre_tokenizers.ByteLevel`` produces)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def is_char_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is this module's character tokenizer in its original (byte-fallback) form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return (spec["model"].get("type") == "BPE" and spec["model"].get("byte_fallback") is True
            and not spec["model"].get("merges") and spec.get("pre_tokenizer") is None
            and "<0x00>" in spec["model"]["vocab"])


def byte_level_char_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The same character tokenizer (same ids for every string) written the byte-level way, for export.

    ``AutoTokenizer`` builds a ``Qwen2Tokenizer`` for any directory whose config.json says
    ``model_type: qwen2`` (whatever ``tokenizer_class`` says), and that class re-creates a ByteLevel
    pre-tokenizer over the saved vocabulary. With the original vocabulary (" ", "\\n" as themselves)
    it dropped spaces and newlines. Here each vocabulary entry is renamed to its ByteLevel spelling
    (" " -> "Ġ", "\\n" -> "Ċ", byte token ``<0xE2>`` -> "â", ...; ids unchanged; a byte token whose
    character has its own token keeps its ``<0xNN>`` name), with a ByteLevel pre-tokenizer and
    decoder: a string's ids are then the same through this tokenizer, through ``Qwen2Tokenizer`` and
    through the original (``Qwen2Tokenizer`` also NFC-normalises, which only matters for decomposed
    Unicode).
    """
    from tokenizers import pre_tokenizers

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    byte_chars = _bytes_to_unicode()
    special = {t["content"] for t in spec["added_tokens"]}
    renamed: dict[str, int] = {}
    for token, i in vocab.items():
        if token in special:
            renamed[token] = i
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            continue  # placed below, once the characters have their names
        else:
            renamed["".join(byte_chars[b] for b in token.encode("utf-8"))] = i
    for token, i in vocab.items():
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            name = byte_chars[int(token[3:5], 16)]
            renamed[name if name not in renamed else token] = i
    model = models.BPE(vocab=renamed, merges=[], unk_token=spec["model"].get("unk_token"))
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    for t in spec["added_tokens"]:
        token = AddedToken(t["content"], special=t["special"], normalized=False)
        (backend.add_special_tokens if t["special"] else backend.add_tokens)([token])
    named = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
             if getattr(tokenizer, k) is not None}
    out = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens=[t for t in (IM_START, IM_END) if t in special],
        **named,
    )
    out.chat_template = tokenizer.chat_template
    return out
