"""The rollout engine: continuous batching over a fixed number of decode slots on a paged KV cache.

    requests (prompt, its N samples, max_new_tokens) --scheduler.admit--> prefill the prompt ONCE
    into pages (chunks of C tokens), sample a_1 for each of its N samples, give every sample a slot
    whose page table shares the prompt's full pages (the last, partial page is copied per sample)
      --> programs.decode: the compiled loop over all B slots (lax.while_loop, pages allocated on
          device from a free-page stack as rows cross page boundaries) until a quarter of the slots
          (`refill`) have finished and requests wait, or every slot has finished, or the free pages
          run out
      --> scheduler.collect: finished slots' results, their pages freed (a page is free when no
          slot's table holds it); scheduler.preempt: the newest rows of a replica out of pages (they
          resume later by re-prefilling their prompt and tokens so far) --> admit waiting requests
          into the free slots --> loop

The files follow the data: scheduler.py (the host's slot table, page allocator and queue: admit /
collect / preempt), page_table.py (sizes, the pages-needed rule, the capacity error),
programs.py (the compiled prefill / decode steps, pure functions of (params, state)), and this
file, the loop that runs them. Dimension alphabet: page_table.py.

Replicas. On a rollout mesh with R data replicas the slots and the KV pages are split alike (pages.py):
slot b and its pages belong to replica b // (B / R). A request (a prompt and its N samples) is admitted
whole into one replica, the one with the most free pages, so that its samples share its prompt's
pages; free pages and preemption are per replica. Every device keeps its replica's G pages only.

Weights can change while the engine runs (asynchronous training, reval_jax/run/pipeline.py): `run(...,
weights=poll)` calls `poll()` before every decode call; when it returns (version, params) the next
call decodes under them. Rows in flight keep their KV cache and continue under the new weights
(in_flight="continue"), or the engine admits nothing new until they have finished under the old
ones and switches then (in_flight="finish"). Each response token's policy version is returned with
it. `max_steps` bounds the decode steps of one call, so that new weights are picked up within that
many tokens.

Randomness is the static sampler's (sampling.py's key rule): the tokens depend on neither the batch
composition, the slot a sample gets, its pages nor preemption, only on the model's logits.
Log-probs are log q under the distribution each token was drawn from (sampling.sample_logits).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reval_jax.parallel.distributed import to_host
from reval_jax.rollout import programs
from reval_jax.rollout.page_table import CacheGeometry, EngineConfig, decode_chunk, pow2_at_least, replica_pages
from reval_jax.rollout.pages import TRASH
from reval_jax.rollout.programs import PrefillChunk, SlotRows, Slots, empty_state, prefill_shape
from reval_jax.rollout.sampling import SamplingConfig, sample_keys
from reval_jax.rollout.scheduler import Admission, Parked, Readback, Request, Scheduler
from reval_jax.rollout.stops import StopStrings

__all__ = ["Engine", "EngineConfig", "Pickup", "Slots", "Turns", "decode_chunk", "replica_pages"]


@dataclasses.dataclass(frozen=True)
class Pickup:
    """Asynchronous training's side of a `generate` call (reval_jax.run.pipeline, `Engine.run`):
    `version` is the policy version of the model generating; `weights` (None, or `poll() ->
    (version, model) | None`, called before every decode call) lets newer weights in between decode
    calls, at most `max_steps` decode steps apart (0: up to max_new_tokens), rows in flight going on
    under them (`in_flight` "continue") or finishing under the old ones first ("finish")."""

    version: int = 0
    weights: Callable[[], tuple[int, Any] | None] | None = None
    max_steps: int = 0
    in_flight: str = "continue"


NO_PICKUP = Pickup()  # generating without asynchronous training


class Turns(Protocol):
    """Multi-turn episodes as the engine sees them (reval_jax.env.rollout.EnvTurns is one): what
    ends a turn besides the stop ids, and what follows each turn. Keys are (prompt row, sample)."""

    stops: StopStrings | None  # stop strings (stops.py), or None for stop ids only

    def submit(self, turns: list[Parked]) -> None:
        """Turns that ended (`Parked.key`, `.tokens`: the response so far, `.turn`: this turn's
        tokens); answered later through `ready`, in any order."""

    def ready(self, wait: bool) -> list[tuple[tuple[int, int], Sequence[int] | None]]:
        """The answers so far: (key, observation token ids to append), or (key, None) when the
        episode has ended. `wait`: block until at least one answer when some are outstanding."""

    def waiting(self) -> int:
        """Turns submitted and not yet answered."""


class Engine:
    """Continuous batching for one model and sampling config.

        engine = Engine(model, sampling, EngineConfig(slots=256, page_size=16), prompt_bucket=P)
        out = engine.run(prompts, seed=step, prompt_ids=ids, limits=max_new_tokens)
        # out: per prompt, per sample, (tokens [h] int32, logp [h] f32, versions [h] int32)
    """

    def __init__(self, model, sampling: SamplingConfig, engine: EngineConfig, *, prompt_bucket: int,
                 version: int = 0):
        self.graphdef, self.params = nnx.split(model)
        self.version = version  # the policy version of `params` (asynchronous training's weight pushes)
        self.cfg, self.sampling, self.engine, self.mesh = model.cfg, sampling, engine, model.mesh
        self.geometry = CacheGeometry.of(engine, samples=sampling.num_samples, max_new_tokens=sampling.max_new_tokens,
                                         prompt_bucket=prompt_bucket, mesh=model.mesh)
        self.platform = (jax.devices() if self.mesh is None else self.mesh.devices.ravel())[0].platform
        # calls, preemptions, and host wall seconds: in the decode loop up to the host's read of its
        # result, and in admissions (prefill to the first tokens' read, then dispatching the slot
        # writes, whose device time falls into the next decode_s: no sync is added to time them)
        self.stats = {"decode_calls": 0, "prefill_calls": 0, "preempted": 0, "decode_s": 0.0, "admit_s": 0.0}
        self.stops: StopStrings | None = None  # the stop strings of the multi-turn run in progress

    def initial_state(self) -> tuple[programs.Pool, Slots]:
        """An empty pool and empty slots on the model's mesh: the decode loop's inputs."""
        return empty_state(self.cfg, self.geometry, self.mesh, self.sampling.pad_id,
                           self.stops.count if self.stops else 0)

    # --- the loop

    def run(self, prompts: Sequence[Sequence[int]], *, seed: int, prompt_ids: Sequence[int],
            limits, pickup: Pickup = NO_PICKUP, turns: Turns | None = None):
        """Every sample of every prompt to its stop token or its limit (`limits`: max_new_tokens per
        prompt [P] or per sample [P, N]). Returns, per prompt, a list of N (tokens [h] int32,
        logp [h] f32, versions [h] int32: the policy version each token was sampled under) in
        sample order.

        pickup (its version is the engine's own, set at construction):
          weights: None, or `poll() -> (version, model) | None`, called before every decode call;
            a model it returns (the same architecture and layout) replaces the current one there.
          max_steps: decode steps per call at most (0: up to max_new_tokens).
          in_flight: "continue" (rows in flight go on under new weights, keeping their cache) or
            "finish" (nothing is admitted until they have finished under the old weights).
        turns: None (one turn), or multi-turn episodes (`Turns`): each row's turn ends at a stop id,
          one of `turns.stops` or its limit; the row's slot is freed, its pages kept, the turn
          handed to `turns.submit`; an observation from `turns.ready` continues it in a free slot
          (prefilling only the observation, module docstring). Each result then has a fourth array,
          the policy mask [h] bool (False at observation tokens, whose log-probs are 0)."""
        weights, max_steps, in_flight = pickup.weights, pickup.max_steps, pickup.in_flight
        if in_flight not in ("continue", "finish"):
            raise ValueError(f"in_flight={in_flight!r}: use 'continue' or 'finish'")
        self.stops = turns.stops if turns is not None else None
        scheduler = self._scheduler(prompts, prompt_ids, limits, turns is not None)
        pool, slots = self.initial_state()
        slots = self._write(slots, self._idle([]), slots.keys[:0], scheduler)
        staged = None  # new weights waiting for the rows in flight to finish (in_flight="finish")
        while True:
            staged = self._take_weights(weights, staged, in_flight, scheduler)
            if turns is not None:  # observations continue parked rows; ended episodes finish them
                self._answers(scheduler, turns)
            if staged is None:  # nothing is admitted while rows finish under the old weights
                pool, slots = self._admit(scheduler, pool, slots, seed)
            if not scheduler.running():
                if turns is None or not turns.waiting():
                    break
                continue  # every row waits on the environment
            pool, slots = self._decode(scheduler, pool, slots, max_steps or self.sampling.max_new_tokens)
            if turns is not None:
                turns.submit(scheduler.take_turns())
        return scheduler.rollouts(len(prompts), self.sampling.num_samples)

    def _answers(self, scheduler: Scheduler, turns: Turns) -> None:
        """The environment's answers so far (waiting for one when no row decodes and none is queued)."""
        wait = not scheduler.slots.held.any() and not scheduler.pending
        for key, observation in turns.ready(wait=wait and turns.waiting() > 0):
            if observation is None or len(observation) == 0:
                scheduler.finish_turn(key)
            else:
                scheduler.continue_turn(key, observation)

    def _scheduler(self, prompts, prompt_ids, limits, turns: bool) -> Scheduler:
        N, ids = self.sampling.num_samples, np.asarray(prompt_ids, np.int32)
        limits = np.broadcast_to(np.asarray(limits, np.int32).reshape(len(prompts), -1), (len(prompts), N))
        requests = [Request(i, int(ids[i]), np.asarray(p, np.int32), tuple(int(x) for x in limits[i]), tuple(range(N)))
                    for i, p in enumerate(prompts)]
        return Scheduler(self.geometry, requests, stop_ids=self.sampling.stop_ids,
                         prefill_rows=self.engine.prefill_rows, refill=self.engine.refill, pad_id=self.sampling.pad_id,
                         stop_strings=self.stops, turns=turns)

    def _idle(self, index) -> SlotRows:
        """Idle rows at `index` (with their stop strings' states when there are any)."""
        return SlotRows.empty(index, self.geometry, self.sampling.pad_id, self.stops.count if self.stops else 0)

    def _take_weights(self, weights, staged, in_flight: str, scheduler: Scheduler):
        """Polls for new weights and switches to them (or to those staged before) unless rows must
        finish under the old ones first; returns the weights still staged (None when none)."""
        new = weights() if weights is not None else None
        if new is not None:
            staged = new
        if staged is not None and (in_flight == "continue" or not scheduler.slots.held.any()):
            self._set_weights(*staged)
            scheduler.switch_version(self.version)
            return None
        return staged

    def _admit(self, scheduler: Scheduler, pool, slots: Slots, seed: int):
        """Admits what fits: prefills the admitted requests once, samples a_1 of each new sample,
        copies partial pages and writes the slots."""
        batch = scheduler.admit()
        if not batch:
            return pool, slots
        t0 = time.perf_counter()
        pool, logits = self._prefill_rows(pool, batch)
        rows = scheduler.start(batch, self._first_tokens(batch, logits, seed), self.version)
        pool = self._copy_pages(pool, *scheduler.page_copies(batch))
        keys = sample_keys(np.uint32(seed), jnp.asarray(rows.prompt_id, jnp.int32), jnp.asarray(rows.sample, jnp.int32))
        slots = self._write(slots, rows, keys, scheduler)
        self.stats["admit_s"] += time.perf_counter() - t0
        return pool, slots

    def _decode(self, scheduler: Scheduler, pool, slots: Slots, steps: int):
        """One decode call, then the host's turn: collect finished slots, preempt where pages ran out,
        clear their slots on device."""
        self.stats["decode_calls"] += 1
        t0 = time.perf_counter()
        chunk, call_steps = self._chunk(scheduler.slots.pos, scheduler.slots.live, steps)
        pool, slots = programs.decode(self.graphdef, self.params, pool, slots,
                                      jnp.asarray(scheduler.refill_at(), jnp.int32), jnp.asarray(call_steps, jnp.int32),
                                      self.stops.device if self.stops else None, config=self.sampling, chunk=chunk)
        # every process gets the whole state (to_host gathers arrays that span several hosts), so
        # every process's scheduler takes the same decisions
        read = Readback(*(np.array(to_host(x)) for x in (slots.table, slots.pos, slots.length, slots.live,
                                                          slots.tokens, slots.logp)))
        self.stats["decode_s"] += time.perf_counter() - t0
        cleared = scheduler.collect(read)
        victims = scheduler.preempt(read)
        self.stats["preempted"] += len(victims)
        cleared += victims
        keys = slots.keys[jnp.asarray(cleared)] if cleared else slots.keys[:0]  # an idle row's key is never used
        return pool, self._write(slots, self._idle(cleared), keys, scheduler)

    def _chunk(self, pos: np.ndarray, live: np.ndarray, steps: int) -> tuple[int, int]:
        """(decode_chunk, steps) for a decode call on the rows as they enter it: the chunk from the
        most (row, page) pairs any data replica reads (its rows are a contiguous B / R of the slots);
        where the chunk adapts (accelerators), at most the steps after which those pairs could
        outgrow it (each live row adds a page every S steps), so that the next call picks a larger
        one rather than every layer reading two blocks."""
        g, S = self.geometry, self.geometry.page_size
        most = g.rows * g.width
        pairs = int(np.where(live, pos // S + 1, 0).reshape(g.replicas, -1).sum(1).max())
        chunk = decode_chunk(self.engine, self.platform, pairs, most)
        if self.engine.decode_chunk or self.platform == "cpu" or chunk >= most:
            return chunk, steps
        rows = max(1, int(live.reshape(g.replicas, -1).sum(1).max()))
        return chunk, min(steps, S * max(1, (chunk - pairs) // rows))

    # --- device calls for the host

    def _write(self, slots: Slots, rows: SlotRows, keys, scheduler: Scheduler) -> Slots:
        """Writes `rows` (their keys `keys`) and the scheduler's free pages into the slots."""
        B = self.geometry.slots
        index, full = rows.padded(B)
        full = {k: jnp.asarray(v) for k, v in full.items()}
        pad = sample_keys(np.uint32(0), jnp.zeros(B - len(rows.index), jnp.int32), jnp.zeros(B - len(rows.index),
                                                                                              jnp.int32))
        full["keys"] = jnp.concatenate([keys, pad])  # a new buffer: `slots` is donated
        free, n_free = scheduler.pages.stack()
        return programs.write(slots, jnp.asarray(index), full, jnp.asarray(free), jnp.asarray(n_free))

    def _copy_pages(self, pool, src: list[list[int]], dst: list[list[int]]):
        """Copies pages src[r][i] -> dst[r][i] within each replica r ([R, n], padded to a power of two
        with trash-to-trash copies: few compiled shapes)."""
        most = max(map(len, src))
        if not most:
            return pool
        n = pow2_at_least(most)
        pad = lambda x: np.asarray([p + [TRASH] * (n - len(p)) for p in x], np.int32)
        return programs.copy(pool, jnp.asarray(pad(src)), jnp.asarray(pad(dst)), mesh=self.mesh)

    def _prefill_rows(self, pool, batch: list[Admission]):
        """Prefills the admitted sequences in chunks of C; returns (pool, logits [n, V] at each one's
        last token, in batch order). A call's rows are R blocks of n' rows, replica r's in block r."""
        g = self.geometry
        seqs = [a.request.sequence[a.start :] for a in batch]  # a continuation's pages hold the rest
        starts = np.asarray([a.start for a in batch], np.int32)
        per = [[i for i, a in enumerate(batch) if a.replica == r] for r in range(g.replicas)]
        n, C = prefill_shape(self.engine, g, max(map(len, per)), max(map(len, seqs)))
        at = np.zeros(len(batch), np.int64)  # each row's place among the n rows of the call
        for r, members in enumerate(per):
            at[members] = r * (n // g.replicas) + np.arange(len(members))
        table = np.zeros((n, g.width), np.int32)
        table[at] = np.stack([a.table_row for a in batch])
        logits = None
        for c in range(max(-(-len(s) // C) for s in seqs)):
            rows, final = _prefill_chunk(seqs, starts, at, table, C, c)
            self.stats["prefill_calls"] += 1
            pool, out = programs.prefill(self.graphdef, self.params, pool, rows, block_pages=self.engine.block_pages,
                                         replicas=g.replicas)
            logits = out if logits is None else jnp.where(jnp.asarray(final)[:, None], out, logits)
        return pool, logits[jnp.asarray(at)]

    def _first_tokens(self, batch: list[Admission], logits, seed: int) -> dict[tuple[int, int], tuple[int, float]]:
        """a_1 and its log-prob of every sample n of every new request batch[i], by (i, n)."""
        new = [i for i, a in enumerate(batch) if not a.request.resume]
        if not new:
            return {}
        rep = np.asarray([i for i in new for _ in batch[i].request.samples])
        pid = np.asarray([batch[i].request.prompt_id for i in new for _ in batch[i].request.samples], np.int32)
        smp = np.asarray([n for i in new for n in batch[i].request.samples], np.int32)
        m = len(rep)
        rep, pid, smp = (np.pad(x, (0, pow2_at_least(m) - m), mode="edge") for x in (rep, pid, smp))  # few shapes
        tok, lp = map(to_host, programs.first_tokens(logits[jnp.asarray(rep)], np.uint32(seed), jnp.asarray(pid),
                                                     jnp.asarray(smp), config=self.sampling))
        pairs = zip(rep[:m], smp[:m], strict=True)
        return {(int(i), int(n)): (int(tok[j]), float(lp[j])) for j, (i, n) in enumerate(pairs)}

    def _set_weights(self, version: int, model) -> None:
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("new weights for the engine must have the model's architecture, dtype and layout")
        self.version, self.params = int(version), params


def _prefill_chunk(seqs: list[np.ndarray], starts: np.ndarray, at: np.ndarray, table: np.ndarray, C: int, c: int):
    """Chunk c (tokens c·C .. c·C + C − 1) of every sequence, at positions from its `starts` on
    (0, or the tokens a continuation's pages hold), at its row `at` of the call's table [n, W];
    returns (PrefillChunk, final [n] bool: the row's last chunk is this one)."""
    n = table.shape[0]
    tokens, valid = np.zeros((n, C), np.int32), np.zeros((n, C), bool)
    last, final, offset = np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, np.int32)
    for i, tok in enumerate(seqs):
        part = tok[c * C : (c + 1) * C]
        tokens[at[i], : len(part)], valid[at[i], : len(part)] = part, True
        last[at[i]] = max(len(part) - 1, 0)
        final[at[i]] = -(-len(tok) // C) - 1 == c
        offset[at[i]] = starts[i]
    positions = np.where(valid, offset[:, None] + c * C + np.arange(C)[None], 0).astype(np.int32)
    rows = PrefillChunk(table=jnp.asarray(table), tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
                        valid=jnp.asarray(valid), last_index=jnp.asarray(last))
    return rows, final
