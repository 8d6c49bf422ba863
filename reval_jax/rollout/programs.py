"""The engine's compiled programs: pure functions of (params, state), each jitted once per shape.

    prefill        chunks of prompt rows into the pool's pages; logits at each row's last token
    first_tokens   a_1 of each new sample from its prompt's logits (step 0 of its keys)
    copy           pages copied within a replica (a sample's own copy of its prompt's partial page)
    write          the host's rows into the slots, and the free-page stacks: the host's only write
    decode         the decode loop (lax.while_loop): one token per live slot and step, pages popped
                   from the free stacks as rows cross page boundaries, until `refill_at` slots have
                   finished, none is live, a step would need more pages than are free, or
                   `max_steps` steps have run

The host loop that calls them is engine.py; the scale checker compiles the same programs on
abstract arrays through the public builders at the end (`abstract_state`, `prefill_call`,
`decode_call`), so that it measures what the engine runs. Dimension alphabet: page_table.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from reval_jax.rollout.page_table import CacheGeometry, EngineConfig, pages_needed, pow2_at_least
from reval_jax.rollout.pages import (
    DecodeRead,
    Pool,
    PrefillRead,
    copy_pages,
    decode_items,
    init_pool,
    paged_attend,
    pool_shape,
    pool_spec,
    ragged_attend,
    replica_axes,
)
from reval_jax.rollout.sampling import SamplingConfig, sample_keys, sample_logits, sample_logits_on_mesh, step_keys
from reval_jax.rollout.stops import StopTable, advance

Array = jax.Array


@flax.struct.dataclass
class Slots:
    """The decode loop's carry besides the pool: one row per slot, and the free-page stacks."""

    table: Array  # [B, W] int32  pages of each slot, its replica's local ids (TRASH where none)
    pos: Array  # [B] int32  position of the token fed next (= tokens in the cache)
    last: Array  # [B] int32  the token fed next (the last one sampled)
    length: Array  # [B] int32  response tokens sampled so far (h of the next draw's key)
    limit: Array  # [B] int32  the request's max_new_tokens
    live: Array  # [B] bool  decoding; a finished slot keeps its results until collected
    keys: Array  # [B] PRNG keys of (seed, prompt id, sample)
    tokens: Array  # [B, A] int32  response tokens (pad after)
    logp: Array  # [B, A] f32
    free: Array  # [R·G] int32  replica r's free pages are free[r·G : r·G + n_free[r]] (local ids)
    n_free: Array  # [R] int32
    # [B, Q] int32: each row's state in the automaton of each of Q stop strings (stops.py), or None
    # when turns end at stop ids only (single-turn rollouts: the programs have no such state)
    match: Array | None = None


ROW_FIELDS = ("table", "pos", "last", "length", "limit", "live", "tokens", "logp")  # what `write` sets per row


