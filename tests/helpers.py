"""Shared test helpers: the tiny local tokenizer and the paths of the shared data files.

Other test modules import from here (``from helpers import tiny_tokenizer``); keep the names stable.
"""

from __future__ import annotations

import functools
import os

from reval_jax.tokenizer import build_char_tokenizer

# shared/ sits beside the checkout (../shared from the repository root), here and in CI
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH_DATA_DIR = os.environ.get(
    "REVAL_MATH_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "math")
)


@functools.cache
def tiny_tokenizer():
    """The project's character tokenizer (ChatML chat template), built once per test process.

    Shared: do not mutate it; build a fresh one with ``build_char_tokenizer()`` to change it.
    """
    return build_char_tokenizer()


def save_tiny_tokenizer(directory: str | os.PathLike) -> str:
    """Saves ``tiny_tokenizer()`` to ``directory`` (``AutoTokenizer.from_pretrained`` loads it)."""
    tiny_tokenizer().save_pretrained(directory)
    return os.fspath(directory)


def math_data_file(name: str) -> str:
    """Path of a file of the shared math data set, e.g. ``math_data_file("gsm8k_test.jsonl")``."""
    return os.path.join(MATH_DATA_DIR, name)
