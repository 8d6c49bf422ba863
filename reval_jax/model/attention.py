"""Causal grouped-query attention with segment ids as data, one function over several kernels.

    out[b, t, n] = Σ_s softmax_s(q[b, t, n] · k[b, s, n // G] / √H  where allowed(b, t, s)) v[b, s, n // G]

    allowed(b, t, s) = kv_seg[b, s] == q_seg[b, t]  and  kv_seg[b, s] != 0  and  s <= q_offset + t

Query t sits at slot q_offset + t of the key sequence (0 for training; the cache index for prefill
into a KV cache). Segment id 0 is padding; a packed row holds segments 1, 2, 3, ... and no query ever
attends across them. A query with no allowed key (padding) gets a finite output whose value is
implementation-defined (einsum: the mean of all values; chunked: 0); callers mask it out. The
segment ids, q_offset and the packed rows' segment-length promise travel as one `SegmentMask`.

Implementations (`IMPLEMENTATIONS`, chosen by name, see docs/attention.md):
  einsum   the reference: float32 scores [B, K, G, T, S], NEG_INF where not allowed, softmax.
  chunked  pure-JAX flash attention: query blocks x key blocks with an online softmax and a
           custom_vjp whose backward recomputes each block (FlashAttention-2), never [T, S].
  xla      jax.nn.dot_product_attention(implementation="xla") with the cudnn path's arguments;
           it builds [B, N, T, S] scores and exists to check that plumbing on any backend.
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"): GPU only.
  splash   the Pallas TPU splash-attention kernel (SegmentIds + CausalMask), TPU only.
  auto     splash on TPU, cudnn on GPU (16-bit inputs; float32 takes chunked), chunked elsewhere,
           from jax.default_backend() at trace time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from reval_jax.model.config import ATTENTION as IMPLEMENTATIONS

Array = jax.Array
NEG_INF = -1e30  # finite: a fully masked row (a padding query) gives a uniform, not NaN, softmax
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}


def resolve(implementation: str, dtype=None, platform: str | None = None) -> str:
    """The concrete implementation that `implementation` names on `platform` (the mesh's devices;
    default: the default backend, which a deviceless TPU compile does not change); auto takes cudnn
    only for 16-bit inputs (cuDNN flash attention has no float32 kernel)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    impl = AUTO.get(platform or jax.default_backend(), "chunked")
    if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "chunked"
    return impl


def allowed_mask(q_segment_ids: Array, kv_segment_ids: Array, q_offset: int | Array = 0) -> Array:
    """allowed [B, T, S] bool: same non-zero segment and key slot s <= q_offset + t."""
    T, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    causal = jnp.arange(S)[None, :] <= q_offset + jnp.arange(T)[:, None]  # [T, S]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    return same & (kv_segment_ids[:, None, :] != 0) & causal[None]


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Who may attend to whom, as data (the module docstring's `allowed`): segment ids of the queries
    [B, T] and of the keys [B, S] (int, 0 = padding), the key slot of query 0 (`q_offset`: 0 for
    training, the cache index for prefill into a KV cache), and `max_segment_len` > 0, a promise
    that no segment is longer (packed trajectories: the prompt bucket plus max_new_tokens)."""

    q_segment_ids: Array  # [B, T]
    kv_segment_ids: Array  # [B, S]
    q_offset: int | Array = 0
    max_segment_len: int = 0


def attention(
    q: Array, k: Array, v: Array, mask: SegmentMask, *, implementation: str = "auto", block_q: int = 512,
    block_kv: int = 512, mesh: Mesh | None = None,
) -> Array:
    """q [B, T, N, H], k/v [B, S, K, H] with N = K·G; `mask` the segment ids [B, T] / [B, S] (0 =
    padding), query offset and segment-length promise. Returns [B, T, N, H] in q's dtype. `mesh` is
    only used by splash (a Pallas call is partitioned by shard_map over the batch and head axes of
    sharding.RULES).

    `mask.max_segment_len` > 0: einsum, xla and chunked compute only the key window each query block
    can reach (`banded`), exactly the same attention for a fraction of the work when segments are
    much shorter than the row. cudnn and splash ignore it (splash skips empty blocks by itself)."""
    q_offset, max_segment_len = mask.q_offset, mask.max_segment_len
    impl = resolve(implementation, q.dtype, None if mesh is None else mesh.devices.flat[0].platform)
    q_segment_ids = mask.q_segment_ids.astype(jnp.int32)
    kv_segment_ids = mask.kv_segment_ids.astype(jnp.int32)
    band = banding(q.shape[1], k.shape[1], q_offset, max_segment_len, block_q)
    if band is not None and impl in ("einsum", "xla", "chunked"):
        return _banded(q, k, v, q_segment_ids, kv_segment_ids, *band, scan=impl == "chunked")
    if impl == "einsum":
        return _einsum(q, k, v, allowed_mask(q_segment_ids, kv_segment_ids, q_offset))
    if impl == "chunked":
        return _chunked(
            q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q=block_q, block_kv=block_kv
        )
    if impl in ("xla", "cudnn"):
        return _dot_product(q, k, v, q_segment_ids, kv_segment_ids, q_offset, impl)
    if not isinstance(q_offset, int):
        # splash's causal mask is static: a traced offset (prefill at the cache index) goes chunked
        return _chunked(
            q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q=block_q, block_kv=block_kv
        )
    return _splash(q, k, v, q_segment_ids, kv_segment_ids, q_offset, mesh=mesh, block=block_q)


def _einsum(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """The reference, with float32 scores [B, K, G, T, S]; allowed [B, T, S] bool."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    dt = q.dtype
    q = q.reshape(B, T, K, G, H)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores * H**-0.5, NEG_INF)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, K * G, H)  # [B, T, N, H]


