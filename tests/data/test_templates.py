"""Prompt templates (paper App. F) and the tiny local tokenizer they are tested with."""

import json

import pytest
from helpers import save_tiny_tokenizer, tiny_tokenizer
from transformers import AutoTokenizer

from reval_jax.data.templates import (
    QWEN_CHAT_TEMPLATE,
    TEMPLATES,
    apply_template,
    encode_prompt,
    stop_token_ids,
)
from reval_jax.model.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

PROBLEM = "What is $\\frac{1}{2} + 1$?"
USER = PROBLEM + " Let's think step by step and output the final answer within \\boxed{}."
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# The generation-prompt part of DeepSeek-R1-Distill's chat template: it opens the thinking block.
R1_LIKE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def test_r1_distill_prompt_text():
    text = apply_template(tiny_tokenizer(), PROBLEM, "r1_distill")
    expected = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert text == expected


def test_qwen_math_prompt_text():
    text = apply_template(tiny_tokenizer(), PROBLEM, "qwen_math")
    expected = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected


def test_plain_prompt_text():
    text = apply_template(tiny_tokenizer(), PROBLEM, "plain")
    assert text == f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"


TIR_SYSTEM = ("Please integrate natural language reasoning with programs to solve the problem above, "
              "and put your final answer within \\boxed{}.")
# Qwen2.5-Math-Instruct's chat template without tools, reduced to what decides the prompt: the system turn
# given, else its own default one (the CoT system prompt); then ChatML turns and the generation prompt.
QWEN25_MATH_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within "
    "\\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_qwen_math_tir_prompt_text():
    """Qwen's TIR system prompt (the python environment's, one constant) and qwen_math's user text,
    through the ChatML test tokenizer and through a local Qwen2.5-Math-Instruct-style chat template
    whose default system turn the template's own replaces."""
    from reval_jax.env import python_tool

    assert TIR_SYSTEM == python_tool.TIR_SYSTEM
    expected = (
        f"<|im_start|>system\n{TIR_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_template(tiny_tokenizer(), PROBLEM, "qwen_math_tir") == expected
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = QWEN25_MATH_LIKE_TEMPLATE
    assert apply_template(tokenizer, PROBLEM, "qwen_math_tir") == expected
    assert apply_template(tokenizer, PROBLEM, "plain").startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    ids = encode_prompt(tokenizer, PROBLEM, "qwen_math_tir")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and tokenizer.decode(ids) == expected


# A TIR episode's policy text (observations excluded: reval_jax.env.base scores only the policy's turns):
# a ```python block whose turn stopped at the ```output opener it wrote, then the answer.
TIR_POLICY_TEXT = ("We add the fractions with Python.\n```python\nfrom fractions import Fraction\n"
                   "print(Fraction(1, 2) + 1)\n```\n```output"
                   "The sum is $\\frac{3}{2}$, so the answer is \\boxed{\\frac{3}{2}}.")


def test_math_reward_takes_the_tir_template():
    from reval_jax.data.rewards import final_answer_text, math_reward

    assert final_answer_text(TIR_POLICY_TEXT, "qwen_math_tir") == TIR_POLICY_TEXT  # no thinking block to cut
    assert math_reward(TIR_POLICY_TEXT, "\\frac{3}{2}", "qwen_math_tir") == 1.0
    assert math_reward(TIR_POLICY_TEXT, "1.5", "qwen_math_tir") == 1.0
    assert math_reward(TIR_POLICY_TEXT.replace("\\boxed", ""), "1.5", "qwen_math_tir") == 0.0
    assert math_reward("<think>\\boxed{1.5}", "1.5", "qwen_math_tir") == 0.0  # a thinking block never closed


@pytest.mark.multiprocess  # starts a verifier worker process
def test_reward_scorer_accepts_the_tir_template():
    """The trainer's scorer gets data.template (run.config.reward_settings): it accepts the TIR name and
    its worker scores with it; an unknown name is refused in the trainer's process, listing the names."""
    from reval_jax.data.rewards import RewardScorer

    with RewardScorer("math", template="qwen_math_tir", num_workers=1, timeout_s=30.0) as scorer:
        assert scorer.score([(TIR_POLICY_TEXT, "\\frac{3}{2}"), (TIR_POLICY_TEXT, "2")]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="qwen_math_tir"):
        RewardScorer("math", template="qwen_math_trir", num_workers=1)


def test_r1_think_not_doubled_when_chat_template_opens_it():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = R1_LIKE_TEMPLATE
    text = apply_template(tokenizer, PROBLEM, "r1_distill")
    assert text == f"<｜User｜>{USER}<｜Assistant｜><think>\n"


def test_r1_think_newline_added_after_bare_think():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = R1_LIKE_TEMPLATE.replace("<think>\\n", "<think>")
    text = apply_template(tokenizer, PROBLEM, "r1_distill")
    assert text.endswith("<｜Assistant｜><think>\n")
    assert text.count("<think>") == 1


# Qwen3's chat template, reduced to what decides the prompt: ChatML turns, and with thinking off an
# empty thinking block opening the assistant turn (the real template's `enable_thinking is false`).
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def _qwen3_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    return tokenizer


def test_enable_thinking_reaches_the_chat_template(tmp_path):
    from helpers import write_arith_data

    from reval_jax.data.prompts import load_examples

    tokenizer = _qwen3_tokenizer()
    turn = f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    assert apply_template(tokenizer, PROBLEM, "plain") == turn  # the template's default: thinking
    assert apply_template(tokenizer, PROBLEM, "plain", enable_thinking=True) == turn
    off = apply_template(tokenizer, PROBLEM, "plain", enable_thinking=False)
    assert off == turn + "<think>\n\n</think>\n\n"
    ids = encode_prompt(tokenizer, PROBLEM, "plain", enable_thinking=False)
    assert ids[-6:] == tokenizer.convert_tokens_to_ids(["<think>", "\n", "\n", "</think>", "\n", "\n"])
    # through the data pipeline (config data.enable_thinking)
    path = write_arith_data(tmp_path / "arith.jsonl", n=3)
    examples, _ = load_examples(path, tokenizer, "plain", None, enable_thinking=False)
    assert tokenizer.decode(examples[0].prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_enable_thinking_is_refused_where_it_would_be_ignored_or_contradicted():
    from reval_jax.errors import UserError

    with pytest.raises(UserError, match="does not read enable_thinking"):
        apply_template(tiny_tokenizer(), PROBLEM, "plain", enable_thinking=False)  # ChatML ignores it
    with pytest.raises(UserError, match="contradicts data.template='r1_distill'"):
        apply_template(_qwen3_tokenizer(), PROBLEM, "r1_distill", enable_thinking=False)


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match="unknown prompt template 'r1'") as info:
        apply_template(tiny_tokenizer(), PROBLEM, "r1")
    for name in TEMPLATES:
        assert name in str(info.value)


def test_tokenizer_without_chat_template_is_an_error():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tokenizer, PROBLEM, "plain")


