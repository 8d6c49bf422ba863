"""Prompt templates: how a math problem becomes the token ids the policy is prompted with.

Templates are chosen by name (ALGORITHMS.md, "Prompt templates", paper App. F):

- ``r1_distill``: one user turn ``{problem} Let's think step by step and output the final answer
  within \\boxed{}.``; the assistant turn opens with ``<think>\\n``.
- ``qwen_math``: system ``Please reason step by step, and put your final answer within \\boxed{}.``
  plus the same user text.
- ``qwen_math_tir``: Qwen2.5-Math-Instruct's tool-integrated reasoning (TIR) system prompt
  (``TIR_SYSTEM``: ``Please integrate natural language reasoning with programs to solve the problem
  above, and put your final answer within \\boxed{}.``, from the Qwen2.5-Math README's TIR example)
  plus ``qwen_math``'s user text, for episodes of the ``python`` environment (``reval_jax.env.python_tool``:
  the model writes ```python blocks, the sandbox's output is appended as ```output blocks). Qwen's
  README passes the problem alone as the user turn; the suffix is kept here so that the user turn is
  ``qwen_math``'s, the paper's (App. F), and the two templates differ by their system prompt only.
- ``plain``: one user turn holding the problem only (toy tasks).

Every template goes through the tokenizer's own chat template, so the special tokens of the model
family (ChatML for Qwen, ``<｜User｜>`` for DeepSeek-R1-Distill, ``<|start_header_id|>`` for
Llama 3) come from the checkpoint. ``enable_thinking`` (config ``data.enable_thinking``; None = the
chat template's default) is handed to chat templates that read it: Qwen3's opens the assistant turn
with an empty ``<think>\n\n</think>\n\n`` block when it is False, so the model answers without
thinking. ``QWEN_CHAT_TEMPLATE`` is the ChatML template given to the locally built test tokenizer.
"""

from __future__ import annotations

from typing import Any

from reval_jax.errors import UserError

R1_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Qwen2.5-Math-Instruct's TIR system prompt; reval_jax.env.python_tool's format expects it (this module
# owns it: env imports data, never the other way round).
TIR_SYSTEM = ("Please integrate natural language reasoning with programs to solve the problem above, "
              "and put your final answer within \\boxed{}.")
THINK_TAG = "<think>"
THINK_OPEN = THINK_TAG + "\n"  # how r1_distill's assistant turn opens
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
# Llama 3's: end of a turn, end of text, end of a tool-call message.
LLAMA3_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def _r1_distill(problem: str) -> tuple[list[dict[str, str]], str]:
    return [{"role": "user", "content": problem + R1_SUFFIX}], THINK_OPEN


def _qwen_math(problem: str) -> tuple[list[dict[str, str]], str]:
    messages = [
        {"role": "system", "content": QWEN_MATH_SYSTEM},
        {"role": "user", "content": problem + R1_SUFFIX},
    ]
    return messages, ""


def _qwen_math_tir(problem: str) -> tuple[list[dict[str, str]], str]:
    messages = [
        {"role": "system", "content": TIR_SYSTEM},
        {"role": "user", "content": problem + R1_SUFFIX},
    ]
    return messages, ""


def _plain(problem: str) -> tuple[list[dict[str, str]], str]:
    return [{"role": "user", "content": problem}], ""


# name -> problem -> (chat messages, text the assistant turn must open with)
TEMPLATES = {
    "r1_distill": _r1_distill,
    "qwen_math": _qwen_math,
    "qwen_math_tir": _qwen_math_tir,
    "plain": _plain,
}


def _check_name(name: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid names: {sorted(TEMPLATES)}")


def template_messages(problem: str, name: str) -> list[dict[str, str]]:
    """The chat messages of template ``name`` for ``problem`` (before the chat template)."""
    _check_name(name)
    return TEMPLATES[name](problem)[0]


def _chat_kwargs(tokenizer: Any, name: str, enable_thinking: bool | None) -> dict[str, Any]:
    """Extra variables of the chat template: ``enable_thinking`` when set, refused where the chat
    template never reads it (it would be silently ignored) or where it contradicts ``r1_distill``."""
    if enable_thinking is None:
        return {}
    if "enable_thinking" not in str(tokenizer.chat_template):
        raise UserError(
            f"data.enable_thinking={enable_thinking} but the chat template of tokenizer "
            f"{type(tokenizer).__name__} does not read enable_thinking (Qwen3's does); leave "
            "data.enable_thinking unset (None) for this model"
        )
    if name == "r1_distill" and not enable_thinking:
        raise UserError(
            "data.enable_thinking=False contradicts data.template='r1_distill', which opens the "
            "thinking block; use another template or leave enable_thinking unset"
        )
    return {"enable_thinking": bool(enable_thinking)}


def apply_template(tokenizer: Any, problem: str, name: str, *, enable_thinking: bool | None = None) -> str:
    """Renders ``problem`` with template ``name`` through the tokenizer's chat template
    (``enable_thinking``, when not None, is passed to it: see the module docstring).

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
    kwargs = _chat_kwargs(tokenizer, name, enable_thinking)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    # DeepSeek-R1-Distill's template already ends with "<think>\n" (or "<think>"): never double it.
    if assistant_prefix and not text.endswith(assistant_prefix):
        stripped = assistant_prefix.rstrip("\n")
        text += assistant_prefix[len(stripped) :] if text.endswith(stripped) else assistant_prefix
    return text


def encode_prompt(tokenizer: Any, problem: str, name: str, *, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the rendered prompt. The chat template already holds every special token the
    model needs (a BOS included, for families that use one), so none are added on top."""
    text = apply_template(tokenizer, problem, name, enable_thinking=enable_thinking)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a response: ``<|endoftext|>`` and ``<|im_end|>`` (Qwen), ``<|eot_id|>``,
    ``<|end_of_text|>`` and ``<|eom_id|>`` (Llama 3) where the vocabulary has them, then the
    tokenizer's EOS; deduplicated, in that order."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[token] for token in QWEN_STOP_TOKENS + LLAMA3_STOP_TOKENS if token in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no stop token")
    return list(dict.fromkeys(ids))
