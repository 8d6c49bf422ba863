"""The environment interface of multi-turn rollouts, the single-turn task as its one-turn case, the registry.

    env = get_environment("calculator", EnvConfig(max_turns=4, max_tokens=256), tokenizer, scorer)
    state = env.reset(example)                       # example: .id, .problem, .answer
    step = env.step(state, turn_tokens, turn_text)   # after each finished policy turn
    if step.done: step.reward                        # the episode's reward (0 when truncated)
    else: append step.observation                    # token ids, wrapped and tokenized once
    steps = env.step_many(states, tokens, texts)     # a round's turns: tools in parallel, scores in one call

Tokens in, tokens out (ALGORITHMS.md, "Multi-turn trajectories"): an observation is the text the chat
template puts between two policy turns (a tool turn, or an ```output block), tokenized once, on its
own, and appended after the turn's tokens; the history is never re-tokenized. ``Step.observation``
is exactly ``tokenizer.encode(observation_text, add_special_tokens=False)``.

An episode's flow, the same for every environment (``Environment.step_many``): the turn is counted
(``turns``, ``tokens``: policy and observation tokens after the prompt, the row's response side, as
``sampling.max_new_tokens`` counts it for one turn); the environment parses the turn's tool calls
(``parse``). A turn without one ends the episode with the reward of the policy's text (every turn's
text, observations excluded, so a tool's output can never supply the answer), scored by the
``Scorer`` (the trainer's ``RewardScorer``: bounded time per answer) in one call per round. A turn
with calls when ``max_turns`` is reached, or when no token is left, ends the episode truncated with
reward 0; so does an observation that would leave no room for another policy token. Otherwise the
calls run (``run_tools``, batched over the round: the Python tool runs them through the sandbox's
pool) and their results are wrapped (``observation_text``). A call that cannot be parsed (bad JSON,
an unknown tool) or that fails (an exception, a timeout) is an observation that says so, never an
exception.

Stop conditions are data (``Stops``: strings and token ids) that the engine applies to each turn.

Environments are chosen by name from ``ENVIRONMENTS`` or by an importable ``"module:Class"`` path
(a subclass of ``Environment``), like rewards (``reval_jax.data.rewards``): ``single_turn`` (this
module), ``python`` and ``python_hermes`` (``python_tool.py``), ``calculator`` (``calculator_env.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Sequence
from typing import Any, Protocol

from reval_jax.data.rewards import resolve_reward
from reval_jax.data.templates import stop_token_ids
from reval_jax.env.sandbox import SandboxConfig
from reval_jax.errors import UserError

# name -> "module:Class"; loaded on use, so that this module imports none of the environments.
ENVIRONMENTS = {
    "single_turn": "reval_jax.env.base:SingleTurn",
    "python": "reval_jax.env.python_tool:PythonTool",
    "python_hermes": "reval_jax.env.python_tool:HermesPythonTool",
    "calculator": "reval_jax.env.calculator_env:CalculatorEnv",
}


class Example(Protocol):
    """One prompt example (``reval_jax.data.prompts.PromptExample`` is one)."""

    id: str
    problem: str
    answer: str


class Scorer(Protocol):
    """Scores (policy text, ground-truth answer) pairs: ``reval_jax.data.rewards.RewardScorer``."""

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...


@dataclasses.dataclass(frozen=True)
class LocalScorer:
    """A reward function called in this process, without a time limit: for trusted, short answers
    (tests, scripted turns). A trainer scores model text with a ``RewardScorer`` (per-answer deadline)."""

    reward: str = "math"
    template: str = "plain"

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        fn = resolve_reward(self.reward)
        return [float(fn(text, answer, self.template)) for text, answer in pairs]


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """What every environment is configured with (``sandbox`` only matters to the Python tool)."""

    max_turns: int = 1  # policy turns per episode; a turn that still calls a tool at the last ends it truncated
    max_tokens: int = 1024  # policy + observation tokens after the prompt (like sampling.max_new_tokens)
    max_output_chars: int = 1024  # a tool's output is cut to this many characters in its observation
    sandbox: SandboxConfig = SandboxConfig()

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tokens < 1 or self.max_output_chars < 1:
            raise UserError(f"environment max_turns, max_tokens and max_output_chars must be >= 1, got "
                            f"{self.max_turns}, {self.max_tokens}, {self.max_output_chars}")


@dataclasses.dataclass(frozen=True)
class Stops:
    """What ends a policy turn in the engine: any of the token ids, or the text ending with any string."""

    token_ids: tuple[int, ...]
    strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class State:
    """One episode so far (host side). ``step`` returns the next state; this one is never changed."""

    example_id: str
    answer: str
    turns: int = 0  # policy turns taken
    tokens: int = 0  # policy + observation tokens after the prompt
    observation_tokens: int = 0
    policy_text: str = ""  # the policy turns' texts, concatenated (observations excluded): what is scored
    tool_calls: int = 0  # calls made (a turn's calls at max_turns or max_tokens are not made)
    tool_errors: int = 0  # calls that could not be parsed or that failed (timeouts included)
    tool_timeouts: int = 0  # calls that ran out of wall clock or CPU time
    tool_seconds: float = 0.0
    done: bool = False
    reward: float = 0.0
    truncated: bool = False  # ended by max_turns or max_tokens

    def tokens_left(self, config: EnvConfig) -> int:
        """How many tokens the next policy turn may take."""
        return max(0, config.max_tokens - self.tokens)


@dataclasses.dataclass(frozen=True)
class Step:
    """The environment's answer to one turn: an observation to append, or the end with a reward."""

    state: State  # the episode after this turn (and its observation)
    observation: tuple[int, ...] = ()  # token ids to append before the next turn; () when done
    observation_text: str = ""  # what `observation` encodes (for logs; never re-tokenized)

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def reward(self) -> float:
        return self.state.reward


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call a turn makes; ``error`` set when the call could not be parsed (nothing runs then)."""

    name: str
    arguments: Any = None
    error: str | None = None  # the observation's text for a call that did not parse
    kind: str = "malformed"  # its ToolResult error kind: malformed | unknown_tool


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call returned: its text for the observation and an error kind (None when it worked).

    Kinds: the sandbox's (``error``, ``timeout``, ``cpu``, ``memory``, ``killed``, ``crash``,
    ``setup``), ``malformed`` (the call did not parse), ``unknown_tool``."""

    text: str
    error: str | None = None
    seconds: float = 0.0

    @property
    def timed_out(self) -> bool:
        return self.error in ("timeout", "cpu")