@dataclasses.dataclass
class SlotRows:
    """The host's rows for the slots at `index` (numpy): Slots' ROW_FIELDS, and the (prompt id,
    sample) of their keys."""

    index: list[int]
    table: np.ndarray  # [n, W] int32
    pos: np.ndarray  # [n] int32
    last: np.ndarray  # [n] int32  the token fed next
    length: np.ndarray  # [n] int32
    limit: np.ndarray  # [n] int32
    live: np.ndarray  # [n] bool
    tokens: np.ndarray  # [n, A] int32
    logp: np.ndarray  # [n, A] f32
    prompt_id: np.ndarray  # [n] int32
    sample: np.ndarray  # [n] int32
    match: np.ndarray | None = None  # [n, Q] int32  stop strings' automaton states (None: no stop strings)

    @classmethod
    def empty(cls, index, geometry: CacheGeometry, pad_id: int, stop_strings: int = 0) -> SlotRows:
        """Idle rows (not live, no pages) at `index`."""
        n, W, A = len(index), geometry.width, geometry.max_new_tokens
        return cls(index=list(index), table=np.zeros((n, W), np.int32), pos=np.zeros(n, np.int32),
                   last=np.zeros(n, np.int32), length=np.zeros(n, np.int32), limit=np.ones(n, np.int32),
                   live=np.zeros(n, bool), tokens=np.full((n, A), pad_id, np.int32),
                   logp=np.zeros((n, A), np.float32), prompt_id=np.zeros(n, np.int32), sample=np.zeros(n, np.int32),
                   match=np.zeros((n, stop_strings), np.int32) if stop_strings else None)

    def padded(self, slots: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(index [B], ROW_FIELDS [B, ...]): padded to all B slots with index B (dropped by
        `write`), so that `write` compiles once."""
        n = len(self.index)
        index = np.full(slots, slots, np.int32)
        index[:n] = self.index
        rows = {}
        for k in ROW_FIELDS + (("match",) if self.match is not None else ()):
            x = getattr(self, k)
            rows[k] = np.concatenate([x, np.zeros((slots - n,) + x.shape[1:], x.dtype)])
        return index, rows


@flax.struct.dataclass
class PrefillChunk:
    """One prefill call's rows (R blocks, one per replica): C tokens each, and their page tables."""

    table: Array  # [n, W] int32
    tokens: Array  # [n, C] int32
    positions: Array  # [n, C] int32
    valid: Array  # [n, C] bool  real tokens
    last_index: Array  # [n] int32  each row's last real token in this chunk


# ----------------------------------------------------------------------------- the programs


@functools.partial(jax.jit, static_argnames=("graphdef", "block_pages", "replicas"), donate_argnames=("pool",))
def prefill(graphdef, params, pool: Pool, rows: PrefillChunk, *, block_pages: int, replicas: int = 1):
    """The rows' tokens into the pool; returns (pool, float32 logits [n, V] at each row's `last_index`)."""
    model = nnx.merge(graphdef, params)
    attend = functools.partial(paged_attend, read=PrefillRead(
        table=rows.table, positions=rows.positions, valid=rows.valid, block_pages=block_pages, mesh=model.mesh,
        replicas=replicas))
    hidden, (k, v) = model.run_layers(model.embed_tokens(rows.tokens), rows.positions, attend,
                                      (pool.k, pool.v))  # [n, C, D]
    last = jnp.take_along_axis(hidden, rows.last_index[:, None, None], axis=1)[:, 0]  # [n, D]
    return Pool(k=k, v=v), model.unembed(last)


@functools.partial(jax.jit, static_argnames=("config",))
def first_tokens(logits, seed, prompt_ids, samples, *, config: SamplingConfig):
    """a_1 of each sample from its prompt's prefill logits [n, V] (step 0 of its keys)."""
    return sample_logits(logits, step_keys(sample_keys(seed, prompt_ids, samples), 0), config)


copy = jax.jit(copy_pages, donate_argnums=(0,), static_argnames=("mesh",))


@functools.partial(jax.jit, donate_argnames=("slots",))
def write(slots: Slots, index, rows: dict, free, n_free) -> Slots:
    """Overwrites slots at `index` [n] (index B = padding, dropped) with `rows` (ROW_FIELDS, keys,
    and `match` with stop strings) and sets the free stacks: the host's only way to change the
    loop's state."""
    put = lambda a, r: a.at[index].set(r, mode="drop")
    return slots.replace(**{k: put(getattr(slots, k), r) for k, r in rows.items()}, free=free, n_free=n_free)


def _allocate_pages(s: Slots, page_size: int) -> Slots:
    """Gives every slot that needs one (page_table.pages_needed) a page popped from its replica's
    free stack."""
    B, R = s.live.shape[0], s.n_free.shape[0]
    G = s.free.shape[0] // R
    need = pages_needed(s.table, s.pos, s.live, page_size).reshape(R, -1)  # [R, B/R]
    rank = jnp.cumsum(need, 1) - 1
    new = jnp.take_along_axis(s.free.reshape(R, G), jnp.clip(s.n_free[:, None] - 1 - rank, 0, G - 1), 1)
    n_free = s.n_free - jnp.sum(need, 1)
    need, new = need.reshape(B), new.reshape(B)
    rows, col = jnp.arange(B), jnp.minimum(s.pos // page_size, s.table.shape[1] - 1)
    table = s.table.at[rows, col].set(jnp.where(need, new, s.table[rows, col]))
    return s.replace(table=table, n_free=n_free)


def _step(model, pool: Pool, s: Slots, config: SamplingConfig, chunk: int,
          stops: StopTable | None = None) -> tuple[Pool, Slots]:
    """One decode step of every live slot (their pages allocated): feed `last`, draw the next token."""
    B, A = s.tokens.shape
    on_mesh = dict(mesh=model.mesh, replicas=s.n_free.shape[0])
    items = decode_items(s.table, s.pos, s.live, pool.page_size, chunk, **on_mesh)  # the pages each row reads
    attend = functools.partial(ragged_attend, read=DecodeRead(
        table=s.table, positions=s.pos[:, None], valid=s.live[:, None], items=items, chunk=chunk, **on_mesh))
    hidden, (k, v) = model.run_layers(model.embed_tokens(s.last[:, None]), s.pos[:, None], attend,
                                      (pool.k, pool.v))  # [B, 1, D]
    logits = model.unembed(hidden[:, 0])  # [B, V]
    # each data replica draws its own rows (top-k / top-p gather no replica's logits)
    token, logp = sample_logits_on_mesh(logits, step_keys(s.keys, s.length), config, mesh=model.mesh,
                                        rows=replica_axes(model.mesh, on_mesh["replicas"]))
    on, rows = s.live, jnp.arange(B)
    col = jnp.minimum(s.length, A - 1)
    tokens = s.tokens.at[rows, col].set(jnp.where(on, token, s.tokens[rows, col]))
    logps = s.logp.at[rows, col].set(jnp.where(on, logp, s.logp[rows, col]))
    length = s.length + on
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
    stopped = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
    if stops is not None:  # stop strings: one automaton step per row and string
        match, hit = advance(stops, s.match, token)
        s, stopped = s.replace(match=jnp.where(on[:, None], match, s.match)), stopped | hit
    s = s.replace(pos=s.pos + on, last=jnp.where(on, token, s.last), length=length, tokens=tokens, logp=logps,
                  live=on & ~stopped & (length < s.limit))
    return Pool(k=k, v=v), s


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "chunk"), donate_argnames=("pool", "slots"))
def decode(graphdef, params, pool: Pool, slots: Slots, refill_at, max_steps, stops: StopTable | None = None, *,
           config: SamplingConfig, chunk: int):
    """Decode steps of every live slot until `refill_at` of them have finished, none is live, a
    step would need more pages than are free, or `max_steps` steps have run. `stops`: the stop
    strings' automata (stops.py; `slots.match` holds the rows' states), None for stop ids only."""
    model = nnx.merge(graphdef, params)
    A, R, S = slots.tokens.shape[1], slots.n_free.shape[0], pool.page_size
    idle = jnp.sum(~slots.live)  # slots not live on entry

    def cond(c):
        i, _, s = c
        finished = jnp.sum(~s.live) - idle
        # every live row finishes within A steps (no row is admitted inside the loop): i < A bounds it
        need = pages_needed(s.table, s.pos, s.live, S).reshape(R, -1)
        fits = jnp.all(jnp.sum(need, 1) <= s.n_free)  # in every replica
        return (i < A) & (i < max_steps) & jnp.any(s.live) & (finished < refill_at) & fits

    def body(c):
        i, pool, s = c
        s = _allocate_pages(s, S)
        pool, s = _step(model, pool, s, config, chunk, stops)
        return i + 1, pool, s

    _, pool, slots = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), pool, slots))
    return pool, slots


