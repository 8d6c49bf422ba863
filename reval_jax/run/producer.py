"""The round producer: round i's prompts -> the rollout engine -> rewards -> scored Trajectories.

    producer = Producer(cfg, sampling, engine, prompts, scorer, tokenizer, rewarding, env)
    round = producer.produce(i, weights)     # weights: reval_jax.run.pipeline.RolloutWeights

The pipeline (reval_jax/run/pipeline.py) decides when and under which weights a round is made; the
producer only makes it. Samples are keyed by (seed, iteration, prompt id), so splitting a round
into several sampler calls (`RoundConfig.prompts_per_call`) does not change them.

Dynamic sampling (DAPO): with the algorithm's group filter, groups whose rewards are all equal are
dropped and more prompts are generated (the next batches of the prompt stream, at most
`RoundConfig.max_extra_calls` = dapo.max_extra_generations extra calls) until the round has its
prompts_per_iteration groups; a round still short after that is topped up with the earliest dropped
groups (`algorithms.select_groups`). The round's metrics then count the calls and the groups kept
and short (generation_calls, groups_kept, groups_short).

Multi-turn episodes (`env`, reval_jax.env): the engine runs each sample as an episode of the
environment (reval_jax.env.rollout.EnvTurns); its reward is the one the environment ended it with
(the policy's text scored by the same verifier), and the round's metrics add the episodes' figures
(`episode_metrics`: env_turns_mean, env_tool_calls, ...). The single-turn task runs through the
same path as one-turn episodes (`SingleTurn`): each row is scored as soon as the engine finishes it,
on a thread beside the decoding, so that scoring is off the critical path but for the last rows
(docs/host_round.md); only where several processes share the scoring of one rollout is it scored
after generation (`evaluate.score_rollout`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import jax
import numpy as np
from tqdm import tqdm

from reval_jax.data.batch import Trajectories, concatenate
from reval_jax.env.base import EnvConfig, Environment, SingleTurn, State
from reval_jax.env.rollout import EnvTurns, episode_metrics
from reval_jax.objective import algorithms
from reval_jax.parallel.distributed import process_share, to_host
from reval_jax.rollout.engine import EngineConfig
from reval_jax.rollout.sampler import Pickup, SamplingConfig, generate
from reval_jax.run import evaluate
from reval_jax.run.config import Rewarding, RoundConfig
from reval_jax.run.metrics import show_bars
from reval_jax.run.pipeline import RolloutWeights, Round


@dataclasses.dataclass
class Scored:
    """Rollouts of one or more sampler calls with their verifier scores, rewards not yet set."""

    batch: Trajectories  # [B, T] host arrays
    raw: np.ndarray  # [B] f32 verifier scores
    truncated: np.ndarray  # [B] bool

    def take(self, rows: np.ndarray) -> Scored:
        return Scored(self.batch.take(rows), self.raw[rows], self.truncated[rows])

    @staticmethod
    def concatenate(parts: list[Scored]) -> Scored:
        return Scored(concatenate([p.batch for p in parts]), np.concatenate([p.raw for p in parts]),
                      np.concatenate([p.truncated for p in parts]))


class Producer:
    """Makes the rounds of a run (see the module docstring); `prompts` yields each round's prompt
    batch, the same on every process."""

    def __init__(self, cfg: RoundConfig, sampling: SamplingConfig, engine: EngineConfig | None,
                 prompts: Iterator, scorer, tokenizer, rewarding: Rewarding, env: Environment | None = None):
        self.cfg, self.sampling, self.engine = cfg, sampling, engine
        self.prompts, self.scorer, self.tokenizer, self.rewarding = prompts, scorer, tokenizer, rewarding
        self.env = env  # multi-turn episodes (None: one turn, scored by `scorer`)
        self._episodes: list[State] = []  # the round's ended episodes (multi-turn)

    def produce(self, iteration: int, weights: RolloutWeights) -> Round:
        t0 = time.perf_counter()
        self._episodes = []
        scored, info = self.sample(iteration, 0, weights), {}
        if self.rewarding.filter_groups is not None:
            scored, info = self._fill(iteration, scored, weights)
        if self.env is not None:  # multi-turn figures (one-turn episodes have none to report)
            info = {**info, **episode_metrics(self._episodes)}
        batch = self._rewarded(scored)
        return Round(iteration, batch, scored.truncated, time.perf_counter() - t0, local=self.cfg.shares, info=info)

    def sample(self, iteration: int, call: int, weights: RolloutWeights) -> Scored:
        """The next prompt batch (this process's share of it, with `shares`) sampled and scored;
        `call` > 0 numbers a dynamic-sampling call's prompts apart from every round's."""
        cfg = self.cfg
        examples = next(self.prompts)
        base_id = (call * (cfg.num_iterations + 1) + iteration) * cfg.prompts_per_round
        if cfg.shares:
            mine = process_share(len(examples))
            examples, base_id = examples[mine], base_id + mine.start
        version, model = weights.current()
        parts = []
        for start in tqdm(range(0, len(examples), cfg.prompts_per_call), desc=f"generate {iteration}",
                          disable=not show_bars(cfg.progress) or len(examples) <= cfg.prompts_per_call,
                          leave=False):
            chunk = examples[start : start + cfg.prompts_per_call]
            turns = self._turns(chunk, model.cfg.vocab_size)
            rollout = generate(model, [e.prompt_ids for e in chunk], self.sampling, engine=self.engine,
                               seed=(cfg.seed * 1_000_003 + iteration) % 2**32,
                               prompt_ids=[base_id + start + j for j in range(len(chunk))],
                               pickup=Pickup(version=version, weights=weights.newer if weights.picks_up else None,
                                             max_steps=cfg.pickup_steps, in_flight=cfg.in_flight), turns=turns)
            if turns is None:
                raw = evaluate.score_rollout(self.scorer, self.tokenizer, rollout, [e.answer for e in chunk],
                                             shared=not cfg.shares)
            else:  # each episode's reward, as its environment gave it at the end
                raw = self._episode_rewards(turns, len(chunk))
            batch = rollout.to_trajectories(iteration=iteration, pad_id=self.sampling.pad_id).pad_to(cfg.seq_len)
            parts.append(Scored(batch, raw, to_host(rollout.truncated)))
            if weights.picks_up:  # the next call starts under the newest weights taken so far
                version, model = weights.current()
        return Scored.concatenate(parts)

    def _turns(self, chunk, vocab_size: int) -> EnvTurns | None:
        """The engine's turns for a call's prompts: the environment's episodes; one turn (the
        single-turn task) where this process scores its own rows, so that scoring runs beside the
        decoding (rows are scored as they finish); None where processes share the scoring of one
        rollout (evaluate.score_rollout gathers their shares: a collective, after generation)."""
        env = self.env
        if env is None:
            if not self.cfg.shares and jax.process_count() > 1:
                return None
            env = SingleTurn(EnvConfig(max_turns=1, max_tokens=self.sampling.max_new_tokens), self.tokenizer,
                             self.scorer)
        return EnvTurns(env, chunk, self.tokenizer, vocab_size=vocab_size)

    def _episode_rewards(self, turns: EnvTurns, prompts: int) -> np.ndarray:
        turns.close()
        N = self.sampling.num_samples
        episodes = [turns.episodes[(j, n)] for j in range(prompts) for n in range(N)]
        self._episodes += episodes
        return np.asarray([e.reward for e in episodes], np.float32)

    def _rewarded(self, scored: Scored) -> Trajectories:
        """The round's training rewards (the algorithm's: shaped, then transformed within each group)."""
        batch, raw = scored.batch, scored.raw
        lengths = np.asarray(batch.response_mask).sum(1)
        reward = self.rewarding.rewards(raw, np.asarray(batch.group_id), lengths)
        return batch.replace(raw_reward=raw, reward=np.asarray(reward, np.float32))

    def _fill(self, iteration: int, scored: Scored, weights: RolloutWeights) -> tuple[Scored, dict[str, float]]:
        """Dynamic sampling: the round's groups with informative rewards, topped up by extra calls."""
        rows, n = len(scored.raw), self.sampling.num_samples  # this process's rows of a full round
        parts, keep = [scored], [self._keep(scored)]
        while sum(k.sum() for k in keep) < rows and len(parts) <= self.cfg.max_extra_calls:
            parts.append(self.sample(iteration, len(parts), weights))
            keep.append(self._keep(parts[-1]))
        whole, keep = Scored.concatenate(parts), np.concatenate(keep)
        kept = int(keep.sum()) // n
        chosen = algorithms.select_groups(keep, np.asarray(whole.batch.group_id), rows // n)
        info = {"generation_calls": float(len(parts)), "groups_kept": float(min(kept, rows // n)),
                "groups_short": float(max(0, rows // n - kept))}
        return whole.take(chosen), info

    def _keep(self, scored: Scored) -> np.ndarray:
        return np.asarray(self.rewarding.filter_groups(scored.raw, np.asarray(scored.batch.group_id)), bool)

