"""A paged KV cache and the attention that reads it: fixed-size pages, one page table per row.

    pool k, v [L, R·G, K, S, H]  per data replica r, G pages of S token slots each, per layer and
                                 kv head: pages r·G .. r·G + G − 1 (local ids 0 .. G − 1; local
                                 page 0 is the replica's trash page)
    table     [B, W] int32       table[b, w] = the local page that holds positions w·S .. w·S + S−1
                                 of row b (0 where the row has no page there yet)
    position p of row b lives at (table[b, p // S], p % S) in its replica's pages

Rows and pages are split alike over the data replicas (R = 1 without a mesh, or when the slots do
not divide over the replicas): slot b belongs to replica b // (B / R), which holds its pages, so a
decode step moves no key or value between replicas and each device keeps only its replica's share
of the cache. A page is [K, S, H]: one kv head's S keys are contiguous, so attention reads a page
straight into a dot over H without a transpose. Rows of one prompt share the pages its prompt fills
(`engine`): a page is only ever written at positions a row owns, and a prompt's full pages are
written once, by its prefill.

Both attentions are `attend` hooks of `model.run_layers` (bound to their rows' tables and positions,
a `PrefillRead` or a `DecodeRead`): they write this call's keys/values
[B, T, K, H] at their positions (padding queries write to the trash page), then attend each query to
the keys at positions <= its own, online softmax in float32:

    out[b, t] = Σ_{s <= pos[b, t]} softmax_s(q[b, t] · k[b, s] / √H) v[b, s]

- `paged_attend` (prefill: T tokens per row, rows of similar length) reads every row's table
  `block_pages` pages at a time, for as many blocks as the longest row of the call has filled.
- `ragged_attend` (decode: one token per row, rows of any length) reads only the pages each row has
  filled: the (row, page) pairs of the step are listed once (`decode_items`) and read `chunk`
  pages at a time, whatever row they belong to, so the work is Σ_b ⌈(pos_b + 1) / S⌉ pages rounded
  up to a chunk, not B × the longest row.

Both are gather-based XLA, for every backend. With a mesh each runs per device (shard_map): a data
replica over its rows and pages, a tensor shard over its kv heads (and their query heads); nothing
is communicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
TRASH = 0  # each replica's local page that padding writes go to; never read at a position <= a real query's
NEG_INF = -1e30


@flax.struct.dataclass
class Pool:
    k: Array  # [L, R·G, K, S, H]
    v: Array  # [L, R·G, K, S, H]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


def pool_shape(cfg, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)


def init_pool(cfg, num_pages: int, page_size: int, dtype=None) -> Pool:
    shape = pool_shape(cfg, num_pages, page_size)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return Pool(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# ----------------------------------------------------------------------------- replicas and specs


def replica_axes(mesh, replicas: int):
    """The mesh axes that split rows and pages into `replicas` (those of `act_batch`), or None."""
    from reval_jax.parallel.sharding import logical_to_spec

    if mesh is None or replicas == 1:
        return None
    axes = logical_to_spec(("act_batch",), (replicas,), mesh)[0]
    if axes is None or replica_count(mesh, replicas) != replicas:
        raise ValueError(f"{replicas} replicas do not match the mesh {dict(mesh.shape)}")
    return axes


def replica_count(mesh, rows: int) -> int:
    """How many data replicas split `rows` rows on `mesh` (1 when they do not divide)."""
    from reval_jax.parallel.sharding import logical_to_spec

    if mesh is None:
        return 1
    axes = logical_to_spec(("act_batch",), (rows,), mesh)[0]
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    count = 1
    for n in names:
        count *= mesh.shape[n]
    return count


def engine_replicas(mesh, slots: int, samples: int) -> int:
    """The data replicas the engine splits its slots and pages into: those of the mesh's rows, unless
    a replica would have fewer slots than a prompt has samples (a request is admitted whole into one
    replica); then 1, every device holding all pages and reading all rows' (correct, not lean)."""
    R = replica_count(mesh, slots)
    return R if slots // R >= samples else 1


def _heads(mesh, heads: int, kv_heads: int):
    """The mesh axes that split the kv heads (and with them, whole groups of query heads)."""
    from reval_jax.parallel.sharding import logical_to_spec

    axes = logical_to_spec(("act_kv_heads",), (kv_heads,), mesh)[0]
    q_axes = logical_to_spec(("act_heads",), (heads,), mesh)[0]
    return axes if axes == q_axes else None