# ----------------------------------------------------------------------------- shapes and state


def prefill_shape(engine: EngineConfig, geometry: CacheGeometry, most_rows: int, longest: int) -> tuple[int, int]:
    """(n, C) of a prefill call whose fullest replica has `most_rows` rows and whose longest row
    `longest` tokens: R blocks of a power of two rows (few compiled shapes); chunks of
    `prefill_chunk` tokens, or of the longest row rounded up to a power of two (>= 16) when that is
    shorter (short prompts are not padded to a long chunk)."""
    return geometry.replicas * pow2_at_least(most_rows), min(engine.prefill_chunk, max(16, pow2_at_least(longest)))


def empty_state(cfg, geometry: CacheGeometry, mesh, pad_id: int, stop_strings: int = 0) -> tuple[Pool, Slots]:
    """An empty pool ([L, R·G, K, S, H] in the model's dtype: pages split over the data replicas, kv
    heads over the mesh's `tensor` axis, like the model's) and empty slots: the decode loop's inputs
    (with the states of `stop_strings` stop strings' automata when there are any)."""
    g = geometry
    pool = init_pool(cfg, g.replicas * g.pages, g.page_size)
    if mesh is not None:
        sh = NamedSharding(mesh, pool_spec(mesh, g.replicas, cfg.num_kv_heads))
        pool = Pool(k=jax.device_put(pool.k, sh), v=jax.device_put(pool.v, sh))
    B = g.slots
    idle = SlotRows.empty(range(B), geometry, pad_id)
    slots = Slots(**{k: jnp.asarray(getattr(idle, k)) for k in ROW_FIELDS},
                  keys=sample_keys(np.uint32(0), jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32)),
                  free=jnp.zeros(g.replicas * g.pages, jnp.int32), n_free=jnp.zeros(g.replicas, jnp.int32),
                  match=jnp.zeros((B, stop_strings), jnp.int32) if stop_strings else None)
    return pool, slots


