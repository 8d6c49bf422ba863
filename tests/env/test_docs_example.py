"""docs/multi_turn.md's "Your own environment, in your own module" example, run as written: saved as a
module, loaded by its "module:Class" path (as a run config's env.name), an episode played with scripted
turns (no model), and a turn ended by its stop string through EnvTurns, the engine's side."""

import dataclasses
import pathlib
import re

import numpy as np
from helpers import tiny_tokenizer

from reval_jax.env.base import EnvConfig, LocalScorer, decode_turn, get_environment
from reval_jax.env.rollout import EnvTurns
from reval_jax.rollout.scheduler import Parked

DOC = pathlib.Path(__file__).parents[2] / "docs" / "multi_turn.md"


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    problem: str
    answer: str


def _example_module(tmp_path, monkeypatch) -> str:
    """The doc's code block, saved as my_envs.py on sys.path; returns the environment's path."""
    doc = DOC.read_text()
    section = doc[doc.index("### Your own environment, in your own module"):]
    code = re.search(r"```python\n(.*?)```\n", section, re.DOTALL).group(1)
    assert code.startswith('"""my_envs.py') and 25 <= len(code.splitlines()) <= 40, "the doc's example moved"
    (tmp_path / "my_envs.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_envs:LookupEnv"


def test_the_documented_environment_plays_an_episode(tmp_path, monkeypatch):
    """A call, a call for a missing entry (an error observation), then the answer: each observation is
    the documented text tokenized alone, the counts are the base class's, the reward is the math
    verifier's on the policy's turns only (the looked-up value appears in an observation, not there)."""
    tok = tiny_tokenizer()
    env = get_environment(_example_module(tmp_path, monkeypatch), EnvConfig(max_turns=3, max_tokens=256), tok,
                          LocalScorer("math", "plain"))
    assert env.stops().strings == ("</lookup>",)
    state = env.reset(Example("c", "What is the speed of light in m/s?", "299792458"))
    texts = ["c is <lookup>Speed of light</lookup>", " and <lookup>planck</lookup>",
             " so \\boxed{299792458}<|endoftext|>"]
    steps, trajectory = [], []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        step = env.step(state, ids, decode_turn(tok, ids, env.stops()))
        steps.append(step)
        trajectory += ids + list(step.observation)
        state = step.state
    observations = ["\n<result>299792458</result>\n", "\n<result>error: no entry 'planck'</result>\n", ""]
    assert [s.observation_text for s in steps] == observations
    for step, text in zip(steps, observations, strict=True):
        assert list(step.observation) == tok.encode(text, add_special_tokens=False)  # tokenized alone
    assert [s.done for s in steps] == [False, False, True]
    end = steps[-1].state
    assert (end.turns, end.tool_calls, end.tool_errors, end.tool_timeouts) == (3, 2, 1, 0)
    assert end.reward == 1.0 and not end.truncated
    assert end.policy_text == "".join(texts).removesuffix("<|endoftext|>")
    assert end.observation_tokens == sum(len(s.observation) for s in steps)
    assert end.tokens == len(trajectory)  # policy and observation tokens after the prompt
    ids = tok.encode("\\boxed{299792458}<|endoftext|>", add_special_tokens=False)
    wrong = env.step(env.reset(Example("c", "?", "3")), ids, decode_turn(tok, ids, env.stops()))
    assert wrong.done and wrong.reward == 0.0  # another problem's answer


def test_the_documented_environment_through_env_turns(tmp_path, monkeypatch):
    """Through EnvTurns: the stop string's automaton over the character tokenizer ends a turn at the
    token that completes "</lookup>" (not before), and the engine gets the observation's token ids."""
    tok = tiny_tokenizer()
    env = get_environment(_example_module(tmp_path, monkeypatch), EnvConfig(max_turns=2, max_tokens=128), tok,
                          LocalScorer("math", "plain"))
    turns = EnvTurns(env, [Example("c", "c?", "299792458")], tok, vocab_size=len(tok))
    call = tok.encode("<lookup>avogadro</lookup>", add_special_tokens=False)
    assert turns.stops.state(call)[1]
    assert not any(turns.stops.state(call[:i])[1] for i in range(1, len(call)))
    h = len(call)
    turns.submit([Parked((0, 0), np.asarray(call, np.int32), np.zeros(h, np.float32), np.zeros(h, np.int32),
                         np.ones(h, bool), 0, None)])
    answers = []
    while turns.waiting():
        answers += turns.ready(wait=True)
    assert answers == [((0, 0), tuple(tok.encode("\n<result>6.02214076e23</result>\n", add_special_tokens=False)))]
    assert turns.states[(0, 0)].tool_calls == 1 and not turns.episodes
    turns.close()
