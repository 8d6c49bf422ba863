"""Multi-turn rows in the engine: stop strings end turns, observations continue rows in their pages.

A scripted environment (no tokenizer, no tools) answers each ended turn with observation tokens that
are a function of the turn, so that an episode's tokens depend on the model's draws only: they must
not depend on slots, pages, preemption, nor on whether a row's history stays in its pages or is
prefilled again (two programs that round differently may part only at a near tie:
test_sampler.agreed_columns). The log-probs of the policy tokens are checked against a full forward
over the whole episode, which places every observation token where the engine did.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import tiny_model
from test_engine import PROMPTS, response_logits
from test_sampler import agreed_columns

from reval_jax.rollout import scheduler as scheduler_mod
from reval_jax.rollout.engine import EngineConfig
from reval_jax.rollout.sampler import SamplingConfig, generate
from reval_jax.rollout.stops import matches, stop_strings

VOCAB = 128
# token t's text: one or two of the letters a, b, c; "abc" ends a turn (within a token or across two)
TEXTS = ["abc"[t % 3] + ("" if t % 2 else "abc"[(t // 3) % 3]) for t in range(VOCAB)]
STOPS = stop_strings(["abc"], TEXTS)
CONFIG = SamplingConfig(max_new_tokens=40, num_samples=2, temperature=1.0, stop_ids=(7,), buckets=(64,))
ROOMY = EngineConfig(slots=12, page_size=8, prefill_chunk=16)
SMALL = EngineConfig(slots=4, page_size=4, cache_tokens=104, prefill_chunk=8, prefill_rows=2, block_pages=2)


class Scripted:
    """Up to `max_turns` turns: a turn that ends at the stop string gets 1-3 observation tokens made
    from its last token; a stop id, the limit or the last turn ends the episode."""

    def __init__(self, max_turns=3, limit=CONFIG.max_new_tokens, hold=None):
        self.stops, self.max_turns, self.limit, self.hold = STOPS, max_turns, limit, hold
        self.answers, self.turns, self.ended = [], {}, []

    def observation(self, turn):
        return tuple(int(turn[-1] * 7 + k) % 100 + 20 for k in range(1 + len(turn) % 3))

    def submit(self, parked):
        for p in parked:
            self.turns[p.key] = self.turns.get(p.key, 0) + 1
            obs = self.observation(p.turn)
            hit = STOPS.state(p.turn)[1]
            more = hit and self.turns[p.key] < self.max_turns and len(p.tokens) + len(obs) < self.limit
            self.answers.append((p.key, obs if more else None))

    def ready(self, wait):
        total = len(PROMPTS) * CONFIG.num_samples
        release = len(self.ended) == total - 1  # the held episode's answers wait for every other one
        out = [a for a in self.answers if a[0] != self.hold or release]
        if wait and not out:
            raise AssertionError("the engine waits for a held answer while other episodes have not ended")
        self.answers = [a for a in self.answers if a not in out]
        self.ended += [k for k, obs in out if obs is None]
        return out

    def waiting(self):
        return len(self.answers)


def run(engine, turns=None, config=CONFIG, seed=5):
    turns = turns or Scripted()
    out = generate(tiny_model(), PROMPTS, config, seed=seed, engine=engine, turns=turns)
    return jax.tree.map(np.asarray, out), turns


def observations(r):
    """[R, A] bool: the response tokens after the prompt that are not policy tokens."""
    return (np.arange(r.response_tokens.shape[1])[None] < r.response_length[:, None]) & ~r.response_mask


def test_stop_string_automata_match_the_text():
    """The automaton stops at the first token after which the turn's text contains a stop string,
    for overlapping strings, strings completed inside one token and across three."""
    rng = np.random.RandomState(0)
    texts = ["".join(rng.choice(list("xyz"), rng.randint(0, 4))) for _ in range(50)]
    for strings in (["xyx"], ["zz", "yxz"], ["xyzxy"], ["y"]):
        stops = stop_strings(strings, texts)
        for _ in range(200):
            stream = rng.randint(0, 50, 12)
            want = matches(strings, [texts[t] for t in stream])
            got = next((i for i in range(len(stream)) if stops.state(stream[: i + 1])[1]), None)
            assert got == want, (strings, stream)


@pytest.mark.slow
def test_turns_end_at_stop_strings_and_observations_are_context_not_policy():
    """Episodes take several turns; each observation is the scripted one, right after the turn that
    ended at the stop string; observation tokens are not policy tokens and have log-prob 0."""
    r, turns = run(ROOMY)
    obs = observations(r)
    assert max(turns.turns.values()) == 3 and obs.any(axis=1).mean() > 0.5
    for i in range(len(r.response_length)):
        toks, h = r.response_tokens[i], int(r.response_length[i])
        start = 0
        while start < h:  # walk the turns: policy tokens up to the stop string, then the observation
            end = start + int(np.argmin(r.response_mask[i, start:h])) if not r.response_mask[i, start:h].all() else h
            turn = toks[start:end]
            if end < h:
                assert STOPS.state(turn)[1], f"row {i}: an observation after a turn that did not stop"
                o = Scripted().observation(turn)
                np.testing.assert_array_equal(toks[end : end + len(o)], o)
                assert not r.response_mask[i, end : end + len(o)].any()
                end += len(o)
            start = end
    assert np.all(r.logp[obs] == 0)


@pytest.mark.slow
def test_policy_log_probs_are_the_full_forwards_over_the_episode():
    """Sampled at temperature 1 from the full distribution, each policy token's log-prob is the
    log-softmax of a full forward over prompt, turns and observations: every observation token sits
    at the position the engine prefilled it at."""
    r, _ = run(SMALL)
    logits = response_logits(r)
    want = np.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits), -1), r.response_tokens[..., None], -1)[..., 0]
    m = r.response_mask
    np.testing.assert_allclose(r.logp[m], np.asarray(want)[m], atol=2e-5)


def _same_episodes(got, want):
    agreed = agreed_columns(got.response_tokens, want.response_tokens, response_logits(want), CONFIG, seed=5,
                            prompt_ids=want.group_id)
    same = agreed == CONFIG.max_new_tokens
    assert same.mean() > 0.9
    for name in ("response_mask", "response_length"):
        np.testing.assert_array_equal(getattr(got, name)[same], getattr(want, name)[same], err_msg=name)
    for i, n in enumerate(agreed):
        np.testing.assert_allclose(got.logp[i, :n], want.logp[i, :n], atol=1e-5)


@pytest.mark.parametrize("engine", [SMALL, dataclasses.replace(ROOMY, slots=3)], ids=["small_cache", "few_slots"])
@pytest.mark.slow
def test_episodes_do_not_depend_on_slots_pages_or_preemption(engine, monkeypatch):
    """Few slots, small pages and a cache so small that parked rows give up their pages and live
    rows are preempted: the episodes of a roomy engine."""
    evicted = []
    evict = scheduler_mod.Scheduler.evict
    monkeypatch.setattr(scheduler_mod.Scheduler, "evict", lambda self, r=None: evicted.append(1) or evict(self, r))
    _same_episodes(run(engine)[0], run(ROOMY)[0])
    if engine is SMALL:
        assert evicted


def test_continuing_in_the_pages_equals_prefilling_the_whole_episode(monkeypatch):
    """Every continuation prefilled from the prompt on (its parked pages given up first) gives the
    episodes of continuations that prefill only the observation."""
    in_pages, _ = run(SMALL)
    keep = scheduler_mod.Scheduler.continue_turn

    def from_scratch(self, key, observation):
        self.parked[key].cached = None
        self._refresh()
        keep(self, key, observation)

    monkeypatch.setattr(scheduler_mod.Scheduler, "continue_turn", from_scratch)
    _same_episodes(run(SMALL)[0], in_pages)


def test_rows_waiting_on_the_environment_free_their_slots():
    """With 2 slots for prompts of 2 samples, an episode whose environment answers only after every
    other episode has ended must not keep its slot meanwhile (no other prompt would fit)."""
    r, turns = run(dataclasses.replace(ROOMY, slots=2), Scripted(hold=(0, 0)))
    assert turns.ended[-1] == (0, 0) and len(set(turns.ended)) == len(PROMPTS) * CONFIG.num_samples
