"""The environment interface, driven by scripted "model" turns (no model needed).

Contract for every environment: an observation is exactly the token ids of its wrapped text
tokenized alone (tokens in, tokens out); a turn without a tool call ends the episode with the math
reward of the policy's text; max_turns and the token limit end it truncated with reward 0; a bad
call is an observation that says so, never an exception. The Python tools' tests start sandbox
processes (tiny limits: a 2 s wall clock, 1 s of CPU, 256 MB) and carry the multiprocess marker.
"""

import dataclasses

import numpy as np
import pytest
from helpers import tiny_tokenizer

from reval_jax.data.rewards import RewardScorer
from reval_jax.env.base import (
    ENVIRONMENTS,
    EnvConfig,
    Environment,
    LocalScorer,
    SingleTurn,
    State,
    Stops,
    decode_turn,
    get_environment,
    resolve_environment,
)
from reval_jax.env.calculator import ERROR
from reval_jax.env.calculator_env import CalculatorEnv
from reval_jax.env.python_tool import HermesPythonTool, PythonTool, extract_program
from reval_jax.env.sandbox import SandboxConfig
from reval_jax.errors import UserError

SANDBOX = SandboxConfig(timeout_s=2.0, cpu_s=1, memory_mb=256, max_processes=8, max_output_bytes=4096, workers=2)


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    problem: str
    answer: str


class NoSandbox:
    """Stands in for the sandbox where no call may run; records what it was asked."""

    def __init__(self):
        self.batches = []

    def run_many(self, codes):
        self.batches.append(list(codes))
        raise AssertionError(f"nothing should run here, got {codes}")

    def close(self):
        pass


def play(env, example, turns):
    """Runs scripted turns (texts; each tokenized as the model would have generated it) to the end.
    Returns the steps and the trajectory's token ids after the prompt."""
    tok = env.tokenizer
    state, steps, ids = env.reset(example), [], []
    for text in turns:
        turn = tok.encode(text, add_special_tokens=False)
        step = env.step(state, turn, decode_turn(tok, turn, env.stops()))
        steps.append(step)
        ids += turn + list(step.observation)
        state = step.state
        if step.done:
            break
    return steps, ids


# ----------------------------------------------------------------------------- the registry


def test_registry_names_resolve_to_their_classes():
    assert resolve_environment("single_turn") is SingleTurn
    assert resolve_environment("calculator") is CalculatorEnv
    assert resolve_environment("python") is PythonTool
    assert resolve_environment("python_hermes") is HermesPythonTool
    assert resolve_environment("reval_jax.env.calculator_env:CalculatorEnv") is CalculatorEnv
    env = get_environment("calculator", EnvConfig(max_turns=3), tiny_tokenizer(), LocalScorer())
    assert isinstance(env, CalculatorEnv) and env.config.max_turns == 3


@pytest.mark.parametrize("name, says", [
    ("calculater", "did you mean 'calculator'?"),
    ("no_such_env", "registered: calculator, python, python_hermes, single_turn"),
    ("reval_jax.env.nowhere:Env", "cannot load environment 'reval_jax.env.nowhere:Env'"),
    ("reval_jax.env.base:Nothing", "cannot load environment 'reval_jax.env.base:Nothing'"),
    ("reval_jax.env.base:EnvConfig", "is not a subclass of reval_jax.env.base.Environment"),
])
def test_registry_errors_are_one_line(name, says):
    with pytest.raises(UserError) as info:
        resolve_environment(name)
    message = str(info.value)
    assert says in message and "\n" not in message
    if ":" not in name:
        assert all(registered in message for registered in ENVIRONMENTS)


def test_config_is_checked():
    with pytest.raises(UserError, match="max_turns"):
        EnvConfig(max_turns=0)


# ----------------------------------------------------------------------------- single turn


def _rollout(tok, responses, stop_id, cap):
    """A Rollout of `responses` as the engine makes it: the stop token after each (unless cut at `cap`)."""
    from reval_jax.rollout.sampling import Rollout

    rows = []
    for text in responses:
        ids = tok.encode(text, add_special_tokens=False)
        rows.append(ids[:cap] if len(ids) >= cap else ids + [stop_id])
    tokens = np.zeros((len(rows), cap), np.int32)
    mask = np.zeros((len(rows), cap), bool)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)], mask[r, : len(ids)] = ids, True
    n = len(rows)
    return rows, Rollout(prompt_tokens=np.zeros((n, 1), np.int32), prompt_mask=np.ones((n, 1), bool),
                         response_tokens=tokens, response_mask=mask, response_length=mask.sum(-1).astype(np.int32),
                         truncated=np.array([len(ids) >= cap and ids[-1] != stop_id for ids in rows]),
                         logp=np.zeros((n, cap), np.float32), group_id=np.arange(n, dtype=np.int32),
                         version=np.zeros((n, cap), np.int32))


