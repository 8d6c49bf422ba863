"""The rollout engine: continuous batching over a fixed number of decode slots on a paged KV cache.

    requests (prompt, its N samples, max_new_tokens) --queue--> admit: prefill the prompt ONCE into
    pages (chunks of C tokens), sample a_1 for each of its N samples, give every sample a slot whose
    page table shares the prompt's full pages (the last, partial page is copied per sample)
      --> compiled decode loop over all B slots (lax.while_loop, pages allocated on device from a
          free-page stack as rows cross page boundaries) until a quarter of the slots (`refill`) have
          finished and requests wait, or every slot has finished, or the free pages run out
      --> host: collect finished slots, free their pages (a page is free when no slot's table holds
          it), preempt the newest rows if pages ran out (they resume later by re-prefilling their
          prompt and tokens so far), admit waiting requests into the free slots --> loop

Dimension alphabet: B slots, W page-table width, G pages per replica, S tokens per page, C prefill
chunk, A = max_new_tokens (response columns), V vocabulary, R data replicas.

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

Randomness is the static sampler's: the noise of (seed, prompt id, sample n) at response step h
comes from fold_in(fold_in(fold_in(key(seed), prompt id), n), h), so the tokens depend on neither
the batch composition, the slot a sample gets, its pages nor preemption — only on the model's
logits. Log-probs are log q under the distribution each token was drawn from (sampler.sample_logits).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import deque
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reval_jax.parallel.distributed import to_host
from reval_jax.rollout.pages import (
    TRASH,
    Pool,
    copy_pages,
    decode_items,
    engine_replicas,
    init_pool,
    paged_attend,
    pool_spec,
    ragged_attend,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and sizes its cache; hashable (a static argument)."""

    slots: int = 64  # B: rows decoded together
    page_size: int = 16  # S: tokens per KV page
    cache_tokens: int = 0  # ≈ R·G·S: KV cache tokens, all replicas (0: slots × (prompt bucket + max_new_tokens))
    prefill_chunk: int = 512  # C: prompt tokens per prefill call and row (longer prompts take several)
    prefill_rows: int = 16  # prompts prefilled per call at most
    block_pages: int = 8  # pages of each row read per attention block in prefill
    decode_chunk: int = 0  # (row, page) pairs read per attention block in decode, whatever their rows (0: auto)
    refill: float = 0.25  # leave the decode loop when this fraction of slots is free and requests wait

    def __post_init__(self):
        for name in ("slots", "page_size", "prefill_chunk", "prefill_rows", "block_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)} must be >= 1")
        if self.decode_chunk < 0:
            raise ValueError(f"EngineConfig.decode_chunk={self.decode_chunk} must be >= 0 (0: auto)")
        if self.cache_tokens < 0 or not 0 < self.refill <= 1:
            raise ValueError(f"cache_tokens={self.cache_tokens} must be >= 0, refill={self.refill} in (0, 1]")


def decode_chunk(engine: EngineConfig, platform: str, pairs: int, most: int) -> int:
    """The decode attention's chunk, (row, page) pairs per block: `engine.decode_chunk` when set;
    by default 32 on CPU (a block is cheap to start there and a padded pair costs its reads), and on
    an accelerator the power of two >= `pairs` (the pairs a replica reads now), at least 256 and at
    most `most` (a replica's rows × the table width): one block per layer and step, where every
    block is a loop iteration with kernel launches of its own, for a few compiled sizes. The
    accelerator rule is reasoned, not measured: no accelerator has run it."""
    if engine.decode_chunk:
        return engine.decode_chunk
    if platform == "cpu":
        return 32
    return min(max(256, 1 << max(0, pairs - 1).bit_length()), max(256, most))


