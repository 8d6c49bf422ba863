"""A paged KV cache and the attention that reads it: fixed-size pages, one page table per row.

    pool k, v [L, G, S, K, H]   G pages of S token slots each, every layer; page 0 is the trash page
    table     [B, W] int32      table[b, w] = the page that holds positions w·S .. w·S + S−1 of row b
                                (0 where the row has no page there yet)
    position p of row b lives at (table[b, p // S], p % S)

Rows of one prompt share the pages its prompt fills (`engine`): a page is only ever written at
positions a row owns, and a prompt's full pages are written once, by its prefill.

`paged_attend` is the `attend` hook of `model.run_layers`: it writes this call's keys/values
[B, T, K, H] at their positions (padding queries write to the trash page) and attends each query to
the keys at positions <= its own, reading the table `block_pages` pages at a time, online softmax,
for only as many blocks as the longest row of the call has filled:

    out[b, t] = Σ_{s <= pos[b, t]} softmax_s(q[b, t] · k[b, s] / √H) v[b, s]

It is the gather-based implementation for CPU and GPU; scores and the softmax are float32.
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
    k: Array  # [L, G, S, K, H]
    v: Array  # [L, G, S, K, H]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


def init_pool(cfg, num_pages: int, page_size: int, dtype=None) -> Pool:
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return Pool(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def copy_pages(pool: Pool, src: Array, dst: Array) -> Pool:
    """pool pages dst[i] <- src[i] in every layer (a sample's copy of its prompt's last, partial
    page). src, dst [n] int32; pairs with dst = TRASH are no-ops in effect."""
    return Pool(k=pool.k.at[:, dst].set(pool.k[:, src]), v=pool.v.at[:, dst].set(pool.v[:, src]))


def paged_attend(
    q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, layer: Array, *,
    table: Array, positions: Array, valid: Array, block_pages: int,
):
    """q [B, T, N, H], k/v [B, T, K, H] at `positions` [B, T] (valid [B, T] marks real tokens);
    k_pages/v_pages the stacked pool [L, G, S, K, H]. Returns (out [B, T, N, H], k_pages, v_pages)."""
    B, T, N, H = q.shape
    K, S = k.shape[2], k_pages.shape[2]
    G_ = N // K  # query heads per kv head
    page = jnp.take_along_axis(table, positions // S, axis=1)  # [B, T]
    page = jnp.where(valid, page, TRASH)
    slot = jnp.where(valid, positions % S, 0)
    k_pages = k_pages.at[layer, page, slot].set(k.astype(k_pages.dtype))
    v_pages = v_pages.at[layer, page, slot].set(v.astype(v_pages.dtype))

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
        kb = k_pages[layer, ids].reshape(B, span, K, H)  # [B, bp·S, K, H]
        vb = v_pages[layer, ids].reshape(B, span, K, H)
        key_pos = i * span + jnp.arange(span)  # [bp·S]
        allowed = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, bp·S]
        # slots past a row's last query may hold anything (a recycled page): never let them reach p·v
        vb = jnp.where(jnp.any(allowed, 1)[:, :, None, None], vb, 0)
        s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kb, preferred_element_type=jnp.float32) / jnp.sqrt(
            jnp.float32(H))
        s = jnp.where(allowed[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, -1))
        p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        l = l * scale + jnp.sum(p, -1)
        acc = acc * scale[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p, vb.astype(jnp.float32))
        return m_new, l, acc

    init = (jnp.full((B, K, G_, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G_, T), jnp.float32),
            jnp.zeros((B, K, G_, T, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, K, G, T, H]; 0 for padding queries
    out = jnp.einsum("BKGTH->BTKGH", out).reshape(B, T, N, H).astype(q.dtype)
    return out, k_pages, v_pages