def test_encode_prompt_adds_no_special_tokens():
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, PROBLEM, "r1_distill")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-2:] == tokenizer.convert_tokens_to_ids(["<think>", "\n"])
    assert tokenizer.decode(ids) == apply_template(tokenizer, PROBLEM, "r1_distill")


def test_stop_token_ids():
    tokenizer = build_char_tokenizer()
    end, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert end != im_end
    assert stop_token_ids(tokenizer) == [end, im_end]  # eos is <|endoftext|>: listed once
    tokenizer.eos_token = "<think>"
    assert stop_token_ids(tokenizer) == [end, im_end, tokenizer.convert_tokens_to_ids("<think>")]
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|end_of_text|>"]})
    eot, eot_text = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids(tokenizer) == [end, im_end, eot, eot_text]  # Llama 3's end of turn and text


def test_tokenizer_fixed_ids_and_deterministic():
    tokenizer = tiny_tokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4, 5]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.unk_token == "<unk>"
    assert tokenizer.convert_tokens_to_ids(" ") == 262  # first character of the alphabet
    assert len(tokenizer) == 6 + 256 + len(DEFAULT_ALPHABET)
    assert build_char_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tokenizer_round_trips_text():
    tokenizer = tiny_tokenizer()
    text = "Janet’s ducks: \\boxed{\\frac{1}{2}} ^_(x)+-*/=.,:;\n\t日本 <think>ok</think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids  # unknown characters fall back to bytes
    assert tokenizer.decode(ids) == text
    # <think> / </think> survive skip_special_tokens (the reward needs </think>); ChatML does not.
    ids = tokenizer.encode("<think>a</think>b<|im_end|>", add_special_tokens=False)
    assert len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


def test_custom_alphabet():
    tokenizer = build_char_tokenizer("ab")
    assert len(tokenizer) == 6 + 256 + 2
    ids = tokenizer.encode("abc", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "b", "<0x63>"]
    assert tokenizer.decode(ids) == "abc"
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")


def test_tokenizer_save_and_load_offline(tmp_path):
    directory = save_tiny_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert loaded.get_vocab() == tiny_tokenizer().get_vocab()
    assert loaded.chat_template == QWEN_CHAT_TEMPLATE
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 0
    for name in TEMPLATES:
        assert encode_prompt(loaded, PROBLEM, name) == encode_prompt(
            tiny_tokenizer(), PROBLEM, name
        )
    assert stop_token_ids(loaded) == stop_token_ids(tiny_tokenizer())
    with open(tmp_path / "tok" / "tokenizer.json") as f:
        assert json.load(f)["model"]["byte_fallback"] is True
