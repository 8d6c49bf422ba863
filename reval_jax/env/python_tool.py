"""Tool-integrated reasoning with a Python interpreter (the sandbox), in the two formats Qwen models use.

``python`` (``PythonTool``): Qwen2.5-Math-Instruct's TIR format. Where it comes from: QwenLM/Qwen2.5-Math,
``evaluation/math_eval.py`` (prompt type ``tool-integrated``) and ``evaluation/parser.py``
(``extract_program``). The model writes a ```python block, closes it and opens the output block
itself; generation stops at the stop string ``"```output"`` (the stop tokens are
``<|im_end|>``/``<|endoftext|>``, ids 151645/151643). A turn is a tool call when it has no ``boxed``
and, without the ``"```output"`` it stopped at, ends with ```````; the program is its last ```python
block. The environment appends the rest of the output block::

    ...```python\\nprint(2+3)\\n```\\n```output    <- the policy's turn (stop string included)
    \\n5\\n```\\n                                    <- the observation

When the turn ends with ``````` without opening the output block, the observation is the whole
block, ``"\\n```output\\n{output}\\n```\\n"``, as in Qwen's ``math_eval.py``. ``{output}`` is the
program's stdout, and when it failed, a last line saying why (the exception's line of the traceback,
or the time / memory limit), cut to ``EnvConfig.max_output_chars`` (Qwen shows stdout or else the
error report). Qwen's ``math_eval.py`` runs at most 4 generations (``max_func_call``), so the
model reads at most 3 outputs: ``EnvConfig.max_turns`` of 4 (configs/qwen7b_tool.py). Its system
prompt ("Please integrate natural language reasoning with programs to solve the problem above, and
put your final answer within \\boxed{}.") is ``TIR_SYSTEM`` of ``reval_jax.data.templates`` (the
``qwen_math_tir`` template).

``python_hermes`` (``HermesPythonTool``): the Qwen/Hermes function-calling format of Qwen2.5 and Qwen3
chat models. Where it comes from: the ``chat_template`` of ``Qwen/Qwen2.5-7B-Instruct``'s
``tokenizer_config.json`` (as reproduced verbatim in public repositories; Qwen3's renders tool turns
with the same text). An assistant turn calls a tool with ``<tool_call>\\n{"name": "python",
"arguments": {"code": "..."}}\\n</tool_call>`` (several blocks: several calls) and ends with
``<|im_end|>``; a tool message is rendered as a user turn, consecutive ones merged::

    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

The observation is that text, preceded by the ``\\n`` the template writes after the assistant's
``<|im_end|>`` (which the policy generated), or by ``<|im_end|>\\n`` when the turn ended otherwise.
``PYTHON_TOOL`` is the tool's schema, for ``apply_chat_template(..., tools=[PYTHON_TOOL])``. For Qwen3
with ``enable_thinking=False`` the generation prompt also opens an empty think block: use
``HermesPythonTool`` with ``assistant_open = ASSISTANT_OPEN + "<think>\\n\\n</think>\\n\\n"``.
Malformed calls (not JSON, no name, an unknown tool, no ``code``) get a ``<tool_response>`` that
says so; nothing runs.

Both run the programs of a round's calls together with ``Sandbox.run_many`` (its pool of workers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from reval_jax.data.templates import TIR_SYSTEM  # noqa: F401  (here before it moved: importable from here too)
from reval_jax.env.base import EnvConfig, Environment, Scorer, Stops, ToolCall, ToolResult, cut
from reval_jax.env.sandbox import Result, Sandbox

OUTPUT_OPEN = "```output"
IM_END = "<|im_end|>"
ASSISTANT_OPEN = "<|im_start|>assistant\n"
PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Runs a Python 3 program and returns what it prints (stdout), or its error.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The program; print what you need."}},
            "required": ["code"],
        },
    },
}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def extract_program(text: str) -> str:
    """The last complete ```python block of `text` ("" if none), as Qwen2.5-Math's ``extract_program``
    with ``last_only`` (lines from a line starting with ```python to the next line starting with ```)."""
    program, inside = "", False
    for line in text.split("\n"):
        if line.startswith("```python"):
            program, inside = "", True
        elif line.startswith("```"):
            inside = False
        elif inside:
            program += line + "\n"
    return "" if inside else program