def replica_pages(engine: EngineConfig, W: int, replicas: int) -> tuple[int, int]:
    """(pages of all replicas, pages of one) for tables W pages wide: `cache_tokens` / S, by default
    every slot's longest sequence (the static sampler's cache), shared equally by the replicas
    (each also has a trash page of its own, not counted here)."""
    pages = -(-engine.cache_tokens // engine.page_size) if engine.cache_tokens else engine.slots * W
    return pages, -(-pages // replicas)


def engine_config(config) -> EngineConfig | None:
    """The run config's `rollout.*` engine fields; None (generate's default: one slot per sample of a
    call) when `rollout.slots` is 0."""
    r = config.rollout
    if not r.get("slots", 0):
        return None
    return EngineConfig(slots=r.slots, page_size=r.page_size, cache_tokens=r.cache_tokens,
                        prefill_chunk=r.prefill_chunk, prefill_rows=max(1, min(r.slots, 64)),
                        decode_chunk=r.get("decode_chunk", 0))


@flax.struct.dataclass
class Slots:
    """The decode loop's carry besides the pool: one row per slot, and the free-page stack."""

    table: Array  # [B, W] int32  pages of each slot, its replica's local ids (TRASH where none)
    pos: Array  # [B] int32  position of the token fed next (= tokens in the cache)
    last: Array  # [B] int32  the token fed next (the last one sampled)
    h: Array  # [B] int32  response tokens sampled so far
    limit: Array  # [B] int32  the request's max_new_tokens
    live: Array  # [B] bool  decoding; a finished slot keeps its results until collected
    keys: Array  # [B] PRNG keys of (seed, prompt id, sample)
    tokens: Array  # [B, A] int32  response tokens (pad after)
    logp: Array  # [B, A] f32
    free: Array  # [R·G] int32  replica r's free pages are free[r·G : r·G + n_free[r]] (local ids)
    n_free: Array  # [R] int32


@dataclasses.dataclass
class Request:
    """One prompt's N samples (new), or one preempted sample (resume: its tokens so far)."""

    index: int  # the prompt's row in the call (0..P-1)
    prompt: np.ndarray  # [p] int32
    limits: tuple[int, ...]  # max_new_tokens of each sample
    samples: tuple[int, ...]  # sample indices n
    tokens: np.ndarray | None = None  # resume: response tokens so far [h]
    logp: np.ndarray | None = None
    versions: np.ndarray | None = None  # resume: the policy version of each of those tokens [h]


def _base_keys(seed, prompt_ids: Array, samples: Array) -> Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda p, n: jax.random.fold_in(jax.random.fold_in(base, p), n))(prompt_ids, samples)


# ----------------------------------------------------------------------------- compiled programs


@functools.partial(jax.jit, static_argnames=("graphdef", "block_pages", "replicas"), donate_argnames=("pool",))
def _prefill(graphdef, params, pool: Pool, table, tokens, positions, valid, last_index, *, block_pages: int,
             replicas: int = 1):
    """tokens/positions/valid [n, C] of n prompt rows with page tables [n, W] into the pool (the rows
    are `replicas` blocks, one per replica); returns (pool, float32 logits [n, V] at each row's
    `last_index`)."""
    model = nnx.merge(graphdef, params)
    attend = functools.partial(paged_attend, table=table, positions=positions, valid=valid, block_pages=block_pages,
                               mesh=model.mesh, replicas=replicas)
    h, (k, v) = model.run_layers(model.embed_tokens(tokens), positions, attend, (pool.k, pool.v))
    last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)[:, 0]  # [n, D]
    return Pool(k=k, v=v), model.unembed(last)


@functools.partial(jax.jit, static_argnames=("config",))
def _first_tokens(logits, seed, prompt_ids, samples, *, config):
    """a_1 of each sample from its prompt's prefill logits [n, V] (step 0 of its keys)."""
    from reval_jax.rollout.sampler import sample_logits

    keys = _base_keys(seed, prompt_ids, samples)
    step = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
    return sample_logits(logits, step, config)


_copy = jax.jit(copy_pages, donate_argnums=(0,), static_argnames=("mesh",))


@functools.partial(jax.jit, donate_argnames=("slots",))
def _write(slots: Slots, index, rows: dict, free, n_free) -> Slots:
    """Overwrites slots at `index` [n] (index B = padding, dropped) with `rows` and sets the free
    stack: the host's only way to change the loop's state."""
    put = lambda a, r: a.at[index].set(r, mode="drop")
    return slots.replace(**{k: put(getattr(slots, k), r) for k, r in rows.items()}, free=free, n_free=n_free)


