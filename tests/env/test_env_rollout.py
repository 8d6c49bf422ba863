"""EnvTurns: an environment's episodes as the engine's turns (reval_jax.env.rollout).

The engine side (rows parked between turns, observations prefilled into their pages) is
tests/rollout/test_turns.py; here the turns the engine would hand over are made by hand.
"""

import numpy as np
from helpers import tiny_tokenizer

from reval_jax.env.base import EnvConfig, LocalScorer
from reval_jax.env.calculator_env import CalculatorEnv
from reval_jax.env.rollout import EnvTurns
from reval_jax.rollout.scheduler import Parked
from reval_jax.rollout.stops import matches, token_texts


class Example:
    def __init__(self, id, problem, answer):
        self.id, self.problem, self.answer = id, problem, answer


def parked(key, tokens, turn_start):
    tokens = np.asarray(tokens, np.int32)
    h = len(tokens)
    return Parked(key, tokens, np.zeros(h, np.float32), np.zeros(h, np.int32), np.ones(h, bool), turn_start, None)


def test_calculator_episodes_through_env_turns():
    """The calculator's stop string ">>" is the engine's automaton over the char tokenizer; an ended
    turn gets the calculator's observation (token ids of "=4", tokenized alone); the final turn
    ends the episode with its reward; two episodes of different prompts are kept apart."""
    tok = tiny_tokenizer()
    env = CalculatorEnv(EnvConfig(max_turns=3, max_tokens=64), tok, LocalScorer())
    turns = EnvTurns(env, [Example("a", "Compute 7-3.", "4"), Example("b", "Compute 2+2.", "5")], tok,
                     vocab_size=len(tok) + 7)
    texts = token_texts(tok, len(tok) + 7)
    call = tok.encode("<<7-3>>", add_special_tokens=False)
    assert turns.stops.state(call)[1] and not turns.stops.state(call[:-1])[1]
    assert matches([">>"], [texts[t] for t in call]) == len(call) - 1

    turns.submit([parked((0, 0), call, 0), parked((1, 0), call, 0)])
    answers = dict(turns.ready(wait=True) + ([] if turns.waiting() == 0 else turns.ready(wait=True)))
    assert turns.waiting() == 0
    assert list(answers[(0, 0)]) == tok.encode("=4", add_special_tokens=False) == list(answers[(1, 0)])

    final = tok.encode(" so \\boxed{4}", add_special_tokens=False) + [tok.eos_token_id]
    history = call + list(answers[(0, 0)])
    turns.submit([parked((0, 0), history + final, len(history)), parked((1, 0), history + final, len(history))])
    done = []
    while turns.waiting():
        done += turns.ready(wait=True)
    assert sorted(done) == [((0, 0), None), ((1, 0), None)]
    a, b = turns.episodes[(0, 0)], turns.episodes[(1, 0)]
    assert (a.reward, b.reward) == (1.0, 0.0)  # the answers are 4 and 5
    assert (a.turns, a.tool_calls, a.observation_tokens) == (2, 1, 2)
    assert a.policy_text == "<<7-3>> so \\boxed{4}"
    turns.close()
