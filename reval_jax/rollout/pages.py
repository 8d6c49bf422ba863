"""A paged KV cache and the attention that reads it: fixed-size pages, one page table per row.

    pool k, v [L, G, K, S, H]   G pages of S token slots each, per layer and kv head; page 0 is the
                                trash page
    table     [B, W] int32      table[b, w] = the page that holds positions w·S .. w·S + S−1 of row b
                                (0 where the row has no page there yet)
    position p of row b lives at (table[b, p // S], p % S)

A page is [K, S, H]: one kv head's S keys are contiguous, so attention reads a page straight into
a dot over H without a transpose. Rows of one prompt share the pages its prompt fills (`engine`): a
page is only ever written at positions a row owns, and a prompt's full pages are written once, by
its prefill.

Both attentions are `attend` hooks of `model.run_layers`: they write this call's keys/values
[B, T, K, H] at their positions (padding queries write to the trash page), then attend each query to
the keys at positions <= its own, online softmax in float32:

    out[b, t] = Σ_{s <= pos[b, t]} softmax_s(q[b, t] · k[b, s] / √H) v[b, s]

- `paged_attend` (prefill: T tokens per row, rows of similar length) reads every row's table
  `block_pages` pages at a time, for as many blocks as the longest row of the call has filled.
- `ragged_attend` (decode: one token per row, rows of any length) reads only the pages each row has
  filled: the (row, page) pairs of the step are listed once (`decode_items`) and read `chunk`
  pages at a time, whatever row they belong to, so the work is Σ_b ⌈(pos_b + 1) / S⌉ pages rounded
  up to a chunk, not B × the longest row.

Both are gather-based XLA, for every backend.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
TRASH = 0  # the page that padding writes go to; never read at a position <= a real query's
NEG_INF = -1e30


@flax.struct.dataclass
class Pool:
    k: Array  # [L, G, K, S, H]
    v: Array  # [L, G, K, S, H]

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


def copy_pages(pool: Pool, src: Array, dst: Array) -> Pool:
    """pool pages dst[i] <- src[i] in every layer (a sample's copy of its prompt's last, partial
    page). src, dst [n] int32; pairs with dst = TRASH are no-ops in effect."""
    return Pool(k=pool.k.at[:, dst].set(pool.k[:, src]), v=pool.v.at[:, dst].set(pool.v[:, src]))


def _write(k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, table: Array, positions: Array,
           valid: Array):
    """k/v [B, T, K, H] into the pool at (layer, table[b, pos // S], :, pos % S); invalid tokens go
    to the trash page."""
    S = k_pages.shape[3]
    page = jnp.take_along_axis(table, positions // S, axis=1)  # [B, T]
    page = jnp.where(valid, page, TRASH)
    slot = jnp.where(valid, positions % S, 0)
    k_pages = k_pages.at[layer, page, :, slot].set(k.astype(k_pages.dtype))  # indexed [B, T, K, H]
    v_pages = v_pages.at[layer, page, :, slot].set(v.astype(v_pages.dtype))
    return k_pages, v_pages


def paged_attend(
    q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, *,
    table: Array, positions: Array, valid: Array, block_pages: int,
):
    """q [B, T, N, H], k/v [B, T, K, H] at `positions` [B, T] (valid [B, T] marks real tokens);
    k_pages/v_pages the stacked pool [L, G, K, S, H]. Returns (out [B, T, N, H], k_pages, v_pages)."""
    B, T, N, H = q.shape
    K, S = k.shape[2], k_pages.shape[3]
    G_ = N // K  # query heads per kv head
    k_pages, v_pages = _write(k, v, k_pages, v_pages, layer, table, positions, valid)

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


@flax.struct.dataclass
class Items:
    """The (row, page) pairs one decode step reads, row by row, packed at the front; past `count`,
    padding pairs (row 0, the trash page) that a chunk may cover and masks. On a mesh whose `data`
    axis splits the rows, each replica's pairs are its own rows' (local row numbers), one list per
    replica laid end to end: [R·(B/R·W + C)], count [R]."""

    row: Array  # [B·W + C] int32
    col: Array  # [B·W + C] int32  the pair's column in the row's table (its positions col·S ..)
    page: Array  # [B·W + C] int32
    count: Array  # [1] int32


def _row_spec(mesh, rows: int):
    """The mesh axes that split B rows (`act_batch`), or None."""
    from reval_jax.sharding import logical_to_spec

    return logical_to_spec(("act_batch",), (rows,), mesh)[0]


def decode_items(table: Array, pos: Array, live: Array, page_size: int, chunk: int, mesh=None) -> Items:
    """Every page a live row has filled up to and including its position pos [B] (the token written
    this step): row b reads columns 0 .. pos_b // S of table [B, W]. With a mesh, per replica."""

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
    P = jax.sharding.PartitionSpec
    rows = _row_spec(mesh, table.shape[0])
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows), P(rows), P(rows)), out_specs=P(rows),
                         check_vma=False)(table, pos, live)