def _pages_needed(s: Slots, S: int) -> Array:
    """[R, B/R] bool: a live slot about to write the first position of a page it has no page for,
    by replica."""
    col = jnp.minimum(s.pos // S, s.table.shape[1] - 1)
    at = jnp.take_along_axis(s.table, col[:, None], axis=1)[:, 0]
    return (s.live & (s.pos % S == 0) & (at == TRASH)).reshape(s.n_free.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "chunk"), donate_argnames=("pool", "slots"))
def _decode(graphdef, params, pool: Pool, slots: Slots, refill_at, max_steps, *, config, chunk: int):
    """Decode steps of every live slot until `refill_at` of them have finished, none is live, a
    step would need more pages than are free, or `max_steps` steps have run."""
    from reval_jax.rollout.sampler import sample_logits

    model = nnx.merge(graphdef, params)
    B, A = slots.tokens.shape
    S, R = pool.page_size, slots.n_free.shape[0]
    G = slots.free.shape[0] // R
    rows = jnp.arange(B)
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)

    idle = jnp.sum(~slots.live)  # slots not live on entry

    def cond(c):
        i, _, s = c
        finished = jnp.sum(~s.live) - idle
        # every live row finishes within A steps (no row is admitted inside the loop): i < A bounds it
        fits = jnp.all(jnp.sum(_pages_needed(s, S), 1) <= s.n_free)  # in every replica
        return (i < A) & (i < max_steps) & jnp.any(s.live) & (finished < refill_at) & fits

    def body(c):
        i, pool, s = c
        need = _pages_needed(s, S)  # [R, B/R]: each replica pops its own free stack
        rank = jnp.cumsum(need, 1) - 1
        new = jnp.take_along_axis(s.free.reshape(R, G), jnp.clip(s.n_free[:, None] - 1 - rank, 0, G - 1), 1)
        need, new = need.reshape(B), new.reshape(B)
        col = jnp.minimum(s.pos // S, s.table.shape[1] - 1)
        table = s.table.at[rows, col].set(jnp.where(need, new, s.table[rows, col]))
        on_mesh = dict(mesh=model.mesh, replicas=R)
        items = decode_items(table, s.pos, s.live, S, chunk, **on_mesh)  # the pages each row reads
        attend = functools.partial(ragged_attend, table=table, positions=s.pos[:, None], valid=s.live[:, None],
                                   items=items, chunk=chunk, **on_mesh)
        h, (k, v) = model.run_layers(model.embed_tokens(s.last[:, None]), s.pos[:, None], attend, (pool.k, pool.v))
        logits = model.unembed(h[:, 0])  # [B, V]
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.h)
        token, logp = sample_logits(logits, keys, config)
        on = s.live
        col_h = jnp.minimum(s.h, A - 1)
        tokens = s.tokens.at[rows, col_h].set(jnp.where(on, token, s.tokens[rows, col_h]))
        logps = s.logp.at[rows, col_h].set(jnp.where(on, logp, s.logp[rows, col_h]))
        h_new = s.h + on
        stopped = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        s = s.replace(table=table, n_free=s.n_free - jnp.sum(need.reshape(R, -1), 1), pos=s.pos + on,
                      last=jnp.where(on, token, s.last), h=h_new, tokens=tokens, logp=logps,
                      live=on & ~stopped & (h_new < s.limit))
        return i + 1, Pool(k=k, v=v), s

    _, pool, slots = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), pool, slots))
    return pool, slots


# ----------------------------------------------------------------------------- the host loop


