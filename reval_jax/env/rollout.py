"""An environment's episodes driven by the rollout engine: the engine's `Turns` for an `Environment`.

    turns = EnvTurns(env, examples, tokenizer, vocab_size=cfg.vocab_size)
    rollout = generate(model, prompts, sampling, seed=..., prompt_ids=ids, turns=turns)
    turns.episodes[(row, sample)]   # the State each episode ended in: reward, turns, tool calls ...

The engine ends a row's turn at a stop id or one of the environment's stop strings (their automata:
reval_jax.rollout.stops, built once from the tokenizer's token texts) and hands the turn over; here
each round of ended turns is decoded (``decode_turn``, as a response is decoded for scoring) and
stepped (``Environment.step_many``: the round's tool calls together) on a worker thread, while the
engine decodes the other rows. An observation goes back to the engine, which appends it (its token
ids, tokenized once by the environment) and continues the row; the end of an episode finishes it.
With one turn per episode (``max_turns`` 1: the single-turn task) every turn ends its episode: the
engine frees the row at once and the scoring runs on beside the decoding of the other rows, so that
a round's scores are ready soon after its last row (``close`` waits for them).

The episode's token budget is the engine's: ``EnvConfig.max_tokens`` must be the rows' limit
(``sampling.max_new_tokens``), so that an observation the environment accepts always leaves the row
room for a policy token.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
from collections.abc import Sequence

import numpy as np

from reval_jax.env.base import Environment, Example, State, decode_turn
from reval_jax.rollout.scheduler import Parked
from reval_jax.rollout.stops import StopStrings, stop_strings, token_texts

Key = tuple[int, int]  # (prompt row, sample)


@functools.lru_cache(maxsize=8)
def _automata(strings: tuple[str, ...], tokenizer, vocab_size: int) -> StopStrings:
    """The stop strings' automata over the tokenizer's token texts (~1 s for Qwen's 152K ids): built
    once, for the rounds and the evaluations of a run alike."""
    return stop_strings(strings, token_texts(tokenizer, vocab_size))


class EnvTurns:
    """`reval_jax.rollout.engine.Turns` over `env`: episode (row, sample) of prompt row `row` is
    `examples[row]`'s. Its stop strings' automata are built once per (strings, tokenizer, vocabulary)
    and shared by every EnvTurns of a run (`_automata`)."""

    def __init__(self, env: Environment, examples: Sequence[Example], tokenizer, *, vocab_size: int):
        self.env, self.examples, self.tokenizer = env, list(examples), tokenizer
        self.spec = env.stops()
        self.stops = _automata(self.spec.strings, tokenizer, vocab_size) if self.spec.strings else None
        self.states: dict[Key, State] = {}
        self.episodes: dict[Key, State] = {}  # the episodes that ended, in their final state
        # one turn per episode: every turn ends its episode, so the engine is told at once (the row's
        # pages are freed) and the scoring runs on beside the decoding; `close` waits for it
        self.one_turn = env.config.max_turns == 1
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="env")
        self._futures: list[futures.Future] = []
        self._ended: list[Key] = []  # one turn: turns submitted, not yet reported ended
        self._waiting = 0

    def submit(self, turns: list[Parked]) -> None:
        if not turns:
            return
        keys = [t.key for t in turns]
        states = [self.states.get(k) or self.env.reset(self.examples[k[0]]) for k in keys]
        tokens = [[int(x) for x in t.turn] for t in turns]
        texts = [decode_turn(self.tokenizer, toks, self.spec) for toks in tokens]
        self._futures.append(self._pool.submit(lambda: (keys, self.env.step_many(states, tokens, texts))))
        if self.one_turn:
            self._ended += keys
        else:
            self._waiting += len(turns)

    def ready(self, wait: bool) -> list[tuple[Key, tuple[int, ...] | None]]:
        if self.one_turn:
            self._take(f for f in self._futures if f.done())
            answers, self._ended = [(k, None) for k in self._ended], []
            return answers
        if wait and self._futures:
            futures.wait(self._futures, return_when=futures.FIRST_COMPLETED)
        answers = []
        for key, step in self._take(f for f in self._futures if f.done()):
            if step.done:
                answers.append((key, None))
            else:
                answers.append((key, step.observation))
        self._waiting -= len(answers)
        return answers

    def _take(self, done) -> list:
        """The (key, step) pairs of finished environment calls, their states kept."""
        done = list(done)
        self._futures = [f for f in self._futures if f not in done]
        out = []
        for f in done:
            keys, steps = f.result()  # an environment's exception is a bug: it surfaces here
            for key, step in zip(keys, steps, strict=True):
                if step.done:
                    self.states.pop(key, None)
                    self.episodes[key] = step.state
                else:
                    self.states[key] = step.state
                out.append((key, step))
        return out

    def waiting(self) -> int:
        return self._waiting

    def close(self) -> None:
        """Waits for the environment calls still running (one turn: the last scores) and frees the thread."""
        futures.wait(self._futures)
        self._take(self._futures)
        self._pool.shutdown(wait=True)


def episode_metrics(episodes: list[State]) -> dict[str, float]:
    """A round's multi-turn figures: turns and observation tokens per episode, the fraction of
    episodes that call a tool at least once, tool calls, errors, timeouts and seconds (summed over
    the round), episodes ended by max_turns or the token budget."""
    if not episodes:
        return {}
    mean = lambda f: float(np.mean([f(e) for e in episodes]))
    total = lambda f: float(np.sum([f(e) for e in episodes]))
    return {"env_turns_mean": mean(lambda e: e.turns),
            "env_observation_tokens_mean": mean(lambda e: e.observation_tokens),
            "env_tool_use_rate": mean(lambda e: float(e.tool_calls > 0)),
            "env_tool_calls": total(lambda e: e.tool_calls), "env_tool_errors": total(lambda e: e.tool_errors),
            "env_tool_timeouts": total(lambda e: e.tool_timeouts), "env_tool_s": total(lambda e: e.tool_seconds),
            "env_truncated_rate": mean(lambda e: float(e.truncated))}