def ragged_attend(
    q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, *,
    table: Array, positions: Array, valid: Array, items: Items, chunk: int, mesh=None,
):
    """One query per row: q [B, 1, N, H], k/v [B, 1, K, H] at `positions` [B, 1] (valid [B, 1]);
    the pool [L, G, K, S, H]; `items` = decode_items(table, positions[:, 0], valid[:, 0], S, chunk,
    mesh). Reads the items `chunk` pages at a time (a dynamic number of chunks, ⌈count / chunk⌉);
    each chunk's scores are folded into its rows' running max m, sum l and output o:

        m'_b = max(m_b, max_{pairs of b in chunk} s),   l'_b = l_b e^{m_b − m'_b} + Σ e^{s − m'_b},
        o'_b = o_b e^{m_b − m'_b} + Σ e^{s − m'_b} v,    out_b = o_b / l_b  (0 for a row with no pair)

    With a mesh the read runs per device (shard_map): a data replica reads its own rows' pages from
    its copy of the pool, a tensor shard its own heads; no collective. Returns (out [B, 1, N, H],
    k_pages, v_pages)."""
    B, T, N, H = q.shape
    S = k_pages.shape[3]
    if T != 1:
        raise ValueError(f"ragged_attend decodes one token per row, got {T}")
    k_pages, v_pages = _write(k, v, k_pages, v_pages, layer, table, positions, valid)

    def local(q, k_pages, v_pages, q_pos, row, col, page, count):  # q [b, n, H], q_pos [b]; pool [L, G, k, S, H]
        b, n, _ = q.shape
        kh = k_pages.shape[2]
        qg = q.reshape(b, kh, n // kh, H).astype(jnp.float32) / jnp.sqrt(jnp.float32(H))

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
        return (o / jnp.maximum(l, 1e-30)[..., None]).reshape(b, n, H).astype(q.dtype)  # [b, n, H]

    q_pos = jnp.where(valid[:, 0], positions[:, 0], -1)  # [B]
    args = (q[:, 0], k_pages, v_pages, q_pos, items.row, items.col, items.page, items.count)
    if mesh is None:
        return local(*args)[:, None], k_pages, v_pages
    from reval_jax.attention import _heads_spec
    from reval_jax.sharding import CACHE_POOL_AXES, logical_to_spec

    P = jax.sharding.PartitionSpec
    q_spec, k_spec = _heads_spec(mesh, q, k)
    rows = P(q_spec[0])
    pool = logical_to_spec(CACHE_POOL_AXES, k_pages.shape, mesh)
    pool = P(None, None, k_spec[2], None, None) if pool[2] != k_spec[2] else pool  # heads split as in q
    heads = P(q_spec[0], q_spec[2], None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(heads, pool, pool, rows, rows, rows, rows, rows),
                        out_specs=heads, check_vma=False)(*args)
    return out[:, None], k_pages, v_pages