class Engine:
    """Continuous batching for one model and sampling config.

        engine = Engine(model, sampling, EngineConfig(slots=256, page_size=16))
        out = engine.run(prompts, seed=step, prompt_ids=ids, max_new_tokens=None)
        # out: per prompt, per sample, (tokens [h] int32, logp [h] f32, stopped bool)
    """

    def __init__(self, model, sampling, engine: EngineConfig, *, prompt_bucket: int, version: int = 0):
        self.graphdef, self.params = nnx.split(model)
        self.version = version  # the policy version of `params` (asynchronous training's weight pushes)
        self.cfg, self.sampling, self.engine = model.cfg, sampling, engine
        S, A = engine.page_size, sampling.max_new_tokens
        self.A = A
        self.W = -(-(prompt_bucket + A) // S)  # table width: the longest sequence's pages
        mesh = model.mesh
        self.R = engine_replicas(mesh, engine.slots, sampling.num_samples)  # splitting slots and pages (1: none)
        self.rows = engine.slots // self.R  # slots per replica
        self.replica_slots = [range(r * self.rows, (r + 1) * self.rows) for r in range(self.R)]
        self.mesh = mesh
        pages, per_replica = replica_pages(engine, self.W, self.R)
        if per_replica < self.W:
            raise ValueError(
                f"EngineConfig.cache_tokens={engine.cache_tokens} ({pages} pages of {S}"
                + (f", {per_replica} per data replica of {self.R}" if self.R > 1 else "")
                + f") cannot hold one sequence of prompt bucket {prompt_bucket} + max_new_tokens {A} ({self.W} "
                "pages): raise cache_tokens")
        self.G = 1 + per_replica  # pages per replica, its trash page included
        self.platform = (jax.devices() if mesh is None else mesh.devices.ravel())[0].platform
        self.stop = set(sampling.stop_ids)
        # calls, preemptions, and host wall seconds: in the decode loop up to the host's read of its
        # result, and in admissions (prefill to the first tokens' read, then dispatching the slot
        # writes, whose device time falls into the next decode_s: no sync is added to time them)
        self.stats = {"decode_calls": 0, "prefill_calls": 0, "preempted": 0, "decode_s": 0.0, "admit_s": 0.0}

    def _chunk(self, pos: np.ndarray, live: np.ndarray, steps: int) -> tuple[int, int]:
        """(decode_chunk, steps) for a decode call on the rows as they enter it: the chunk from the
        most (row, page) pairs any data replica reads (its rows are a contiguous B / R of the slots);
        where the chunk adapts (accelerators), at most the steps after which those pairs could
        outgrow it (each live row adds a page every S steps), so that the next call picks a larger
        one rather than every layer reading two blocks."""
        S = self.engine.page_size
        pairs = np.where(live, pos // S + 1, 0).reshape(self.R, -1).sum(1)
        chunk = decode_chunk(self.engine, self.platform, int(pairs.max()), self.rows * self.W)
        if self.engine.decode_chunk or self.platform == "cpu" or chunk >= self.rows * self.W:
            return chunk, steps
        rows = max(1, int(live.reshape(self.R, -1).sum(1).max()))
        return chunk, min(steps, S * max(1, (chunk - int(pairs.max())) // rows))

    def initial_state(self) -> tuple[Pool, Slots]:
        """An empty pool ([L, R·G, K, S, H]: pages split over the data replicas, kv heads over the
        mesh's `tensor` axis, like the model's) and empty slots: the decode loop's inputs."""
        from jax.sharding import NamedSharding

        pool = init_pool(self.cfg, self.R * self.G, self.engine.page_size)
        mesh = self.mesh
        if mesh is not None:
            sh = NamedSharding(mesh, pool_spec(mesh, self.R, self.cfg.num_kv_heads))
            pool = Pool(k=jax.device_put(pool.k, sh), v=jax.device_put(pool.v, sh))
        B = self.engine.slots
        slots = Slots(**{k: jnp.asarray(v) for k, v in self._empty_rows(B).items()},
                      keys=_base_keys(np.uint32(0), jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32)),
                      free=jnp.zeros(self.R * self.G, jnp.int32), n_free=jnp.zeros(self.R, jnp.int32))
        return pool, slots

    # --- host-side bookkeeping

    def _free_pages(self, table: np.ndarray, held: np.ndarray) -> list[np.ndarray]:
        """Per replica, the local pages no slot of it that is live or holds results references
        (TRASH excluded)."""
        free = []
        for rows in self.replica_slots:
            used = np.zeros(self.G, bool)
            used[table[rows][held[rows]].ravel()] = True
            used[TRASH] = True
            free.append(np.flatnonzero(~used).astype(np.int32))
        return free

    def _free_stack(self, free: list[np.ndarray]):
        stack = np.zeros((self.R, self.G), np.int32)
        for r, f in enumerate(free):
            stack[r, : len(f)] = f
        return jnp.asarray(stack.reshape(-1)), jnp.asarray([len(f) for f in free], jnp.int32)

    def _empty_rows(self, n: int) -> dict:
        A, W = self.A, self.W
        return {
            "table": np.zeros((n, W), np.int32), "pos": np.zeros(n, np.int32), "last": np.zeros(n, np.int32),
            "h": np.zeros(n, np.int32), "limit": np.ones(n, np.int32), "live": np.zeros(n, bool),
            "tokens": np.full((n, A), self.sampling.pad_id, np.int32), "logp": np.zeros((n, A), np.float32),
        }

    def _write_rows(self, slots, index: list[int], rows: dict, keys, free):
        """Pads the writes to B (index B is dropped) so that `_write` compiles once."""
        B = self.engine.slots
        n = len(index)
        idx = np.full(B, B, np.int32)
        idx[:n] = index
        full = self._empty_rows(B)
        for k, r in rows.items():
            full[k][:n] = r
        full = {k: jnp.asarray(v) for k, v in full.items()}
        pad = _base_keys(np.uint32(0), jnp.zeros(B - n, jnp.int32), jnp.zeros(B - n, jnp.int32))
        full["keys"] = jnp.concatenate([keys, pad])  # a new buffer: `slots` is donated
        return _write(slots, jnp.asarray(idx), full, *self._free_stack(free))

    def _prefill_rows(self, pool, rows: list[tuple[np.ndarray, np.ndarray, int]]):
        """Prefills rows of (tokens [t], table row [W], replica) in chunks of C; returns (pool,
        logits [n, V] at each row's last token, in the order of `rows`). A call's rows are R
        blocks of n' rows, replica r's rows in block r."""
        bp, R = self.engine.block_pages, self.R
        per = [[i for i, row in enumerate(rows) if row[2] == r] for r in range(R)]
        n_pad = 1 << max(0, (max(map(len, per)) - 1).bit_length())  # a power of two: few compiled shapes
        at = np.zeros(len(rows), np.int64)  # each row's place among the R·n' rows of the call
        for r, members in enumerate(per):
            at[members] = r * n_pad + np.arange(len(members))
        longest = max(len(tok) for tok, _, _ in rows)
        # chunks of prefill_chunk tokens, or of the longest row rounded up to a power of two (>= 16)
        # when that is shorter: short prompts are not padded to a long chunk
        C = min(self.engine.prefill_chunk, 1 << max(4, (longest - 1).bit_length()))
        table = np.zeros((R * n_pad, self.W), np.int32)
        for i, (_, t, _) in enumerate(rows):
            table[at[i]] = t
        chunks = max(-(-len(tok) // C) for tok, _, _ in rows)
        logits = None
        for c in range(chunks):
            tokens = np.zeros((R * n_pad, C), np.int32)
            valid = np.zeros((R * n_pad, C), bool)
            last = np.zeros(R * n_pad, np.int32)
            final = np.zeros(R * n_pad, bool)
            for i, (tok, _, _) in enumerate(rows):
                part = tok[c * C : (c + 1) * C]
                tokens[at[i], : len(part)], valid[at[i], : len(part)] = part, True
                last[at[i]] = max(len(part) - 1, 0)
                final[at[i]] = -(-len(tok) // C) - 1 == c
            positions = np.where(valid, c * C + np.arange(C)[None], 0).astype(np.int32)
            self.stats["prefill_calls"] += 1
            pool, out = _prefill(self.graphdef, self.params, pool, jnp.asarray(table), jnp.asarray(tokens),
                                 jnp.asarray(positions), jnp.asarray(valid), jnp.asarray(last), block_pages=bp,
                                 replicas=R)
            logits = out if logits is None else jnp.where(jnp.asarray(final)[:, None], out, logits)
        return pool, logits[jnp.asarray(at)]

    # --- the loop

    def run(self, prompts: Sequence[Sequence[int]], *, seed: int, prompt_ids: Sequence[int],
            limits, weights=None, max_steps: int = 0, in_flight: str = "continue"):
        """Every sample of every prompt to its stop token or its limit (`limits`: max_new_tokens per
        prompt [P] or per sample [P, N]). Returns, per prompt, a list of N (tokens [h] int32,
        logp [h] f32, versions [h] int32: the policy version each token was sampled under) in
        sample order.

        weights: None, or `poll() -> (version, model) | None`, called before every decode call;
          a model it returns (the same architecture and layout) replaces the current one there.
        max_steps: decode steps per call at most (0: up to max_new_tokens).
        in_flight: "continue" (rows in flight go on under new weights, keeping their cache) or
          "finish" (nothing is admitted until they have finished under the old weights)."""
        if in_flight not in ("continue", "finish"):
            raise ValueError(f"in_flight={in_flight!r}: use 'continue' or 'finish'")
        B, S, N = self.engine.slots, self.engine.page_size, self.sampling.num_samples
        ids = np.asarray(prompt_ids, np.int32)
        limits = np.broadcast_to(np.asarray(limits, np.int32).reshape(len(prompts), -1), (len(prompts), N))
        pending = deque(Request(i, np.asarray(p, np.int32), tuple(int(x) for x in limits[i]), tuple(range(N)))
                        for i, p in enumerate(prompts))
        results: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        owner: list[tuple[int, int] | None] = [None] * B  # (prompt row, sample) of each slot
        admitted: list[int] = [0] * B  # admission order, for preemption (newest first)
        clock = 0
        pool, slots = self.initial_state()
        table, live, held = np.zeros((B, self.W), np.int32), np.zeros(B, bool), np.zeros(B, bool)
        h = np.zeros(B, np.int32)  # response tokens of each slot, as of the last read
        pos = np.zeros(B, np.int32)  # the position each slot writes next, likewise
        spans: list[list[tuple[int, int]]] = [[] for _ in range(B)]  # (first response index, version)
        staged = None  # new weights waiting for the rows in flight to finish (in_flight="finish")
        free = self._free_pages(table, held)
        slots = self._write_rows(slots, [], {}, slots.keys[:0], free)
        steps = max_steps or self.A

        while True:
            # --- new weights, between decode calls
            new = weights() if weights is not None else None
            if new is not None:
                staged = new
            if staged is not None and (in_flight == "continue" or not held.any()):
                self._set_weights(*staged)
                staged = None
                for b in np.flatnonzero(live):
                    spans[b].append((int(h[b]), self.version))
            # --- admit waiting requests into free slots while their pages fit (not while rows
            # finish under old weights)
            # a request goes whole into the replica with the most pages to spare
            batch, batch_rows, batch_pages, batch_slots = [], [], [], []
            open_slots = [[b for b in rr if not held[b]] for rr in self.replica_slots]
            free_lists = [list(f) for f in free]
            # a page left for every running row's next page boundary: the next decode step runs
            headroom = [int(live[rr].sum()) for rr in self.replica_slots]
            while pending and staged is None and len(batch) < self.engine.prefill_rows:
                req = pending[0]
                resume = req.tokens is not None
                seq = np.concatenate([req.prompt, req.tokens[:-1]]) if resume else req.prompt
                full, partial = divmod(len(seq), S)
                copies = (len(req.samples) - 1) if partial and not resume else 0
                need = full + (partial > 0) + copies
                # a resumed row also keeps a page for its own next step: preempted for want of one,
                # it would otherwise be admitted and preempted again without a step (a livelock)
                own = len(req.samples) if resume else 0
                fits = [r for r in range(self.R) if len(open_slots[r]) >= len(req.samples)
                        and len(free_lists[r]) - need >= headroom[r] + own]
                if not fits:
                    break
                r = max(fits, key=lambda r: len(free_lists[r]) - headroom[r])
                pending.popleft()
                pages, free_lists[r] = free_lists[r][:need], free_lists[r][need:]
                row = np.zeros(self.W, np.int32)
                row[: full + (partial > 0)] = pages[: full + (partial > 0)]
                batch.append(req)
                batch_rows.append((seq, row, r))
                batch_pages.append(pages[full + (partial > 0):])  # the partial page's copies
                batch_slots.append(open_slots[r][: len(req.samples)])
                open_slots[r] = open_slots[r][len(req.samples):]
                headroom[r] += len(req.samples)
            if batch:
                t0 = time.perf_counter()
                slots, pool, table, live, held, clock = self._admit(
                    batch, batch_rows, batch_pages, batch_slots, slots, pool, table, live, held, owner, admitted,
                    clock, seed, ids, [np.asarray(f, np.int32) for f in free_lists], h, pos, spans)
                self.stats["admit_s"] += time.perf_counter() - t0
            if not held.any():
                if not pending:
                    break
                raise ValueError(
                    f"the KV cache ({self.G - 1} pages of {S} tokens"
                    + (f" in each of {self.R} data replicas" if self.R > 1 else "")
                    + f") cannot hold one request of {len(pending[0].prompt)} prompt tokens and "
                    f"{len(pending[0].samples)} samples: raise EngineConfig.cache_tokens")
            refill_at = max(1, int(self.engine.refill * B), max((len(r.samples) for r in pending), default=0)) \
                if pending else B + 1
            self.stats["decode_calls"] += 1
            t0 = time.perf_counter()
            chunk, call_steps = self._chunk(pos, live, steps)
            pool, slots = _decode(self.graphdef, self.params, pool, slots, jnp.asarray(refill_at, jnp.int32),
                                  jnp.asarray(call_steps, jnp.int32), config=self.sampling, chunk=chunk)
            # every process gets the whole state (to_host gathers arrays that span several hosts),
            # so every process's scheduler takes the same decisions
            host = (slots.table, slots.live, slots.h, slots.tokens, slots.logp, slots.pos)
            table, now_live, h, tokens, logp, pos = (np.array(to_host(x)) for x in host)
            self.stats["decode_s"] += time.perf_counter() - t0
            # --- collect finished slots
            done = [b for b in range(B) if held[b] and not now_live[b]]
            for b in done:
                results[owner[b]] = (tokens[b, : h[b]].copy(), logp[b, : h[b]].copy(), _expand(spans[b], h[b]))
                owner[b], held[b] = None, False
            live = now_live.copy()
            # --- a replica out of pages: preempt its newest rows until its next step fits
            need = live & (pos % S == 0) & (table[np.arange(B), np.minimum(pos // S, self.W - 1)] == TRASH)
            free = self._free_pages(table, held)
            victims = []
            for r, rr in enumerate(self.replica_slots):
                while need[rr].sum() > len(free[r]) and live[rr].sum() > 1:
                    b = max((b for b in rr if live[b]), key=lambda b: admitted[b])
                    p_row, n = owner[b]
                    pending.appendleft(Request(p_row, np.asarray(prompts[p_row], np.int32), (int(limits[p_row, n]),),
                                               (n,), tokens=tokens[b, : h[b]].copy(), logp=logp[b, : h[b]].copy(),
                                               versions=_expand(spans[b], h[b])))
                    owner[b], held[b], live[b], need[b] = None, False, False, False
                    table[b] = TRASH
                    victims.append(b)
                    self.stats["preempted"] += 1
                    free = self._free_pages(table, held)
                if need[rr].sum() > len(free[r]):
                    raise ValueError(
                        f"the KV cache ({self.G - 1} pages of {S} tokens"
                        + (f" in each of {self.R} data replicas" if self.R > 1 else "")
                        + f") cannot hold one sequence of {int(pos[live].max())} tokens: raise "
                        "EngineConfig.cache_tokens")
            cleared = done + victims
            slots = self._write_rows(slots, cleared, self._empty_rows(len(cleared)),
                                     slots.keys[:0] if not cleared else slots.keys[jnp.asarray(cleared)], free)
        return [[results[(i, n)] for n in range(N)] for i in range(len(prompts))]

    def _admit(self, batch, batch_rows, batch_pages, batch_slots, slots, pool, table, live, held, owner, admitted,
               clock, seed, ids, free, h, pos, spans):
        """Prefills the batch's prompts once, copies partial pages, samples a_1 and fills slots
        (their response lengths `h`, positions `pos` and version spans `spans` too, in place)."""
        S = self.engine.page_size
        pool, logits = self._prefill_rows(pool, batch_rows)
        new = [i for i, r in enumerate(batch) if r.tokens is None]
        first = {}
        if new:
            rep = np.asarray([i for i in new for _ in batch[i].samples])
            pid = np.asarray([ids[batch[i].index] for i in new for _ in batch[i].samples], np.int32)
            smp = np.asarray([n for i in new for n in batch[i].samples], np.int32)
            m = len(rep)
            pad = (1 << max(0, (m - 1).bit_length())) - m  # a power of two: few compiled shapes
            rep, pid, smp = (np.pad(x, (0, pad), mode="edge") for x in (rep, pid, smp))
            tok, lp = map(to_host, _first_tokens(logits[jnp.asarray(rep)], np.uint32(seed), jnp.asarray(pid),
                                                   jnp.asarray(smp), config=self.sampling))
            rep, smp = rep[:m], smp[:m]
            for j, (i, n) in enumerate(zip(rep, smp, strict=True)):
                first[(int(i), int(n))] = (int(tok[j]), float(lp[j]))
        src, dst = [[] for _ in range(self.R)], [[] for _ in range(self.R)]  # page copies, per replica
        index, rows = [], self._empty_rows(sum(len(r.samples) for r in batch))
        key_pid, key_smp = [], []
        r = 0
        for i, req in enumerate(batch):
            seq, prompt_row, replica = batch_rows[i]
            full, partial = divmod(len(seq), S)
            copies = iter(batch_pages[i])
            for j, n in enumerate(req.samples):
                b = batch_slots[i][j]
                row = prompt_row.copy()
                if partial and req.tokens is None and j > 0:  # own copy of the prompt's partial page
                    row[full] = next(copies)
                    src[replica].append(prompt_row[full])
                    dst[replica].append(row[full])
                if req.tokens is None:
                    a1, lp1 = first[(i, n)]
                    toks, lps = np.asarray([a1]), np.asarray([lp1], np.float32)
                else:
                    toks, lps = req.tokens, req.logp
                hh = len(toks)
                rows["table"][r] = row
                rows["pos"][r] = len(seq)
                rows["last"][r] = toks[-1]
                rows["h"][r] = hh
                rows["limit"][r] = req.limits[j]
                rows["live"][r] = not (int(toks[-1]) in self.stop or hh >= req.limits[j])
                rows["tokens"][r, :hh], rows["logp"][r, :hh] = toks, lps
                index.append(b)
                key_pid.append(ids[req.index])
                key_smp.append(n)
                owner[b], held[b], admitted[b] = (req.index, n), True, clock
                table[b], live[b] = row, rows["live"][r]
                h[b], pos[b] = hh, len(seq)
                spans[b] = _spans(req.versions) if req.tokens is not None else []
                if not spans[b] or spans[b][-1][1] != self.version:
                    spans[b].append((hh if req.tokens is not None else 0, self.version))
                clock += 1
                r += 1
        most = max(map(len, src))
        if most:  # [R, n]: padded to a power of two with trash-to-trash copies, few compiled shapes
            n = 1 << (most - 1).bit_length()
            pad = lambda x: np.asarray([p + [TRASH] * (n - len(p)) for p in x], np.int32)
            pool = _copy(pool, jnp.asarray(pad(src)), jnp.asarray(pad(dst)), mesh=self.mesh)
        keys = _base_keys(np.uint32(seed), jnp.asarray(key_pid, jnp.int32), jnp.asarray(key_smp, jnp.int32))
        slots = self._write_rows(slots, index, rows, keys, free)
        return slots, pool, table, live, held, clock

    def _set_weights(self, version: int, model) -> None:
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("new weights for the engine must have the model's architecture, dtype and layout")
        self.version, self.params = int(version), params


def _expand(spans: list[tuple[int, int]], n: int) -> np.ndarray:
    """[n] int32: the version of each response token, from (first index, version) spans."""
    out = np.zeros(n, np.int32)
    for start, version in spans:
        out[start:] = version
    return out


def _spans(versions: np.ndarray) -> list[tuple[int, int]]:
    """The (first index, version) spans of a per-token version array."""
    return [(int(i), int(versions[i])) for i in range(len(versions)) if i == 0 or versions[i] != versions[i - 1]]