# ----------------------------------------------------------------------------- banded (packed rows)


def banding(T: int, S: int, q_offset, max_segment_len: int, block: int) -> tuple[int, int] | None:
    """(block b, reach P) of the banded path, or None where it saves nothing. A query at slot t
    attends only to keys of its own segment at slots t - max_segment_len < s <= t, so query block
    [i b, (i + 1) b) needs key slots [i b - P, (i + 1) b) with P = max_segment_len - 1 rounded up to
    whole blocks: a window of W = P + b keys instead of S. Needs training-shaped calls (q_offset 0,
    T == S); b is at most `block` and about max_segment_len / 2 (smaller b: fewer keys per query,
    more window copies)."""
    if not max_segment_len or not isinstance(q_offset, int) or q_offset != 0 or T != S:
        return None
    b = max(8, min(block, T, -(-max_segment_len // 2)))
    P = -(-(max_segment_len - 1) // b) * b
    return (b, P) if P + b < T else None


def banded_work(T: int, max_segment_len: int, block: int) -> tuple[int, int]:
    """(query-key pairs the banded path computes, pairs a dense [T, T] path computes) for one row."""
    band = banding(T, T, 0, max_segment_len, block)
    if band is None:
        return T * T, T * T
    b, P = band
    return -(-T // b) * b * (P + b), T * T


def _banded(q: Array, k: Array, v: Array, qs: Array, ks: Array, b: int, P: int, *, scan: bool) -> Array:
    """Attention of packed rows, query block i against its key window only (see `banding`):

        window_i = key slots [i b - P, (i + 1) b)  (slots < 0 are padding: segment 0)
        out[t] = softmax over window(t) of q_t · k_s / √H where allowed(t, s), then · v

    Every key outside the window is disallowed for every query of the block, so this is the
    einsum reference's attention without its all-masked part. The windows are gathered with static
    indices; `scan` walks the query blocks one at a time (memory of one block's scores, recomputed
    in the backward pass) instead of all at once."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G, nq, W = N // K, -(-T // b), P + b
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (P, nq * b - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    kp, vp, ksp = pad(k), pad(v), pad(ks)  # [B, P + nq·b, ...]: slot s sits at s + P
    window = np.arange(nq)[:, None] * b + np.arange(W)[None, :]  # [nq, W] padded key index
    qb = _blocks(q.reshape(B, T, K, G, H), b)  # [nq, B, b, K, G, H]
    qsb = _blocks(qs, b)  # [nq, B, b]
    q_slot = np.arange(nq * b).reshape(nq, b)  # [nq, b]

    def one_block(q_i, qs_i, qslot_i, idx):  # q_i [B, b, K, G, H]; idx [W] padded key indices
        k_w, v_w, ks_w = kp[:, idx], vp[:, idx], ksp[:, idx]  # [B, W, K, H], [B, W]
        causal = (idx - P)[None, :] <= qslot_i[:, None]  # [b, W]
        allowed = (qs_i[:, :, None] == ks_w[:, None, :]) & (ks_w[:, None, :] != 0) & causal[None]  # [B, b, W]
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_w, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None, None], scores * H**-0.5, NEG_INF)  # [B, K, G, b, W]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_w)  # [B, b, K, G, H]
        return jnp.where(allowed.any(-1)[:, :, None, None, None], out, 0).astype(q.dtype)

    if scan:
        step = jax.checkpoint(lambda _, xs: (None, one_block(*xs)))
        _, out_b = jax.lax.scan(step, None, (qb, qsb, jnp.asarray(q_slot), jnp.asarray(window)))
    else:
        out_b = jax.vmap(one_block, in_axes=(0, 0, 0, 0))(qb, qsb, jnp.asarray(q_slot), jnp.asarray(window))
    return _unblock(out_b, T).reshape(B, T, N, H)  # out_b [nq, B, b, K, G, H]


# ----------------------------------------------------------------------------- jax.nn (xla / cudnn)


def _dot_product(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array,
    q_offset: int | Array, implementation: str,
) -> Array:
    """jax.nn.dot_product_attention with the segment rule as a boolean `mask` [B, 1, T, S].

    The public API takes no segment ids, and cuDNN's packed (THD) layout (q_offsets / seq lengths
    in jax._src.cudnn) is private and unverifiable here, so the segment rule travels as a mask
    (cuDNN turns it into an additive bias [B, 1, T, S] in q's dtype: T·S per row, not N·T·S
    float32 scores per row). Causality is `is_causal` (which lets cuDNN skip the upper triangle)
    whenever queries start at slot 0 of an equal-length key sequence, else part of the mask."""
    T, S = q.shape[1], k.shape[1]
    static_causal = isinstance(q_offset, int) and q_offset == 0 and T == S
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    mask = same & (kv_segment_ids[:, None, :] != 0)
    if not static_causal:
        mask = mask & (jnp.arange(S)[None, :] <= q_offset + jnp.arange(T)[:, None])[None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], is_causal=static_causal, implementation=implementation,
    )  # [B, T, N, H]


# ----------------------------------------------------------------------------- chunked (flash)


def _blocks(x: Array, size: int, fill=0) -> Array:
    """Pads axis 1 of x [B, L, ...] to a multiple of `size` and moves the blocks to the front:
    [L / size, B, size, ...]."""
    B, L = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, -L % size)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(B, -1, size, *x.shape[2:])  # [B, L/size, size, ...]
    return jnp.moveaxis(x, 1, 0)  # [L/size, B, size, ...]


def _unblock(x: Array, length: int) -> Array:
    """Inverse of _blocks: [L/size, B, size, ...] -> [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)  # [B, L/size, size, ...]
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]  # [B, L, ...]


def _scan(f, init, xs):
    """lax.scan, or one direct call when there is a single block (cheaper to compile)."""
    if jax.tree.leaves(xs)[0].shape[0] > 1:
        return jax.lax.scan(f, init, xs)
    carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda x: x[None], y)


def _block_mask(qs: Array, ks: Array, q_slot: Array, k_slot: Array) -> Array:
    """allowed [B, 1, 1, bq, bk] of one query block (qs [B, bq], q_slot [bq]) x key block."""
    causal = k_slot[None, :] <= q_slot[:, None]  # [bq, bk]
    same = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)  # [B, bq, bk]
    return (same & causal)[:, None, None]  # [B, 1, 1, bq, bk]


def _chunked(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array,
    q_offset: int | Array = 0, *, block_q: int = 512, block_kv: int = 512,
) -> Array:
    """Flash attention in blocks of block_q queries x block_kv keys (each at most the length), with
    an online softmax: per query, running max m, sum l and accumulator a over key blocks j:

        m' = max(m, max_s s_j),   p_j = exp(s_j - m') (0 where not allowed),
        l' = e^(m - m') l + Σ_s p_j,   a' = e^(m - m') a + p_j v_j,   out = a / l  (0 if l = 0).

    Every block is computed, masked: skipping blocks with no allowed pair through lax.cond made XLA
    keep every block's [bq, bk] scores of the whole loop alive (13.6 GB instead of 5.2 GB per device
    for one 9,216-token row of the 1.5B; see docs/attention.md). A sequence within one block
    (T <= block_q, S <= block_kv) is that one block: plain softmax
    attention, which compiles much faster for the tiny models of the tests."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if T <= block_q and S <= block_kv:
        allowed = allowed_mask(q_segment_ids, kv_segment_ids, q_offset)  # [B, T, S]
        out = _einsum(q, k, v, allowed)  # [B, T, N, H]
        return jnp.where(allowed.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
    bq, bk = min(block_q, T), min(block_kv, S)
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    q_slot = q_offset + jnp.arange(-(-T // bq) * bq, dtype=jnp.int32)
    out = _flash(bq, bk, q, k, v, q_segment_ids, kv_segment_ids, q_slot)  # [B, T, K, G, H]
    return out.reshape(B, T, N, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bq, bk, q, k, v, qs, ks, q_slot):
    return _flash_fwd(bq, bk, q, k, v, qs, ks, q_slot)[0]


def _flash_fwd(bq, bk, q, k, v, qs, ks, q_slot):
    """Forward: the output [B, T, K, G, H] and the residuals, with logsumexp L [nq, B, K, G, bq]."""
    T, H = q.shape[1], q.shape[-1]
    dt = q.dtype
    qb, qsb = _blocks(q, bq), _blocks(qs, bq)  # [nq, B, bq, K, G, H], [nq, B, bq]
    kb, vb, ksb = _blocks(k, bk), _blocks(v, bk), _blocks(ks, bk)  # [nk, B, bk, K, H], [nk, B, bk]
    qslot_b = q_slot.reshape(-1, bq)  # [nq, bq]
    kslot_b = jnp.arange(kb.shape[0] * bk, dtype=jnp.int32).reshape(-1, bk)  # [nk, bk]
    B, K, G = q.shape[0], q.shape[2], q.shape[3]

    def one_q_block(xs):
        q_i, qs_i, qslot_i = xs

        def step(carry, ys):
            k_j, v_j, ks_j, kslot_j = ys
            allowed = _block_mask(qs_i, ks_j, qslot_i, kslot_j)  # [B, 1, 1, bq, bk]

            def update(carry):
                m, l, acc = carry
                s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32)
                s = jnp.where(allowed, s * H**-0.5, NEG_INF)  # [B, K, G, bq, bk]
                m_new = jnp.maximum(m, s.max(-1))  # [B, K, G, bq]
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, bq, bk]
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(dt), v_j, preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return update(carry), None

        init = (
            jnp.full((B, K, G, bq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        (m, l, acc), _ = _scan(step, init, (kb, vb, ksb, kslot_b))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, bq, H]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)  # [B, K, G, bq]
        return jnp.einsum("BKGTH->BTKGH", out).astype(dt), lse

    # out_b [nq, B, bq, K, G, H], lse [nq, B, K, G, bq]
    _, (out_b, lse) = _scan(lambda _, xs: (None, one_q_block(xs)), None, (qb, qsb, qslot_b))
    out = _unblock(out_b, T)  # [B, T, K, G, H]
    return out, (q, k, v, qs, ks, q_slot, out, lse)


def _flash_bwd(bq, bk, res, d_out):
    """FlashAttention-2 backward, recomputing p block by block from the saved logsumexp:

        p = exp(s - L),  dv = Σ pᵀ dO,  dp = dO vᵀ,  ds = p (dp - Δ),  Δ = rowsum(dO ∘ O),
        dq = Σ ds k / √H,  dk = Σ dsᵀ q / √H.

    The outer scan runs over key blocks (carrying dq), the inner over query blocks (carrying dk, dv)."""
    q, k, v, qs, ks, q_slot, out, lse = res
    T, S, H = q.shape[1], k.shape[1], q.shape[-1]
    dt = q.dtype
    scale = H**-0.5
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    qb, qsb, dob = _blocks(q, bq), _blocks(qs, bq), _blocks(d_out.astype(dt), bq)  # [nq, B, bq, ...]
    deltab = jnp.einsum("nBTKG->nBKGT", _blocks(jnp.einsum("BKGT->BTKG", delta), bq))  # [nq, B, K, G, bq]
    kb, vb, ksb = _blocks(k, bk), _blocks(v, bk), _blocks(ks, bk)  # [nk, B, bk, K, H], [nk, B, bk]
    qslot_b = q_slot.reshape(-1, bq)  # [nq, bq]
    kslot_b = jnp.arange(kb.shape[0] * bk, dtype=jnp.int32).reshape(-1, bk)  # [nk, bk]

    def one_k_block(dq, xs):
        k_j, v_j, ks_j, kslot_j = xs

        def step(carry, ys):
            q_i, qs_i, qslot_i, do_i, lse_i, delta_i = ys
            allowed = _block_mask(qs_i, ks_j, qslot_i, kslot_j)  # [B, 1, 1, bq, bk]

            def grads(carry):
                dk, dv = carry
                s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32)
                p = jnp.where(allowed, jnp.exp(s * scale - lse_i[..., None]), 0.0)  # [B, K, G, bq, bk]
                dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(dt), do_i, preferred_element_type=jnp.float32)
                dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(dt)  # [B, K, G, bq, bk]
                dq_i = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_j, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_i, preferred_element_type=jnp.float32)
                return (dk, dv), dq_i

            return grads(carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)  # [B, bk, K, H]
        (dk, dv), dq_j = _scan(step, (zeros, zeros), (qb, qsb, qslot_b, dob, lse, deltab))
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = _scan(one_k_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, ksb, kslot_b))
    dq = _unblock(dq, T).astype(q.dtype)  # [B, T, K, G, H]
    dk, dv = _unblock(dk, S).astype(k.dtype), _unblock(dv, S).astype(v.dtype)  # [B, S, K, H]
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _heads_spec(mesh: Mesh, q: Array, k: Array) -> tuple[PartitionSpec, PartitionSpec]:
    """shard_map specs of q [B, T, N, H] and k/v [B, S, K, H] from sharding.RULES: heads are split
    only where the kv heads are split the same way, so each shard keeps whole groups."""
    from reval_jax.parallel.sharding import logical_to_spec

    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
    k_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
    if q_spec[2] != k_spec[2]:
        q_spec = PartitionSpec(q_spec[0], None, k_spec[2], None)
        if k_spec[2] is not None and q.shape[2] % np.prod([mesh.shape[a] for a in np.atleast_1d(k_spec[2])]):
            q_spec, k_spec = PartitionSpec(q_spec[0], None, None, None), PartitionSpec(k_spec[0], None, None, None)
    return q_spec, k_spec


# ----------------------------------------------------------------------------- splash (TPU)


def _splash(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, q_offset: int = 0,
    *, mesh: Mesh | None = None, block: int = 512,
) -> Array:
    """The Pallas TPU splash kernel: one MQA kernel per kv head over its G query heads, vmapped
    over K and B. The mask is CausalMask(offset) and SegmentIds; splash knows no padding id, so
    segment 0 is one more segment: a padding query attends to padding keys (finite, never to real
    tokens) and real queries never see padding. T and S must be multiples of the block (128+)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K

    def local(q, k, v, qs, ks):  # one shard: q [b, T, n, H], k/v [b, S, k, H]
        b, _, n, _ = q.shape
        kh = k.shape[2]
        bq, bk = min(block, T), min(block, S)
        sizes = splash.BlockSizes(
            block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
        )
        mask = splash.MultiHeadMask([splash.CausalMask((T, S), offset=q_offset)] * G)
        kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes)
        qg = jnp.einsum("BTKGH->BKGTH", (q * H**-0.5).reshape(b, T, kh, G, H))  # [b, k, G, T, H]
        kg, vg = jnp.einsum("BSKH->BKSH", k), jnp.einsum("BSKH->BKSH", v)  # [b, k, S, H]
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
        per_row = jax.vmap(lambda q, k, v, qs, ks: per_head(q, k, v, splash.SegmentIds(qs, ks)))
        out = per_row(qg, kg, vg, qs, ks)  # [b, k, G, T, H]
        return jnp.einsum("BKGTH->BTKGH", out).reshape(b, T, n, H)

    if mesh is None:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    q_spec, k_spec = _heads_spec(mesh, q, k)
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)
