"""The page table's sizes and rules, shared by the host scheduler and the compiled decode loop.

    EngineConfig    what the user sets: slots, page size, cache tokens, prefill / decode chunks
    CacheGeometry   what follows for one model, sampling config and prompt bucket: B slots, table
                    width W, R data replicas, G pages per replica (its trash page included), S, A
    pages_needed    THE rule for the next decode step's pages: a live slot about to write the first
                    position of a page it has no page for (the loop checks and pops it on device,
                    the host preempts by it)
    KVCacheTooSmall THE capacity error (a sequence, or a request, that no replica can hold)
    PageAllocator   the host's free lists, one per data replica: local pages no held slot's table
                    references (TRASH never free), taken at admission, recomputed after each call

Dimension alphabet: B slots, W page-table width, G pages per replica, S tokens per page, A =
max_new_tokens, R data replicas (pages.py: replica r holds slots r·B/R .. (r+1)·B/R − 1 and its
own G pages, local ids 0 .. G − 1, local page 0 its trash page).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from reval_jax.rollout.pages import TRASH, engine_replicas


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

    @classmethod
    def one_slot_per_sample(cls, prompts: int, samples: int) -> EngineConfig:
        """`generate`'s default: every sample of a call in a slot of its own, the static sampler's
        cache size, every prompt prefilled in one call."""
        return cls(slots=prompts * samples, prefill_rows=prompts)


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


def pow2_at_least(n: int) -> int:
    """The least power of two >= n (1 for n <= 1): padded sizes, so that few shapes compile."""
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
    """The slot table's and the pool's sizes for one engine, sampling config and prompt bucket."""

    slots: int  # B
    width: int  # W: table width, the pages of the longest sequence (prompt bucket + A)
    replicas: int  # R: data replicas splitting the slots and the pages alike (1: none)
    pages: int  # G: pages per replica, its trash page included
    page_size: int  # S
    max_new_tokens: int  # A: response columns

    @classmethod
    def of(cls, engine: EngineConfig, *, samples: int, max_new_tokens: int, prompt_bucket: int,
           mesh=None) -> CacheGeometry:
        """The geometry `Engine` lays out; raises KVCacheTooSmall when a replica's pages cannot
        hold one sequence of the prompt bucket and max_new_tokens."""
        S = engine.page_size
        W = -(-(prompt_bucket + max_new_tokens) // S)
        R = engine_replicas(mesh, engine.slots, samples)
        per_replica = replica_pages(engine, W, R)[1]
        geometry = cls(slots=engine.slots, width=W, replicas=R, pages=1 + per_replica, page_size=S,
                       max_new_tokens=max_new_tokens)
        if per_replica < W:
            raise KVCacheTooSmall(geometry, f"one sequence of prompt bucket {prompt_bucket} + max_new_tokens "
                                            f"{max_new_tokens} ({W} pages)")
        return geometry

    @property
    def rows(self) -> int:
        """Slots per replica."""
        return self.slots // self.replicas

    def replica_slots(self, r: int) -> range:
        return range(r * self.rows, (r + 1) * self.rows)

    def replica_of(self, slot: int) -> int:
        return slot // self.rows

    @property
    def cached_tokens(self) -> int:
        """Tokens the pool holds, trash pages excluded."""
        return self.replicas * (self.pages - 1) * self.page_size


class KVCacheTooSmall(ValueError):
    """The KV cache cannot hold `what` (a sequence, or a request): the engine cannot go on."""

    def __init__(self, geometry: CacheGeometry, what: str):
        g = geometry
        where = f" in each of {g.replicas} data replicas" if g.replicas > 1 else ""
        super().__init__(f"the KV cache ({g.pages - 1} pages of {g.page_size} tokens{where}) cannot hold {what}: "
                         "raise EngineConfig.cache_tokens")


def pages_needed(table, pos, live, page_size: int):
    """[B] bool: a live slot about to write the first position of a page it has no page for (its
    next decode step needs a fresh page). table [B, W], pos [B], live [B]: numpy on the host, jax
    arrays (or tracers) on device, the same rule."""
    xp = np if isinstance(table, np.ndarray) else jnp
    col = xp.minimum(pos // page_size, table.shape[1] - 1)
    at = xp.take_along_axis(table, col[:, None], axis=1)[:, 0]
    return live & (pos % page_size == 0) & (at == TRASH)


class PageAllocator:
    """The host's free pages, one list per data replica (local ids, ascending; TRASH excluded)."""

    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.free = [np.arange(1, geometry.pages, dtype=np.int32) for _ in range(geometry.replicas)]

    def refresh(self, table: np.ndarray, held: np.ndarray, kept=()) -> None:
        """Free: the pages no slot of the replica that is live or holds results references, nor
        any of the `kept` (replica, table row) pairs (multi-turn rows parked between two turns)."""
        g = self.geometry
        for r in range(g.replicas):
            rows = g.replica_slots(r)
            used = np.zeros(g.pages, bool)
            used[table[rows][held[rows]].ravel()] = True
            for replica, row in kept:
                if replica == r:
                    used[row] = True
            used[TRASH] = True
            self.free[r] = np.flatnonzero(~used).astype(np.int32)

    def count(self, r: int) -> int:
        return len(self.free[r])

    def take(self, r: int, n: int) -> np.ndarray:
        """The first n free pages of replica r, no longer free."""
        pages, self.free[r] = self.free[r][:n], self.free[r][n:]
        return pages

    def stack(self) -> tuple[np.ndarray, np.ndarray]:
        """The decode loop's free-page stacks: free [R·G] int32 (replica r's free pages at
        r·G .. r·G + n_free[r] − 1; the loop pops from the top) and n_free [R] int32."""
        g = self.geometry
        stack = np.zeros((g.replicas, g.pages), np.int32)
        for r, f in enumerate(self.free):
            stack[r, : len(f)] = f
        return stack.reshape(-1), np.asarray([len(f) for f in self.free], np.int32)