RESPONSES = ["7-3=4, 4+4=8. \\boxed{8}", "7-3=4. \\boxed{5}", "\\boxed{\\frac{16}{2}}", "no box",
             "7-3=4, 4+4=8, and a long tail that the cap cuts. \\boxed{8}", "\\boxed{8}<|im_end|>junk"]


def _single_turn_vs_today(scorer):
    from reval_jax.run.evaluate import score_rollout

    tok = tiny_tokenizer()
    cap = 40
    env = SingleTurn(EnvConfig(max_turns=1, max_tokens=cap), tok, scorer)
    stop_id = env.stops().token_ids[0]
    rows, rollout = _rollout(tok, RESPONSES, stop_id, cap)
    today = score_rollout(scorer, tok, rollout, ["8"] * len(rows))
    states = [env.reset(Example(str(i), "Compute 7-3+4.", "8")) for i in range(len(rows))]
    steps = env.step_many(states, rows, [decode_turn(tok, ids, env.stops()) for ids in rows])
    assert [s.reward for s in steps] == today.tolist()
    assert today.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # the cut response lost its box
    assert all(s.done and s.observation == () and s.state.turns == 1 for s in steps)
    assert [s.state.truncated for s in steps] == rollout.truncated.tolist() == [False] * 4 + [True, False]


def test_single_turn_equals_todays_reward():
    _single_turn_vs_today(LocalScorer("math", "plain"))


@pytest.mark.multiprocess
def test_single_turn_equals_todays_reward_with_the_reward_workers():
    with RewardScorer("math", template="plain", num_workers=1, timeout_s=30.0) as scorer:
        _single_turn_vs_today(scorer)


