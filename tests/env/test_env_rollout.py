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


def test_one_turn_episodes_are_todays_rollout_scored_as_rows_finish():
    """The single-turn task through EnvTurns (what the trainer runs where a process scores its own
    rows): the same tokens, log-probs and masks as generating without turns (the same programs: no
    stop strings), and each episode's reward is evaluate.score_rollout's for its row."""
    import jax
    from models import tiny_model

    from reval_jax.env.base import SingleTurn
    from reval_jax.rollout.engine import EngineConfig
    from reval_jax.rollout.sampler import SamplingConfig, generate
    from reval_jax.run.evaluate import score_rollout

    tok = tiny_tokenizer()
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(300, 330, n)) for n in (5, 9, 3, 12)]
    examples = [Example(str(i), "", answer) for i, answer in enumerate(["3", "7", "1", "2"])]
    config = SamplingConfig(max_new_tokens=16, num_samples=3, stop_ids=(tok.eos_token_id,), buckets=(16,))
    engine = EngineConfig(slots=4, page_size=4, prefill_rows=2)  # rows finish and free slots at different calls
    scorer = LocalScorer("math", "plain")
    turns = EnvTurns(SingleTurn(EnvConfig(max_turns=1, max_tokens=16), tok, scorer), examples, tok, vocab_size=128)
    got = jax.tree.map(np.asarray, generate(tiny_model(), prompts, config, seed=2, engine=engine, turns=turns))
    turns.close()
    want = jax.tree.map(np.asarray, generate(tiny_model(), prompts, config, seed=2, engine=engine))
    for name in ("response_tokens", "response_mask", "response_length", "logp", "truncated", "version"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    rewards = [turns.episodes[(b, n)].reward for b in range(len(prompts)) for n in range(3)]
    np.testing.assert_array_equal(rewards, score_rollout(scorer, tok, want, [e.answer for e in examples], shared=False))
