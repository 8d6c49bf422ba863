"""Stop strings in the compiled decode loop: a turn ends when the text of its tokens ends with one.

Multi-turn rollouts (reval_jax.env) end a policy turn at a tool call's closing string (``>>``,
```` ```output ````) that may span several tokens and may end inside one. The decode loop cannot
detokenize, so each stop string s becomes a string-matching automaton over token ids (Knuth-Morris-
Pratt on characters, run over each token's text once, on the host):

    state q = the length of the longest prefix of s that the turn's text ends with (0..|s|)
    next[q, t] = the state after appending token t's text; |s| when s occurs in text(turn) + text(t)

so the loop keeps one small integer per (row, string) and does one table lookup per token: the turn
stops at the first token whose text completes s anywhere, exactly as matching the decoded text would
(token texts are what ``tokenizer.decode([t], skip_special_tokens=True)`` gives; a stop string is
ASCII in every format here, so byte-level tokens that are partial UTF-8 neither complete nor break
a match they should not).
A row's states start at 0 with each turn: a stop string never spans a turn and its observation.

The table is [Q, L + 1, V] int8 for Q strings of at most L <= 126 characters over V token ids:
10 states x 152K ids = 1.5 MB for ```` ```output ```` and Qwen's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class StopTable:
    """The automata of Q stop strings: `next` [Q, L + 1, V] int8, `length` [Q] int32 (|s_q|)."""

    next: jax.Array
    length: jax.Array

    @property
    def count(self) -> int:
        return int(self.length.shape[0])


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[i] = the longest proper border of s[:i + 1]."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        k += s[i] == s[k]
        f[i] = k
    return f


def _advance(s: str, f: list[int], q: int, text: str) -> int:
    """The state after `text` from state q; len(s) as soon as s is completed."""
    for ch in text:
        while q and ch != s[q]:
            q = f[q - 1]
        if ch == s[q]:
            q += 1
        if q == len(s):
            return q
    return q


class StopStrings:
    """Stop strings' automata on the host (`table` [Q, L + 1, V] int8, `length` [Q]) and on device
    (`device`: a StopTable for the decode loop)."""

    def __init__(self, strings: Sequence[str], table: np.ndarray):
        self.strings, self.table = tuple(strings), table
        self.length = np.asarray([len(s) for s in strings], np.int32)
        self.device = StopTable(next=jnp.asarray(table), length=jnp.asarray(self.length))

    @property
    def count(self) -> int:
        return len(self.strings)

    def state(self, tokens: Sequence[int]) -> tuple[np.ndarray, bool]:
        """(states [Q] int32 after `tokens` from the start of a turn, whether a string was completed)."""
        q, state = np.arange(self.count), np.zeros(self.count, np.int32)
        for t in tokens:
            state = self.table[q, state, int(t)].astype(np.int32)
            if np.any(state >= self.length):
                return state, True
        return state, False


def stop_strings(strings: Sequence[str], token_texts: Sequence[str]) -> StopStrings:
    """The automata of `strings` over the tokens whose texts are `token_texts` (index = id)."""
    if not strings:
        raise ValueError("stop_table needs at least one stop string")
    if any(not s or len(s) > 126 for s in strings):
        raise ValueError(f"stop strings must have 1..126 characters, got {list(strings)!r}")
    L, V = max(map(len, strings)), len(token_texts)
    table = np.zeros((len(strings), L + 1, V), np.int8)
    for i, s in enumerate(strings):
        f, chars = _failure(s), set(s)
        # a token without a character of s leads to state 0 from every state, one without text
        # (a special token) keeps the state: only the others are run
        empty = np.flatnonzero([not text for text in token_texts])
        table[i, : len(s)][:, empty] = np.arange(len(s), dtype=np.int8)[:, None]
        for t in (t for t, text in enumerate(token_texts) if chars.intersection(text)):
            for q in range(len(s)):
                table[i, q, t] = _advance(s, f, q, token_texts[t])
        table[i, len(s), :] = len(s)  # a completed match stays completed (the row has stopped anyway)
    return StopStrings(strings, table)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each token id's text as ``tokenizer.decode([id], skip_special_tokens=True)`` gives it (a
    turn's text is decoded so: special tokens are ""), and "" past the tokenizer's ids."""
    n = min(vocab_size, len(tokenizer))
    return [tokenizer.decode([t], skip_special_tokens=True) for t in range(n)] + [""] * (vocab_size - n)


def advance(table: StopTable, state, token):
    """(state' [B, Q], stopped [B] bool) after each row's `token` [B] from `state` [B, Q]."""
    q = jnp.arange(table.count)
    new = table.next[q[None, :], state, token[:, None]].astype(jnp.int32)  # [B, Q]
    return new, jnp.any(new >= table.length[None, :], axis=1)


def matches(strings: Sequence[str], texts: Sequence[str]) -> int | None:
    """The reference: the index of the first text after which the concatenation of `texts`
    contains one of `strings` (None when none does)."""
    seen = ""
    for i, text in enumerate(texts):
        seen += text
        if any(s in seen for s in strings):
            return i
    return None