def test_stop_conditions_per_format():
    tok = tiny_tokenizer()
    ids = tuple(tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    assert SingleTurn(EnvConfig(), tok, LocalScorer()).stops() == Stops(ids)
    assert CalculatorEnv(EnvConfig(), tok, LocalScorer()).stops() == Stops(ids, (">>",))
    assert PythonTool(EnvConfig(), tok, LocalScorer(), sandbox=NoSandbox()).stops() == Stops(ids, ("```output",))
    assert HermesPythonTool(EnvConfig(), tok, LocalScorer(), sandbox=NoSandbox()).stops() == Stops(ids)


# ----------------------------------------------------------------------------- the calculator


def calculator(**config):
    return CalculatorEnv(EnvConfig(**{"max_turns": 4, "max_tokens": 200, **config}), tiny_tokenizer(), LocalScorer())


PROBLEM = Example("p0", "Compute 7-3+4.", "8")


def test_calculator_episode_two_calls_and_a_final_answer():
    env = calculator()
    steps, ids = play(env, PROBLEM, ["<<7-3>>", ", <<4+4>>", ". \\boxed{8}<|endoftext|>"])
    first, second, last = steps
    assert first.observation_text == "=4" and second.observation_text == "=8"
    tok = env.tokenizer
    for step in (first, second):  # tokens in, tokens out: the wrapped observation tokenized alone
        assert list(step.observation) == tok.encode(step.observation_text, add_special_tokens=False)
        assert not step.done
    assert last.done and last.reward == 1.0 and not last.state.truncated
    s = last.state
    assert (s.turns, s.tool_calls, s.tool_errors, s.observation_tokens) == (3, 2, 0, 4)
    assert s.tokens == len(ids) and s.policy_text == "<<7-3>>, <<4+4>>. \\boxed{8}"
    assert tok.decode(ids, skip_special_tokens=True) == "<<7-3>>=4, <<4+4>>=8. \\boxed{8}"


def bpe_tokenizer():
    """A small byte-level BPE tokenizer whose merges cross the turn/observation boundary (">>=")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["<<7-3>>=4, <<4+4>>=8. \\boxed{8}", ">>=4", "=4, ", "7-3=4"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_observations_are_tokenized_alone_never_with_the_history():
    tok = bpe_tokenizer()
    env = CalculatorEnv(EnvConfig(max_turns=4, max_tokens=200), tok, LocalScorer())
    steps, ids = play(env, PROBLEM, ["<<7-3>>", ", <<4+4>>", ". \\boxed{8}<|endoftext|>"])
    assert list(steps[0].observation) == tok.encode("=4", add_special_tokens=False)
    assert steps[-1].reward == 1.0
    text = tok.decode(ids)
    assert text == "<<7-3>>=4, <<4+4>>=8. \\boxed{8}<|endoftext|>"
    assert tok.encode(text, add_special_tokens=False) != ids  # re-tokenizing the history moves the boundaries


def test_the_documented_example_runs():
    """docs/multi_turn.md's "Writing an environment" example, executed as written."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "multi_turn.md").read_text()
    section = doc[doc.index("## Writing an environment"):]
    code = re.search(r"```python\n(.*?)```\n", section, re.DOTALL).group(1)
    namespace = {}
    exec(code, namespace)
    env = namespace["CalculatorEnv"](EnvConfig(max_turns=4), tiny_tokenizer(), LocalScorer())
    steps, _ = play(env, PROBLEM, ["<<7-3>>", ", <<4+4>>", ". \\boxed{8}<|endoftext|>"])
    assert [s.observation_text for s in steps] == ["=4", "=8", ""] and steps[-1].reward == 1.0


def test_calculator_wrong_answer_and_bad_expressions():
    steps, _ = play(calculator(), PROBLEM, ["<<7-3**2>>", ">>", "<<4+4>>", ". \\boxed{9}<|endoftext|>"])
    assert [s.observation_text for s in steps[:3]] == ["=" + ERROR, "=" + ERROR, "=8"]
    assert steps[-1].done and steps[-1].reward == 0.0
    assert (steps[-1].state.tool_calls, steps[-1].state.tool_errors) == (3, 2)


def test_max_turns_ends_the_episode_truncated():
    steps, _ = play(calculator(max_turns=2), PROBLEM, ["<<7-3>>", ", <<4+4>>", ". \\boxed{8}"])
    assert len(steps) == 2 and steps[-1].done and steps[-1].state.truncated and steps[-1].reward == 0.0
    assert steps[-1].observation == () and steps[-1].state.tool_calls == 1  # the last call did not run


def test_max_turns_still_scores_a_final_answer():
    steps, _ = play(calculator(max_turns=2), PROBLEM, ["<<7-3>>", ", 4+4=8. \\boxed{8}<|endoftext|>"])
    assert steps[-1].done and steps[-1].reward == 1.0 and not steps[-1].state.truncated


def test_token_limit_ends_the_episode_truncated():
    # "<<7-3>>" is 7 tokens, "=4" 2: after it 9 of 10 are used, "<<4+4>>" reaches the limit with a call.
    steps, _ = play(calculator(max_tokens=10), PROBLEM, ["<<7-3>>", "<<4+4>>"])
    assert [s.done for s in steps] == [False, True]
    assert steps[0].state.tokens_left(EnvConfig(max_tokens=10)) == 1
    assert steps[-1].state.truncated and steps[-1].reward == 0.0
    # An observation that would leave no room for another policy token ends the episode too.
    steps, _ = play(calculator(max_tokens=9), PROBLEM, ["<<7-3>>"])
    assert steps[0].done and steps[0].state.truncated and steps[0].observation == ()
    assert steps[0].state.tool_calls == 1 and steps[0].state.observation_tokens == 0


def test_a_turn_cut_at_the_limit_is_scored_and_marked_truncated():
    env = calculator(max_tokens=12)
    tok = env.tokenizer
    turn = tok.encode("7-3=4, 4+4=8. \\boxed{8}", add_special_tokens=False)[:12]  # the engine cut it at the limit
    step = env.step(env.reset(PROBLEM), turn, decode_turn(tok, turn, env.stops()))
    assert step.done and step.state.truncated and step.reward == 0.0 and step.state.policy_text == "7-3=4, 4+4=8"
    turn = tok.encode("\\boxed{8} and more", add_special_tokens=False)[:12]  # cut, yet it holds the answer
    step = env.step(env.reset(PROBLEM), turn, decode_turn(tok, turn, env.stops()))
    assert step.done and step.state.truncated and step.reward == 1.0


def test_step_many_keeps_the_order_and_rejects_ended_episodes():
    env = calculator()
    states = [env.reset(Example(str(i), "q", "8")) for i in range(4)]
    texts = ["<<1+1>>", "\\boxed{8}", "<<2*3>>", "\\boxed{7}"]
    steps = env.step_many(states, [[7] * len(t) for t in texts], texts)
    assert [s.observation_text for s in steps] == ["=2", "", "=6", ""]
    assert [s.reward for s in steps] == [0.0, 1.0, 0.0, 0.0] and [s.done for s in steps] == [False, True, False, True]
    with pytest.raises(ValueError, match="has ended"):
        env.step(steps[1].state, [1], "x")


def test_a_custom_environment_from_a_path():
    env = get_environment("reval_jax.env.calculator_env:CalculatorEnv", EnvConfig(), tiny_tokenizer(), LocalScorer())
    assert isinstance(env, Environment) and env.reset(PROBLEM) == State("p0", "8")


# ----------------------------------------------------------------------------- Python: parsing, no process


def test_extract_program_takes_the_last_complete_block():
    text = "a\n```python\nx = 1\n```\nb\n```python\nprint(2)\nprint(3)\n```\n"
    assert extract_program(text) == "print(2)\nprint(3)\n"
    assert extract_program("```python\nprint(1)\n") == ""  # not closed


def hermes(sandbox=None, **config):
    return HermesPythonTool(EnvConfig(**{"max_turns": 4, "max_tokens": 4000, "sandbox": SANDBOX, **config}),
                            tiny_tokenizer(), LocalScorer(), sandbox=sandbox)


@pytest.mark.parametrize("call, says", [
    ('<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n["python"]\n</tool_call>', '{"name": <tool name>'),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>', "unknown tool 'search'"),
    ('<tool_call>\n{"name": "python", "arguments": {"program": "print(1)"}}\n</tool_call>', 'takes {"code"'),
    ('<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}', "not closed"),
])
def test_malformed_tool_calls_are_error_observations(call, says):
    box = NoSandbox()
    env = hermes(box)
    steps, _ = play(env, PROBLEM, ["Let me compute.\n" + call + "<|im_end|>"])
    (step,) = steps
    assert not step.done and says in step.observation_text and box.batches == []
    assert step.observation_text.startswith("\n<|im_start|>user\n<tool_response>\nerror: ")
    assert step.observation_text.endswith("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert list(step.observation) == env.tokenizer.encode(step.observation_text, add_special_tokens=False)
    assert (step.state.tool_calls, step.state.tool_errors) == (1, 1)


def test_python_tir_turns_without_a_call_end_the_episode():
    env = PythonTool(EnvConfig(max_turns=4, sandbox=SANDBOX), tiny_tokenizer(), LocalScorer(), sandbox=NoSandbox())
    for text in ["The answer is \\boxed{8}.", "```python\nprint(8)\n```\nso \\boxed{8}```output",
                 "```python\nprint(8)\n"]:
        assert env.parse([], text) == []
    (call,) = env.parse([], "```output")
    assert call.error and "no complete ```python block" in call.error


# ----------------------------------------------------------------------------- Python: the sandbox runs


@pytest.fixture(scope="module")
def sandbox():
    from reval_jax.env.sandbox import Sandbox

    with Sandbox(SANDBOX) as box:
        yield box


def tir(sandbox, **config):
    return PythonTool(EnvConfig(**{"max_turns": 5, "max_tokens": 4000, "sandbox": SANDBOX, **config}),
                      tiny_tokenizer(), LocalScorer("math", "qwen_math"), sandbox=sandbox)


@pytest.mark.multiprocess
def test_python_tir_runs_the_block_and_appends_the_output(sandbox):
    env = tir(sandbox)
    turn = "Let me compute.\n```python\nprint(2+3)\n```\n```output"
    steps, ids = play(env, Example("p", "2+3?", "5"), [turn, "The sum is \\boxed{5}.<|im_end|>"])
    assert steps[0].observation_text == "\n5\n```\n"
    assert list(steps[0].observation) == env.tokenizer.encode("\n5\n```\n", add_special_tokens=False)
    assert steps[-1].done and steps[-1].reward == 1.0
    text = env.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == turn + "\n5\n```\nThe sum is \\boxed{5}."
    # Qwen2.5-Math's own wrapping when the turn closes the block without opening the output block.
    step = env.step(env.reset(Example("p", "2+3?", "5")), [], "```python\nprint(2+3)\n```")
    assert step.observation_text == "\n```output\n5\n```\n"


@pytest.mark.multiprocess
def test_python_tool_errors_and_timeouts_are_observations(sandbox):
    env = tir(sandbox)
    codes = ["print(1)\nprint(1/0)", "while True: pass", "import time\nprint('a', flush=True)\ntime.sleep(30)",
             "print(len('x' * 10))"]
    turns = [f"```python\n{code}\n```\n```output" for code in codes]
    states = [env.reset(Example(str(i), "q", "1")) for i in range(len(codes))]
    steps = env.step_many(states, [[7] * len(t) for t in turns], turns)
    texts = [s.observation_text for s in steps]
    assert texts[0] == "\n1\nZeroDivisionError: division by zero\n```\n"
    assert "TimeoutError" in texts[1] and texts[2].startswith("\na\nTimeoutError: the program ran past 2 s")
    assert texts[3] == "\n10\n```\n"
    assert [s.state.tool_errors for s in steps] == [1, 1, 1, 0]
    assert [s.state.tool_timeouts for s in steps] == [0, 1, 1, 0]
    assert all(not s.done for s in steps) and all(s.state.tool_seconds > 0 for s in steps)


@pytest.mark.multiprocess
def test_the_answer_must_come_from_the_policy(sandbox):
    """The policy's turns are scored, never the observations: a program that prints the box earns nothing.
    (A turn that writes "boxed" is a final answer in Qwen's rule, so the program spells it in pieces.)"""
    env = tir(sandbox)
    steps, ids = play(env, Example("p", "2+3?", "5"), ["```python\nprint(chr(92) + 'box' + 'ed{5}')\n```\n```output",
                                                       "Done.<|im_end|>"])
    assert steps[0].observation_text == "\n\\boxed{5}\n```\n"
    assert steps[-1].done and steps[-1].reward == 0.0
    whole = env.tokenizer.decode(ids, skip_special_tokens=True)
    assert env.scorer.score([(whole, "5")]) == [1.0]  # the whole text would have scored


@pytest.mark.multiprocess
def test_python_output_is_cut_to_the_configured_size(sandbox):
    env = tir(sandbox, max_output_chars=20)
    step = env.step(env.reset(PROBLEM), [], "```python\nprint('y' * 1000)\n```\n```output")
    assert step.observation_text == "\n" + "y" * 20 + "... (980 more characters)\n```\n"


@pytest.mark.multiprocess
def test_hermes_call_runs_and_is_wrapped_as_the_tool_turn(sandbox):
    env = hermes(sandbox)
    call = '<tool_call>\n{"name": "python", "arguments": {"code": "print(2+3)"}}\n</tool_call>'
    two = call + "\n" + call.replace("2+3", "2*3")
    steps, _ = play(env, PROBLEM, ["I will compute.\n" + two + "<|im_end|>", "So \\boxed{8}<|im_end|>"])
    assert steps[0].observation_text == ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n"
                                         "6\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert list(steps[0].observation) == env.tokenizer.encode(steps[0].observation_text, add_special_tokens=False)
    assert steps[-1].done and steps[-1].reward == 1.0 and steps[-1].state.tool_calls == 2
    # A turn that ended without <|im_end|> (a stop string) gets the end of the assistant turn first.
    step = env.step(env.reset(PROBLEM), [5], call)
    assert step.observation_text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n")


# A ChatML template with Qwen2.5's rendering of tool calls and tool messages (the chat_template of
# Qwen/Qwen2.5-7B-Instruct, tools and system parts left out): the trajectory must read as the template
# renders the same conversation.
QWEN25_TOOL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{- call.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.multiprocess
def test_hermes_trajectory_reads_as_the_chat_template_renders_it(sandbox):
    from reval_jax.model.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = QWEN25_TOOL_TEMPLATE
    env = HermesPythonTool(EnvConfig(max_turns=3, sandbox=SANDBOX), tok, LocalScorer(), sandbox=sandbox)
    user = {"role": "user", "content": "Compute 2+3."}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    codes = ["print(2+3)", "print(2*3)"]
    calls = [{"name": "python", "arguments": {"code": c}} for c in codes]
    assistant = {"role": "assistant", "content": "Let me run it.", "tool_calls": calls}
    tools = [{"role": "tool", "content": "5"}, {"role": "tool", "content": "6"}]
    rendered = tok.apply_chat_template([user, assistant, *tools], tokenize=False, add_generation_prompt=True)
    turn = rendered[len(prompt):rendered.index("<|im_end|>", len(prompt)) + len("<|im_end|>")]
    step = env.step(env.reset(PROBLEM), tok.encode(turn, add_special_tokens=False), turn)
    assert prompt + turn + step.observation_text == rendered