# ----------------------------------------------------------------------------- abstract calls (the scale checker)


@dataclasses.dataclass(frozen=True)
class ProgramCall:
    """A compiled program and one call's (abstract) arguments: `fn.lower(*args, **kwargs)`."""

    fn: Any
    args: tuple
    kwargs: dict


def abstract_state(cfg, geometry: CacheGeometry, mesh, dtype) -> tuple[Pool, Slots]:
    """`empty_state`'s pool (in `dtype`, the rollout dtype) and slots as ShapeDtypeStructs on `mesh`
    (the slots whole on every device)."""
    g, B, W, A = geometry, geometry.slots, geometry.width, geometry.max_new_tokens
    pages = NamedSharding(mesh, pool_spec(mesh, g.replicas, cfg.num_kv_heads))
    page = jax.ShapeDtypeStruct(pool_shape(cfg, g.replicas * g.pages, g.page_size), jnp.dtype(dtype), sharding=pages)
    whole = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    slots = Slots(table=whole((B, W), jnp.int32), pos=whole((B,), jnp.int32), last=whole((B,), jnp.int32),
                  length=whole((B,), jnp.int32), limit=whole((B,), jnp.int32), live=whole((B,), jnp.bool_),
                  keys=jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B)),
                  tokens=whole((B, A), jnp.int32), logp=whole((B, A), jnp.float32),
                  free=whole((g.replicas * g.pages,), jnp.int32), n_free=whole((g.replicas,), jnp.int32))
    return Pool(k=page, v=page), slots


def prefill_call(graphdef, params, pool: Pool, engine: EngineConfig, geometry: CacheGeometry,
                 shape: tuple[int, int]) -> ProgramCall:
    """`prefill` on abstract rows of `shape` = (n, C) (`prefill_shape`)."""
    (n, C), W = shape, geometry.width
    arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    rows = PrefillChunk(table=arr((n, W), jnp.int32), tokens=arr((n, C), jnp.int32),
                        positions=arr((n, C), jnp.int32), valid=arr((n, C), jnp.bool_), last_index=arr((n,), jnp.int32))
    return ProgramCall(prefill, (graphdef, params, pool, rows),
                       {"block_pages": engine.block_pages, "replicas": geometry.replicas})


def decode_call(graphdef, params, pool: Pool, slots: Slots, config: SamplingConfig, chunk: int) -> ProgramCall:
    """`decode` of the slots, at most A steps (the refill threshold and the step bound are arguments:
    compiled, never run, their values do not matter)."""
    refill_at, max_steps = jnp.zeros((), jnp.int32), jnp.asarray(config.max_new_tokens, jnp.int32)
    return ProgramCall(decode, (graphdef, params, pool, slots, refill_at, max_steps),
                       {"config": config, "chunk": chunk})
