"""Prompt templates: how a math problem becomes the token ids the policy is prompted with.

Templates are chosen by name (ALGORITHMS.md, "Prompt templates", paper App. F):

- ``r1_distill``: one user turn ``{problem} Let's think step by step and output the final answer
  within \\boxed{}.``; the assistant turn opens with ``<think>\\n``.
- ``qwen_math``: system ``Please reason step by step, and put your final answer within \\boxed{}.``
  plus the same user text.
- ``plain``: one user turn holding the problem only (toy tasks).

Every template goes through the tokenizer's own chat template, so the special tokens of the model
family (ChatML for Qwen, ``<｜User｜>`` for DeepSeek-R1-Distill) come from the checkpoint.
``QWEN_CHAT_TEMPLATE`` is the ChatML template given to the locally built test tokenizer.
"""

from __future__ import annotations

from typing import Any

R1_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"

# ChatML as in Qwen2.5, without Qwen's default system prompt when none is given.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Stop tokens of Qwen-family chat models (ALGORITHMS.md): both end the response.
QWEN_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")


def _r1_distill(problem: str) -> tuple[list[dict[str, str]], str]:
    return [{"role": "user", "content": problem + R1_SUFFIX}], THINK_OPEN


def _qwen_math(problem: str) -> tuple[list[dict[str, str]], str]:
    messages = [
        {"role": "system", "content": QWEN_MATH_SYSTEM},
        {"role": "user", "content": problem + R1_SUFFIX},
    ]
    return messages, ""


def _plain(problem: str) -> tuple[list[dict[str, str]], str]:
    return [{"role": "user", "content": problem}], ""


# name -> problem -> (chat messages, text the assistant turn must open with)
TEMPLATES = {
    "r1_distill": _r1_distill,
    "qwen_math": _qwen_math,
    "plain": _plain,
}


def _check_name(name: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid names: {sorted(TEMPLATES)}")


def template_messages(problem: str, name: str) -> list[dict[str, str]]:
    """The chat messages of template ``name`` for ``problem`` (before the chat template)."""
    _check_name(name)
    return TEMPLATES[name](problem)[0]


def apply_template(tokenizer: Any, problem: str, name: str) -> str:
    """Renders ``problem`` with template ``name`` through the tokenizer's chat template.

    The result ends with the generation prompt (and ``<think>\\n`` for ``r1_distill``, added only
    when the chat template did not already open the thinking block).
    """
    _check_name(name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; prompt template "
            f"{name!r} needs one (set tokenizer.chat_template, e.g. to QWEN_CHAT_TEMPLATE)"
        )
    messages, assistant_prefix = TEMPLATES[name](problem)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    # DeepSeek-R1-Distill's template already ends with "<think>\n" (or "<think>"): never double it.
    if assistant_prefix and not text.endswith(assistant_prefix):
        stripped = assistant_prefix.rstrip("\n")
        text += assistant_prefix[len(stripped) :] if text.endswith(stripped) else assistant_prefix
    return text


def encode_prompt(tokenizer: Any, problem: str, name: str) -> list[int]:
    """Token ids of the rendered prompt. The chat template already holds every special token the
    model needs (a BOS included, for families that use one), so none are added on top."""
    text = apply_template(tokenizer, problem, name)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a response: ``<|endoftext|>`` and ``<|im_end|>`` where the vocabulary has them,
    then the tokenizer's EOS; deduplicated, in that order."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[token] for token in QWEN_STOP_TOKENS if token in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no stop token")
    return list(dict.fromkeys(ids))