def _per_device(fn, mesh, in_specs, out_specs):
    """fn as it is without a mesh, else under shard_map (each device its own block, no collective)."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def pool_spec(mesh, replicas: int, kv_heads: int) -> P:
    """[L, R·G, K, S, H]: pages split like the rows, kv heads like the model's."""
    return P(None, replica_axes(mesh, replicas), _heads(mesh, kv_heads, kv_heads), None, None)


def copy_pages(pool: Pool, src: Array, dst: Array, *, mesh=None) -> Pool:
    """pool pages dst[r, i] <- src[r, i] of replica r, in every layer (a sample's copy of its
    prompt's last, partial page). src, dst [R, n] int32 local ids; pairs with dst = TRASH are no-ops
    in effect."""

    def local(k, v, src, dst):  # src, dst [1, n]
        return k.at[:, dst[0]].set(k[:, src[0]]), v.at[:, dst[0]].set(v[:, src[0]])

    R, K = src.shape[0], pool.k.shape[2]
    spec, rows = pool_spec(mesh, R, K), P(replica_axes(mesh, R))
    k, v = _per_device(local, mesh, (spec, spec, rows, rows), (spec, spec))(pool.k, pool.v, src, dst)
    return Pool(k=k, v=v)


def _write(k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, rows: RowArrays):
    """k/v [B, T, K, H] into the pool at (layer, table[b, pos // S], :, pos % S) of `rows`; invalid
    tokens go to the trash page. Local: the table's pages are the pool's."""
    S = k_pages.shape[3]
    page = jnp.take_along_axis(rows.table, rows.positions // S, axis=1)  # [B, T]
    page = jnp.where(rows.valid, page, TRASH)
    slot = jnp.where(rows.valid, rows.positions % S, 0)
    k_pages = k_pages.at[layer, page, :, slot].set(k.astype(k_pages.dtype))  # indexed [B, T, K, H]
    v_pages = v_pages.at[layer, page, :, slot].set(v.astype(v_pages.dtype))
    return k_pages, v_pages


@dataclasses.dataclass(frozen=True, kw_only=True)
class PagedRows:
    """The rows of a paged attention call besides q, k, v and the pool: their page tables, the
    positions of this call's tokens and which are real, and where they live (rows split over
    `replicas` data replicas of `mesh`; None: one device)."""

    table: Array  # [B, W] int32  each row's pages (its replica's local ids)
    positions: Array  # [B, T] int32
    valid: Array  # [B, T] bool  real tokens (padding writes to the trash page and attends to nothing)
    mesh: Any = None
    replicas: int = 1

    def arrays(self) -> RowArrays:
        return RowArrays(table=self.table, positions=self.positions, valid=self.valid)


@flax.struct.dataclass
class RowArrays:
    """What a device reads of its rows in a paged attention, one pytree for shard_map (every leaf
    split by rows over the data replicas): the `PagedRows` arrays and, for decode, the step's
    (row, page) pairs."""

    table: Array  # [B, W] int32
    positions: Array  # [B, T] int32
    valid: Array  # [B, T] bool
    items: Items | None = None  # decode: `DecodeRead.items`


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillRead(PagedRows):
    """`paged_attend`'s rows: every row's table read `block_pages` pages at a time."""

    block_pages: int


def _attend_per_device(local, arrays: tuple, rows: PagedRows):
    """Runs local(q, k, v, k_pages, v_pages, layer, row_arrays) -> (out, k_pages, v_pages) per
    device: `arrays` = (q [B, T, N, H], k/v [B, T, K, H], the pool, the layer), and `rows.arrays()`
    split by rows, on the mesh of `rows`."""
    rest = rows.arrays()
    if rows.mesh is None:
        return local(*arrays, rest)
    q, k = arrays[0], arrays[1]
    axes, heads = replica_axes(rows.mesh, rows.replicas), _heads(rows.mesh, q.shape[2], k.shape[2])
    act = P(axes, None, heads, None)  # q [B, T, N, H] and k/v [B, T, K, H]: rows by replica, heads by shard
    pool = P(None, axes, heads, None, None)
    specs = (act, act, act, pool, pool, P(), P(axes))  # P(axes): every leaf of the row arrays
    return _per_device(local, rows.mesh, specs, (act, pool, pool))(*arrays, rest)


# ----------------------------------------------------------------------------- prefill


def paged_attend(q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, read: PrefillRead):
    """q [B, T, N, H], k/v [B, T, K, H] at `read.positions` [B, T] (`read.valid` [B, T] marks real
    tokens); k_pages/v_pages the stacked pool [L, R·G, K, S, H]; the rows are R blocks, one per
    replica. Returns (out [B, T, N, H], k_pages, v_pages)."""
    block_pages = read.block_pages

    def local(q, k, v, k_pages, v_pages, layer, rows: RowArrays):
        B, T, N, H = q.shape
        K, S = k.shape[2], k_pages.shape[3]
        G_ = N // K  # query heads per kv head
        k_pages, v_pages = _write(k, v, k_pages, v_pages, layer, rows)
        table, positions, valid = rows.table, rows.positions, rows.valid
        qg = q.reshape(B, T, K, G_, H)
        q_pos = jnp.where(valid, positions, -1)  # a padding query attends to nothing
        W = table.shape[1]
        pad = -W % block_pages
        table = jnp.pad(table, ((0, 0), (0, pad)))  # [B, W'] (TRASH beyond the end)
        span = block_pages * S  # positions per block
        blocks = (jnp.max(q_pos) + span) // span  # blocks up to the longest row's last query (dynamic)

        def body(i, carry):
            m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]  float32
            ids = jax.lax.dynamic_slice_in_dim(table, i * block_pages, block_pages, axis=1)  # [B, bp]
            # gathered from the stacked pool at (layer, page): a slice of the layer's pages would be
            # a copy of them, every layer of every step
            kb = k_pages[layer, ids]  # [B, bp, K, S, H]
            vb = v_pages[layer, ids]
            key_pos = (i * span + jnp.arange(span)).reshape(block_pages, S)  # [bp, S]
            allowed = key_pos[None, None] <= q_pos[:, :, None, None]  # [B, T, bp, S]
            # slots past a row's last query may hold anything (a recycled page): never let them reach p·v
            vb = jnp.where(jnp.any(allowed, 1)[:, :, None, :, None], vb, 0)
            s = jnp.einsum("BTKGH,BWKSH->BKGTWS", qg, kb, preferred_element_type=jnp.float32) / jnp.sqrt(
                jnp.float32(H))
            s = jnp.where(allowed[:, None, None], s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, (-2, -1)))
            p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[..., None, None]), 0.0)
            scale = jnp.exp(m - m_new)
            l = l * scale + jnp.sum(p, (-2, -1))
            acc = acc * scale[..., None] + jnp.einsum("BKGTWS,BWKSH->BKGTH", p, vb.astype(jnp.float32))
            return m_new, l, acc

        init = (jnp.full((B, K, G_, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G_, T), jnp.float32),
                jnp.zeros((B, K, G_, T, H), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, blocks, body, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, K, G, T, H]; 0 for padding queries
        out = jnp.einsum("BKGTH->BTKGH", out).reshape(B, T, N, H).astype(q.dtype)
        return out, k_pages, v_pages

    return _attend_per_device(local, (q, k, v, k_pages, v_pages, layer), read)


# ----------------------------------------------------------------------------- decode


@flax.struct.dataclass
class Items:
    """The (row, page) pairs one decode step reads, row by row, packed at the front; past `count`,
    padding pairs (row 0, the trash page) that a chunk may cover and masks. With R replicas, each
    replica's pairs are its own rows' (local row numbers), one list per replica laid end to end."""

    row: Array  # [R·(B/R·W + C)] int32
    col: Array  # [R·(B/R·W + C)] int32  the pair's column in the row's table (its positions col·S ..)
    page: Array  # [R·(B/R·W + C)] int32
    count: Array  # [R] int32


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeRead(PagedRows):
    """`ragged_attend`'s rows (one token each): the (row, page) pairs they read (`decode_items` of
    their tables) `chunk` pages at a time."""

    items: Items
    chunk: int

    def arrays(self) -> RowArrays:
        return RowArrays(table=self.table, positions=self.positions, valid=self.valid, items=self.items)


def decode_items(table: Array, pos: Array, live: Array, page_size: int, chunk: int, *, mesh=None,
                 replicas: int = 1) -> Items:
    """Every page a live row has filled up to and including its position pos [B] (the token written
    this step): row b reads columns 0 .. pos_b // S of table [B, W]. Per replica."""

    def local(table, pos, live):
        B, W = table.shape
        n = jnp.where(live, pos // page_size + 1, 0)  # [B] pages read by each row
        start = jnp.cumsum(n) - n  # [B] first item of each row
        cols = jnp.arange(W)[None]  # [1, W]
        dest = jnp.where(cols < n[:, None], start[:, None] + cols, B * W + chunk)  # past the end: dropped
        put = lambda x: jnp.zeros(B * W + chunk, jnp.int32).at[dest.ravel()].set(x.ravel(), mode="drop")
        row = put(jnp.broadcast_to(jnp.arange(B)[:, None], (B, W)))
        col = put(jnp.broadcast_to(cols, (B, W)))
        return Items(row=row, col=col, page=put(table), count=jnp.sum(n, keepdims=True))

    if mesh is None:
        return local(table, pos, live)
    rows = P(replica_axes(mesh, replicas))
    return _per_device(local, mesh, (rows, rows, rows), rows)(table, pos, live)


def ragged_attend(q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, read: DecodeRead):
    """One query per row: q [B, 1, N, H], k/v [B, 1, K, H] at `read.positions` [B, 1] (`read.valid`
    [B, 1]); the pool [L, R·G, K, S, H]; `read.items` = decode_items(table, positions[:, 0],
    valid[:, 0], S, chunk, ...). Reads the items `read.chunk` pages at a time (a dynamic number of
    chunks, ⌈count / chunk⌉); each chunk's scores are folded into its rows' running max m, sum l and
    output o:

        m'_b = max(m_b, max_{pairs of b in chunk} s),   l'_b = l_b e^{m_b − m'_b} + Σ e^{s − m'_b},
        o'_b = o_b e^{m_b − m'_b} + Σ e^{s − m'_b} v,    out_b = o_b / l_b  (0 for a row with no pair)

    Returns (out [B, 1, N, H], k_pages, v_pages)."""
    if q.shape[1] != 1:
        raise ValueError(f"ragged_attend decodes one token per row, got {q.shape[1]}")
    chunk = read.chunk

    def local(q, k, v, k_pages, v_pages, layer, rows: RowArrays):
        k_pages, v_pages = _write(k, v, k_pages, v_pages, layer, rows)
        positions, valid = rows.positions, rows.valid
        row, col, page, count = rows.items.row, rows.items.col, rows.items.page, rows.items.count
        b, _, n, H = q.shape
        kh, S = k_pages.shape[2], k_pages.shape[3]
        qg = q[:, 0].reshape(b, kh, n // kh, H).astype(jnp.float32) / jnp.sqrt(jnp.float32(H))
        q_pos = jnp.where(valid[:, 0], positions[:, 0], -1)  # [b]

        def body(c, carry):
            m, l, o = carry  # [b, k, G], [b, k, G], [b, k, G, H]  float32
            at = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk)
            r, w, pg = at(row), at(col), at(page)  # [C]
            key_pos = w[:, None] * S + jnp.arange(S)  # [C, S]
            real = (c * chunk + jnp.arange(chunk)) < count[0]  # [C]
            allowed = real[:, None] & (key_pos <= q_pos[r][:, None])  # [C, S]
            kb = k_pages[layer, pg]  # [C, k, S, H]
            vb = jnp.where(allowed[:, None, :, None], v_pages[layer, pg], 0)  # a recycled page's tail: never read
            s = jnp.einsum("CKGH,CKSH->CKGS", qg[r], kb, preferred_element_type=jnp.float32)
            s = jnp.where(allowed[:, None, None], s, NEG_INF)
            m_new = jnp.maximum(m, jax.ops.segment_max(jnp.max(s, -1), r, num_segments=b))  # [b, k, G]
            p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[r][..., None]), 0.0)  # [C, k, G, S]
            scale = jnp.exp(m - m_new)
            l = l * scale + jax.ops.segment_sum(jnp.sum(p, -1), r, num_segments=b)
            pv = jnp.einsum("CKGS,CKSH->CKGH", p, vb.astype(jnp.float32))
            o = o * scale[..., None] + jax.ops.segment_sum(pv, r, num_segments=b)
            return m_new, l, o

        shape = qg.shape[:-1]
        init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(qg.shape, jnp.float32))
        _, l, o = jax.lax.fori_loop(0, (count[0] + chunk - 1) // chunk, body, init)
        out = (o / jnp.maximum(l, 1e-30)[..., None]).reshape(b, 1, n, H).astype(q.dtype)
        return out, k_pages, v_pages

    return _attend_per_device(local, (q, k, v, k_pages, v_pages, layer), read)