def decode_turn(tokenizer: Any, tokens: Sequence[int], stops: Stops) -> str:
    """A turn's text as today's scoring decodes a response: without a final stop token, special
    tokens dropped (``reval_jax.run.evaluate.decode_responses``)."""
    tokens = list(tokens)
    if tokens and tokens[-1] in stops.token_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def cut(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a note of how many more there were."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


class Environment:
    """An environment: subclasses say how a turn calls tools and how results are wrapped (module docstring).

    Hooks: ``stops``, ``parse`` (the turn's calls; [] ends the episode), ``run_tools`` (a round's
    calls, batched), ``observation_text`` (a turn's results as the text to append). ``close`` frees
    what the environment holds (a sandbox)."""

    def __init__(self, config: EnvConfig, tokenizer: Any, scorer: Scorer, sandbox: Any = None):
        self.config, self.tokenizer, self.scorer, self.sandbox = config, tokenizer, scorer, sandbox

    # -- hooks
    def stops(self) -> Stops:
        """Stop tokens of the model family (``<|im_end|>``, ``<|endoftext|>``, EOS); no strings."""
        return Stops(token_ids=tuple(stop_token_ids(self.tokenizer)))

    def parse(self, turn_tokens: Sequence[int], turn_text: str) -> list[ToolCall]:
        """The tool calls of a finished turn; [] when it calls none (the episode ends)."""
        return []

    def run_tools(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Results of a round's parsed calls (none has ``error`` set), in order."""
        raise NotImplementedError(f"{type(self).__name__} parses tool calls but does not run them")

    def observation_text(self, turn_tokens: Sequence[int], turn_text: str, results: Sequence[ToolResult]) -> str:
        """The text appended after a turn whose calls returned `results` (in the turn's order)."""
        raise NotImplementedError

    # -- the episode
    def reset(self, example: Example) -> State:
        return State(example_id=str(example.id), answer=str(example.answer))

    def step(self, state: State, turn_tokens: Sequence[int], turn_text: str) -> Step:
        return self.step_many([state], [turn_tokens], [turn_text])[0]

    def step_many(self, states: Sequence[State], turn_tokens: Sequence[Sequence[int]],
                  turn_texts: Sequence[str]) -> list[Step]:
        """Steps of a round's finished turns: tools run in one batch, final answers scored in one call."""
        if not len(states) == len(turn_tokens) == len(turn_texts):
            raise ValueError(f"{len(states)} states, {len(turn_tokens)} turns, {len(turn_texts)} texts")
        steps: list[Step | None] = [None] * len(states)
        final, calling = [], []
        for i, (state, tokens, text) in enumerate(zip(states, turn_tokens, turn_texts, strict=True)):
            if state.done:
                raise ValueError(f"episode {state.example_id!r} has ended; reset it")
            state = dataclasses.replace(state, turns=state.turns + 1, tokens=state.tokens + len(tokens),
                                        policy_text=state.policy_text + text)
            calls = self.parse(tokens, text)
            if not calls:
                final.append((i, state, tokens))
            elif state.turns >= self.config.max_turns or state.tokens >= self.config.max_tokens:
                steps[i] = Step(dataclasses.replace(state, done=True, truncated=True))  # the calls do not run
            else:
                calling.append((i, state, tokens, text, calls))
        for i, step in self._finish(final):
            steps[i] = step
        for i, step in self._observe(calling):
            steps[i] = step
        return steps

    def _finish(self, final: list[tuple[int, State, Sequence[int]]]) -> list[tuple[int, Step]]:
        """Episodes whose turn called no tool: scored on the policy's text."""
        if not final:
            return []
        rewards = self.scorer.score([(state.policy_text, state.answer) for _, state, _ in final])
        stop_ids = self.stops().token_ids
        out = []
        for (i, state, tokens), reward in zip(final, rewards, strict=True):
            cut_off = state.tokens >= self.config.max_tokens and not (tokens and tokens[-1] in stop_ids)
            out.append((i, Step(dataclasses.replace(state, done=True, reward=float(reward), truncated=cut_off))))
        return out

    def _observe(self, calling: list[tuple[int, State, Sequence[int], str, list[ToolCall]]]) -> list[tuple[int, Step]]:
        """Episodes whose turn called tools: run the well-formed calls of the round together, wrap, tokenize once."""
        runnable = [call for *_, calls in calling for call in calls if call.error is None]
        ran = iter(self.run_tools(runnable) if runnable else [])
        out = []
        for i, state, tokens, turn_text, calls in calling:
            results = [next(ran) if c.error is None else ToolResult(c.error, c.kind) for c in calls]
            text = self.observation_text(tokens, turn_text, results)
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            state = dataclasses.replace(
                state, tool_calls=state.tool_calls + len(calls),
                tool_errors=state.tool_errors + sum(r.error is not None for r in results),
                tool_timeouts=state.tool_timeouts + sum(r.timed_out for r in results),
                tool_seconds=state.tool_seconds + sum(r.seconds for r in results))
            if state.tokens + len(ids) >= self.config.max_tokens:  # no room for another policy token
                out.append((i, Step(dataclasses.replace(state, done=True, truncated=True))))
                continue
            state = dataclasses.replace(state, tokens=state.tokens + len(ids),
                                        observation_tokens=state.observation_tokens + len(ids))
            out.append((i, Step(state, ids, text)))
        return out

    def close(self) -> None:
        """Frees what the environment holds. Idempotent."""

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SingleTurn(Environment):
    """The single-turn math task: the first turn ends the episode with the reward of its text, as
    today's scoring gives it (``decode_turn`` decodes the turn as ``decode_responses`` does)."""


def _load(path: str) -> type[Environment]:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load environment {path!r}: {' '.join(str(e).split())}") from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise UserError(f"environment {path!r} is not a subclass of reval_jax.env.base.Environment")
    return cls


def resolve_environment(name: str) -> type[Environment]:
    """The environment class called `name` in ``ENVIRONMENTS``, or at the path ``"module:Class"``."""
    if name in ENVIRONMENTS:
        return _load(ENVIRONMENTS[name])
    if ":" in name:
        return _load(name)
    near = difflib.get_close_matches(name, list(ENVIRONMENTS), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise UserError(f"unknown environment {name!r}; {hint}registered: {', '.join(sorted(ENVIRONMENTS))}, "
                    "or a 'module:Class' path")


def get_environment(name_or_path: str, config: EnvConfig, tokenizer: Any, scorer: Scorer,
                    sandbox: Any = None) -> Environment:
    """The environment `name_or_path` (module docstring), configured. `sandbox`: a running
    ``Sandbox`` to share (the Python tools start their own from ``config.sandbox`` otherwise)."""
    return resolve_environment(name_or_path)(config, tokenizer, scorer, sandbox=sandbox)
