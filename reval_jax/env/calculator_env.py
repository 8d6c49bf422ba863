"""The calculator environment of the embedded tiny model: one plain-text call per turn, answered in place.

The tiny model's character tokenizer (``reval_jax.model.tokenizer``: printable ASCII, newline, tab)
spells every character of the format. A call is the expression between ``<<`` and ``>>``; the turn
stops at the stop string ``>>`` and the environment appends ``=`` and the calculator's value
(``reval_jax.env.calculator.calculate``: exact, a fraction in lowest terms when it is not an integer)::

    user:      Compute 7-3+4.
    assistant: <<7-3>>          <- turn 1 (stops at ">>")
               =4               <- observation
               , <<4+4>>        <- turn 2
               =8               <- observation
               . \\boxed{8}      <- turn 3: no call, ends with <|endoftext|>; scored like today

``=`` cannot end a call (as in GSM8K's ``<<48/2=24>>``): the toy's ordinary worked steps
(``7-3=4, 4+4=8``) are full of it, so a stop string ``=`` would cut every step; ``<<`` and ``>>``
occur nowhere in the toy's problems or solutions. The last ``<<`` of a turn that ends with ``>>``
opens the call; a turn that ends with ``>>`` without one, or whose expression the calculator refuses
(anything but integers, spaces, ``+ - * /`` and parentheses), gets ``=error: ...`` (the calculator's
one error text), counted as a tool error. A turn that does not end with ``>>`` is the final answer,
scored by the math reward on the policy's text (observations excluded). The calculator parses, never
evaluates, so it runs in this process (microseconds a call) without a sandbox.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from reval_jax.env.base import Environment, Stops, ToolCall, ToolResult, cut
from reval_jax.env.calculator import ERROR, calculate

CALL_OPEN = "<<"
CALL_CLOSE = ">>"


class CalculatorEnv(Environment):
    """``<<expression>>`` calls answered with ``=value`` (module docstring)."""

    def stops(self) -> Stops:
        return Stops(token_ids=super().stops().token_ids, strings=(CALL_CLOSE,))

    def parse(self, turn_tokens: Sequence[int], turn_text: str) -> list[ToolCall]:
        if not turn_text.endswith(CALL_CLOSE):
            return []
        start = turn_text.rfind(CALL_OPEN, 0, len(turn_text) - len(CALL_CLOSE))
        if start < 0:
            return [ToolCall("calculator", error=ERROR)]
        return [ToolCall("calculator", turn_text[start + len(CALL_OPEN) : -len(CALL_CLOSE)])]

    def run_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        results = []
        for call in calls:
            start = time.perf_counter()
            value = calculate(call.arguments)
            error = "error" if value == ERROR else None
            results.append(ToolResult(cut(value, self.config.max_output_chars), error, time.perf_counter() - start))
        return results

    def observation_text(self, turn_tokens: Sequence[int], turn_text: str, results: Sequence[ToolResult]) -> str:
        (result,) = results
        return "=" + result.text