def _error_line(result: Result, config: EnvConfig) -> str:
    """Why a call failed, in one line."""
    if result.kind == "error":
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"error: exit code {result.exit}"
    if result.kind == "timeout":
        return f"TimeoutError: the program ran past {config.sandbox.timeout_s:g} s"
    if result.kind == "cpu":
        return f"TimeoutError: the program used more than {config.sandbox.cpu_s} s of CPU"
    if result.kind == "memory":
        return f"MemoryError: the program used more than {config.sandbox.memory_mb} MB"
    return f"error: the program was stopped ({result.kind})"


def tool_result(result: Result, config: EnvConfig) -> ToolResult:
    """A sandbox result as the tool's output: stdout, then why it failed if it did; cut to max_output_chars."""
    text = result.stdout.rstrip("\n")
    error = None if result.ok else result.kind
    if error is not None:
        text = (text + "\n" if text else "") + _error_line(result, config)
    return ToolResult(cut(text, config.max_output_chars), error, result.seconds)


class _SandboxTool(Environment):
    """An environment whose calls are Python programs run in a sandbox (its own, or one it is given)."""

    def __init__(self, config: EnvConfig, tokenizer: Any, scorer: Scorer, sandbox: Sandbox | None = None):
        super().__init__(config, tokenizer, scorer, sandbox)
        self._owns_sandbox = sandbox is None
        if sandbox is None:
            self.sandbox = Sandbox(config.sandbox)

    def run_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        results = self.sandbox.run_many([call.arguments for call in calls])
        return [tool_result(r, self.config) for r in results]

    def close(self) -> None:
        if self._owns_sandbox and self.sandbox is not None:
            self.sandbox.close()


class PythonTool(_SandboxTool):
    """Qwen2.5-Math-Instruct TIR: ```python blocks, ```output observations (module docstring)."""

    def stops(self) -> Stops:
        return Stops(token_ids=super().stops().token_ids, strings=(OUTPUT_OPEN,))

    def parse(self, turn_tokens: Sequence[int], turn_text: str) -> list[ToolCall]:
        body = turn_text.rstrip()
        opened = body.endswith(OUTPUT_OPEN)
        body = body.removesuffix(OUTPUT_OPEN).rstrip()
        if "boxed" in body or not (opened or body.endswith("```")):
            return []
        program = extract_program(body)
        if not program.strip():
            return [ToolCall("python", error="error: no complete ```python block before the output block")]
        return [ToolCall("python", program)]

    def observation_text(self, turn_tokens: Sequence[int], turn_text: str, results: Sequence[ToolResult]) -> str:
        (result,) = results
        if turn_text.rstrip().endswith(OUTPUT_OPEN):
            return f"\n{result.text}\n```\n"
        return f"\n{OUTPUT_OPEN}\n{result.text}\n```\n"


def _hermes_call(block: str) -> ToolCall:
    """One ``<tool_call>`` block's JSON as a call of the python tool, or a call with the error to show."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError as e:
        return ToolCall("", error=f"error: the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("", error='error: a tool call is {"name": <tool name>, "arguments": {...}}')
    name, arguments = call["name"], call.get("arguments", {})
    if name != "python":
        return ToolCall(name, error=f"error: unknown tool {name!r}; the tools are: python", kind="unknown_tool")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict) or not isinstance(arguments.get("code"), str):
        return ToolCall(name, error='error: the python tool takes {"code": <program>}')
    return ToolCall(name, arguments["code"])


class HermesPythonTool(_SandboxTool):
    """Qwen/Hermes ``<tool_call>`` JSON calls of a ``python`` tool, ``<tool_response>`` turns (module docstring)."""

    assistant_open = ASSISTANT_OPEN

    def parse(self, turn_tokens: Sequence[int], turn_text: str) -> list[ToolCall]:
        calls = [_hermes_call(block.strip()) for block in _TOOL_CALL.findall(turn_text)]
        if turn_text.count("<tool_call>") > len(calls):
            calls.append(ToolCall("", error="error: a <tool_call> block is not closed with </tool_call>"))
        return calls

    def observation_text(self, turn_tokens: Sequence[int], turn_text: str, results: Sequence[ToolResult]) -> str:
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        opening = "\n" if turn_tokens and turn_tokens[-1] == im_end else IM_END + "\n"
        responses = "".join(f"\n<tool_response>\n{r.text}\n</tool_response>" for r in results)
        return f"{opening}<|im_start|>user{responses}{IM_END}\n{self.assistant_open}"
