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

Nothing is downloaded. ``save_pretrained`` writes a directory that ``AutoTokenizer.from_pretrained``
loads offline.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from reval_jax.templates import QWEN_CHAT_TEMPLATE

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN_TOKEN = "<think>"
THINK_CLOSE_TOKEN = "</think>"
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
