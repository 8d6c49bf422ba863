"""The engine's host side: which request runs in which slot, on which pages, and what has finished.

    requests (queue) --admit--> Admission plans (a replica, its pages, its slots) --the engine
    prefills them, samples a_1--> start: the slot table's rows, and the rows to write on device
      --the engine's decode call, read back--> collect: finished slots' results, slots freed
      --> preempt: a replica out of pages for its next step gives up its newest rows (their
          requests go back to the front of the queue with their tokens so far, to resume)

`Scheduler` owns the queue, the typed slot table (`SlotTable`), the page allocator (free lists per
data replica, page_table.py) and the results; it compiles and runs nothing (the engine does:
engine.py), so its decisions can be tested on a small table without a model.

A request (a prompt and its N samples) is admitted whole into one replica, the one with the most
pages to spare, so that its samples share its prompt's full pages; its last, partial page is
copied per sample. A preempted sample resumes alone: its prompt and tokens so far are prefilled
again. Each response token's policy version is kept as spans (first index, version) per slot.

Multi-turn rows (`turns=True`; the environment's side is reval_jax.env.rollout): a row whose turn
ends (a stop id, a stop string, or its limit) gives up its slot but keeps its pages, parked, until
the environment answers (`turns_done` lists such turns). An observation continues it
(`continue_turn`): a request whose tokens are the response so far and the observation, with the
parked pages (`Cached`), so that only the turn's last token and the observation are prefilled,
at their positions; the end of the episode finishes it (`finish_turn`: its result, its pages
freed). Parked pages are given up only when memory forces it (`evict`: before a live row is
preempted, or when nothing runs and the queue's head does not fit); such a row's continuation then
prefills its whole sequence like a preempted one. The response's policy mask (observation tokens
False) is kept per row and returned as a fourth array.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from reval_jax.rollout.page_table import CacheGeometry, KVCacheTooSmall, PageAllocator, pages_needed
from reval_jax.rollout.pages import TRASH
from reval_jax.rollout.programs import SlotRows
from reval_jax.rollout.stops import StopStrings


@dataclasses.dataclass
class Request:
    """One prompt's N samples (new), or one preempted sample (resume: its tokens so far)."""

    index: int  # the prompt's row in the call (0..P-1)
    prompt_id: int  # its id: with the seed and the sample, it keys the sample's draws
    prompt: np.ndarray  # [p] int32
    limits: tuple[int, ...]  # max_new_tokens of each sample
    samples: tuple[int, ...]  # sample indices n
    tokens: np.ndarray | None = None  # resume: response tokens so far [h]
    logp: np.ndarray | None = None
    versions: np.ndarray | None = None  # resume: the policy version of each of those tokens [h]
    policy: np.ndarray | None = None  # resume: [h] bool, False at observation tokens (None: all policy)
    turn_start: int = 0  # resume: the response index at which the current turn began
    cached: Cached | None = None  # a continuation's parked pages (None: prefill the whole sequence)

    @property
    def resume(self) -> bool:
        return self.tokens is not None

    @property
    def sequence(self) -> np.ndarray:
        """The tokens to prefill: the prompt, and a resumed sample's tokens but the last (fed next)."""
        return np.concatenate([self.prompt, self.tokens[:-1]]) if self.resume else self.prompt


@dataclasses.dataclass
class Cached:
    """A parked row's pages: its replica, its page table, and how many of its sequence's tokens
    they hold (positions 0 .. pos - 1)."""

    replica: int
    table_row: np.ndarray  # [W] int32
    pos: int


@dataclasses.dataclass
class Parked:
    """A row whose turn ended, waiting for the environment (and then in the queue) with its pages."""

    key: tuple[int, int]  # (prompt row, sample)
    tokens: np.ndarray  # [h] the response so far
    logp: np.ndarray
    versions: np.ndarray
    policy: np.ndarray  # [h] bool
    turn_start: int  # the response index at which the turn that ended began
    cached: Cached | None  # None once evicted
    request: Request | None = None  # its continuation, once the environment answered

    @property
    def turn(self) -> np.ndarray:
        """The tokens of the turn that ended."""
        return self.tokens[self.turn_start :]


@dataclasses.dataclass
class Admission:
    """One request's place: its replica, the prompt's pages and the slots its samples take."""

    request: Request
    replica: int
    table_row: np.ndarray  # [W] int32  the sequence's pages (sample 0's; the others copy the partial one)
    copies: np.ndarray  # int32  a page per further sample for its copy of the partial page (new requests)
    slots: list[int]
    start: int = 0  # the sequence's tokens already in its pages (a continuation's): prefill from there


@dataclasses.dataclass
class SlotTable:
    """The host's view of the B decode slots, as of the last decode call's read and admissions since."""

    table: np.ndarray  # [B, W] int32  pages of each slot (local ids, TRASH where none)
    pos: np.ndarray  # [B] int32  the position each slot writes next (= tokens in the cache)
    length: np.ndarray  # [B] int32  response tokens sampled so far
    live: np.ndarray  # [B] bool  decoding
    held: np.ndarray  # [B] bool  live, or finished with results not yet collected
    admitted: np.ndarray  # [B] int64  admission order (preemption takes the newest)
    owner: list[tuple[int, int] | None]  # (prompt row, sample) of each held slot
    spans: list[list[tuple[int, int]]]  # (first response index, policy version) of each slot's tokens
    policy: list[np.ndarray | None]  # the policy mask of each slot's tokens before its admission (None: [])
    turn_start: np.ndarray  # [B] int32  the response index at which each slot's current turn began

    @classmethod
    def empty(cls, slots: int, width: int) -> SlotTable:
        return cls(table=np.zeros((slots, width), np.int32), pos=np.zeros(slots, np.int32),
                   length=np.zeros(slots, np.int32), live=np.zeros(slots, bool), held=np.zeros(slots, bool),
                   admitted=np.zeros(slots, np.int64), owner=[None] * slots, spans=[[] for _ in range(slots)],
                   policy=[None] * slots, turn_start=np.zeros(slots, np.int32))

    def mask(self, b: int, h: int) -> np.ndarray:
        """[h] bool: slot b's policy mask (the tokens it sampled since its admission are policy tokens)."""
        before = self.policy[b] if self.policy[b] is not None else np.zeros(0, bool)
        return np.concatenate([before, np.ones(h - len(before), bool)])

    def release(self, b: int) -> None:
        self.owner[b], self.held[b], self.live[b] = None, False, False


@dataclasses.dataclass(frozen=True)
class Readback:
    """The decode loop's slots as the host reads them after a call (numpy)."""

    table: np.ndarray  # [B, W] int32  (pages the loop allocated included)
    pos: np.ndarray  # [B] int32
    length: np.ndarray  # [B] int32
    live: np.ndarray  # [B] bool
    tokens: np.ndarray  # [B, A] int32
    logp: np.ndarray  # [B, A] f32


# (tokens [h] int32, logp [h] f32, versions [h] int32), and with turns the policy mask [h] bool
Result = tuple[np.ndarray, ...]


class Scheduler:
    """Admit / collect / preempt over a slot table and per-replica free pages, for one call's prompts."""

    def __init__(self, geometry: CacheGeometry, requests: list[Request], *, stop_ids=(), prefill_rows: int = 16,
                 refill: float = 0.25, pad_id: int = 0, stop_strings: StopStrings | None = None, turns: bool = False):
        self.geometry, self.stop, self.pad_id = geometry, set(stop_ids), pad_id
        self.prefill_rows, self.refill = prefill_rows, refill
        self.stop_strings, self.turns = stop_strings, turns
        self.pending = deque(requests)
        self.requests = {r.index: r for r in requests}  # as submitted: a preempted sample resumes from its own
        self.slots = SlotTable.empty(geometry.slots, geometry.width)
        self.pages = PageAllocator(geometry)
        self.results: dict[tuple[int, int], Result] = {}
        self.parked: dict[tuple[int, int], Parked] = {}  # multi-turn rows between two turns, by (row, sample)
        self.turns_done: list[Parked] = []  # turns ended since the engine last took them
        self.clock = 0  # admissions so far

    # --- admission

    def admit(self) -> list[Admission]:
        """Waiting requests, in order, while one fits (at most `prefill_rows`): each into the replica
        with the most pages to spare, after a page for every running row's next page boundary (the
        next decode step runs). Their pages are taken from the free lists; `start` fills the slots."""
        g = self.geometry
        open_slots = [[b for b in g.replica_slots(r) if not self.slots.held[b]] for r in range(g.replicas)]
        headroom = [int(self.slots.live[g.replica_slots(r)].sum()) for r in range(g.replicas)]
        batch = []
        while self.pending and len(batch) < self.prefill_rows:
            req = self.pending[0]
            need, own = self._pages_to_admit(req)
            spare = [self.pages.count(r) - headroom[r] for r in range(g.replicas)]
            fits = [r for r in range(g.replicas) if len(open_slots[r]) >= len(req.samples)
                    and spare[r] - need >= own and (req.cached is None or req.cached.replica == r)]
            if not fits:
                if not batch and not self.slots.live.any() and self.evict():  # nothing runs: parked pages go
                    continue
                break
            r = max(fits, key=lambda r: spare[r])
            self.pending.popleft()
            batch.append(self._place(req, r, self.pages.take(r, need), open_slots[r][: len(req.samples)]))
            open_slots[r] = open_slots[r][len(req.samples):]
            headroom[r] += len(req.samples)
        return batch

    def _pages_to_admit(self, req: Request) -> tuple[int, int]:
        """(pages to take, pages to leave free besides) for admitting `req`: its sequence's pages (a
        continuation's beyond its parked ones) and a copy of the partial prompt page per further
        sample; a resumed row also keeps a page for its own next step: preempted for want of one,
        it would otherwise be admitted and preempted again without a step (a livelock)."""
        full, partial = divmod(len(req.sequence), self.geometry.page_size)
        copies = (len(req.samples) - 1) if partial and not req.resume else 0
        have = int(np.count_nonzero(req.cached.table_row != TRASH)) if req.cached is not None else 0
        return max(0, full + (partial > 0) - have) + copies, (len(req.samples) if req.resume else 0)

    def _place(self, req: Request, r: int, pages: np.ndarray, slots: list[int]) -> Admission:
        """The admission of `req` into replica r's `slots`, on `pages` (taken for it)."""
        if req.cached is not None:  # a continuation: its parked pages, and more for the observation
            row = req.cached.table_row.copy()
            have = int(np.count_nonzero(row != TRASH))
            row[have : have + len(pages)] = pages
            del self.parked[(req.index, req.samples[0])]
            return Admission(req, r, row, pages[:0], slots, start=req.cached.pos)
        full, partial = divmod(len(req.sequence), self.geometry.page_size)
        row = np.zeros(self.geometry.width, np.int32)
        row[: full + (partial > 0)] = pages[: full + (partial > 0)]
        if req.resume and (req.index, req.samples[0]) in self.parked:  # an evicted continuation
            del self.parked[(req.index, req.samples[0])]
        return Admission(req, r, row, pages[full + (partial > 0):], slots)

    def page_copies(self, batch: list[Admission]) -> tuple[list[list[int]], list[list[int]]]:
        """(src, dst) per replica: each further sample of a new request copies its prompt's
        partial page into a page of its own."""
        src, dst = [[] for _ in range(self.geometry.replicas)], [[] for _ in range(self.geometry.replicas)]
        for a in batch:
            full = len(a.request.sequence) // self.geometry.page_size
            for page in a.copies:
                src[a.replica].append(int(a.table_row[full]))
                dst[a.replica].append(int(page))
        return src, dst

    def start(self, batch: list[Admission], first: dict[tuple[int, int], tuple[int, float]],
              version: int) -> SlotRows:
        """Puts the admitted samples into their slots. `first[(i, n)]`: a_1 and its log-prob of sample
        n of batch[i] when new. Returns the rows to write on device."""
        g, t = self.geometry, self.slots
        index = [b for a in batch for b in a.slots]
        rows = SlotRows.empty(index, g, self.pad_id, self.stop_strings.count if self.stop_strings else 0)
        k = 0
        for i, a in enumerate(batch):
            req, full = a.request, len(a.request.sequence) // g.page_size
            for j, n in enumerate(req.samples):
                b, row = a.slots[j], a.table_row.copy()
                if j > 0 and len(a.copies):  # its own copy of the prompt's partial page
                    row[full] = a.copies[j - 1]
                if req.resume:
                    toks, lps = req.tokens, req.logp
                else:
                    toks, lps = np.asarray([first[(i, n)][0]]), np.asarray([first[(i, n)][1]], np.float32)
                self._fill(rows, k, req, row, toks, lps, j)
                t.table[b], t.live[b], t.length[b], t.pos[b] = row, rows.live[k], len(toks), len(req.sequence)
                t.owner[b], t.held[b], t.admitted[b] = (req.index, n), True, self.clock
                t.policy[b], t.turn_start[b] = req.policy, req.turn_start
                t.spans[b] = _spans(req.versions) if req.resume else []
                if not t.spans[b] or t.spans[b][-1][1] != version:
                    t.spans[b].append((len(toks) if req.resume else 0, version))
                self.clock += 1
                k += 1
        return rows

    def _fill(self, rows: SlotRows, k: int, req: Request, row: np.ndarray, toks: np.ndarray, lps: np.ndarray,
              j: int) -> None:
        n = len(toks)
        rows.table[k], rows.pos[k], rows.last[k], rows.length[k] = row, len(req.sequence), toks[-1], n
        rows.limit[k] = req.limits[j]
        turn = toks[req.turn_start :]  # the current turn's tokens so far (none: a continuation's turn begins)
        stopped = len(turn) > 0 and int(turn[-1]) in self.stop
        if self.stop_strings is not None:
            rows.match[k], hit = self.stop_strings.state(turn)
            stopped = stopped or hit
        rows.live[k] = not (stopped or n >= req.limits[j])
        rows.tokens[k, :n], rows.logp[k, :n] = toks, lps
        rows.prompt_id[k], rows.sample[k] = req.prompt_id, req.samples[j]

    # --- after a decode call

    def collect(self, read: Readback) -> list[int]:
        """Takes the decode call's state and the results of the slots that finished in it; returns
        those slots (freed)."""
        t = self.slots
        t.table, t.pos, t.length = read.table.copy(), read.pos.copy(), read.length.copy()
        done = [b for b in range(self.geometry.slots) if t.held[b] and not read.live[b]]
        for b in done:
            h = t.length[b]
            result = (read.tokens[b, :h].copy(), read.logp[b, :h].copy(), _expand(t.spans[b], h))
            if self.turns:  # the turn has ended: parked with its pages until the environment answers
                park = Parked(t.owner[b], *result, t.mask(b, h), int(t.turn_start[b]),
                              Cached(self.geometry.replica_of(b), read.table[b].copy(), int(read.pos[b])))
                self.parked[park.key] = park
                self.turns_done.append(park)
            else:
                self.results[t.owner[b]] = result
            t.owner[b], t.held[b] = None, False
        t.live = read.live.copy()
        self._refresh()
        return done

    def preempt(self, read: Readback) -> list[int]:
        """In every replica out of pages for its next step, the newest rows go back to the queue
        (to resume) until the step fits; returns their slots (freed). Raises KVCacheTooSmall when a
        replica cannot hold even its one remaining row."""
        g, t = self.geometry, self.slots
        need = pages_needed(t.table, t.pos, t.live, g.page_size)
        victims = []
        for r in range(g.replicas):
            rr = g.replica_slots(r)
            while need[rr].sum() > self.pages.count(r):  # parked pages go first
                if not self.evict(r):
                    break
            while need[rr].sum() > self.pages.count(r) and t.live[rr].sum() > 1:
                b = max((b for b in rr if t.live[b]), key=lambda b: t.admitted[b])
                self.pending.appendleft(self._resumption(b, read))
                t.release(b)
                need[b] = False
                t.table[b] = TRASH
                victims.append(b)
                self._refresh()
            if need[rr].sum() > self.pages.count(r):
                raise KVCacheTooSmall(g, f"one sequence of {int(t.pos[t.live].max())} tokens")
        return victims

    def _resumption(self, b: int, read: Readback) -> Request:
        """The request that resumes slot b's sample from its tokens so far."""
        (row, n), h = self.slots.owner[b], self.slots.length[b]
        first = self.requests[row]
        return Request(row, first.prompt_id, first.prompt, (first.limits[first.samples.index(n)],), (n,),
                       tokens=read.tokens[b, :h].copy(), logp=read.logp[b, :h].copy(),
                       versions=_expand(self.slots.spans[b], h), policy=self.slots.mask(b, h),
                       turn_start=int(self.slots.turn_start[b]))

    # --- between two turns (multi-turn rows)

    def take_turns(self) -> list[Parked]:
        """The turns that ended since the last call (their rows parked, waiting for the environment)."""
        out, self.turns_done = self.turns_done, []
        return out

    def continue_turn(self, key: tuple[int, int], observation) -> None:
        """Queues parked row `key`'s next turn after `observation` (token ids, >= 1): its tokens so
        far and the observation's, on its parked pages (when not evicted), ahead of new prompts."""
        park, obs = self.parked[key], np.asarray(observation, np.int32)
        first = self.requests[key[0]]
        limit = first.limits[first.samples.index(key[1])]
        if len(obs) == 0 or len(park.tokens) + len(obs) >= limit:
            raise ValueError(f"an observation of {len(obs)} tokens after {len(park.tokens)} leaves no room "
                             f"for a policy token within {limit}: end the episode instead")
        tokens = np.concatenate([park.tokens, obs])
        park.request = Request(key[0], first.prompt_id, first.prompt, (limit,), (key[1],), tokens=tokens,
                               logp=np.concatenate([park.logp, np.zeros(len(obs), np.float32)]),
                               versions=np.concatenate([park.versions, np.full(len(obs), park.versions[-1])]),
                               policy=np.concatenate([park.policy, np.zeros(len(obs), bool)]),
                               turn_start=len(tokens), cached=park.cached)
        self.pending.appendleft(park.request)

    def finish_turn(self, key: tuple[int, int]) -> None:
        """Parked row `key`'s episode has ended: its result (tokens, logp, versions, policy mask); its pages freed."""
        park = self.parked.pop(key)
        self.results[key] = (park.tokens, park.logp, park.versions, park.policy)
        self._refresh()

    def evict(self, replica: int | None = None) -> bool:
        """Frees the pages of the parked row (of `replica`, or any) parked first; its continuation
        will prefill its whole sequence. False when no parked row holds pages."""
        for park in self.parked.values():  # in the order they were parked
            if park.cached is not None and replica in (None, park.cached.replica):
                park.cached = None
                if park.request is not None:
                    park.request.cached = None
                self._refresh()
                return True
        return False

    def _refresh(self) -> None:
        """Free pages: those neither a held slot nor a parked row references."""
        kept = [p.cached for p in self.parked.values() if p.cached is not None]
        self.pages.refresh(self.slots.table, self.slots.held, [(c.replica, c.table_row) for c in kept])

    # --- the loop's state

    def switch_version(self, version: int) -> None:
        """New weights from now on: the live rows' next tokens carry `version`."""
        for b in np.flatnonzero(self.slots.live):
            self.slots.spans[b].append((int(self.slots.length[b]), version))

    def refill_at(self) -> int:
        """Leave the decode loop once this many slots have finished: a `refill` fraction of them, and
        at least the samples of any waiting request (B + 1: never, when none waits)."""
        B = self.geometry.slots
        if not self.pending:
            return B + 1
        return max(1, int(self.refill * B), max(len(r.samples) for r in self.pending))

    def running(self) -> bool:
        """Some slot is held; raises KVCacheTooSmall when none is and a request waits (it fits nowhere)."""
        if self.slots.held.any():
            return True
        if self.pending:
            req = self.pending[0]
            raise KVCacheTooSmall(self.geometry, f"one request of {len(req.prompt)} prompt tokens and "
                                                 f"{len(req.samples)} samples")
        return False

    def rollouts(self, prompts: int, samples: int) -> list[list[Result]]:
        """Per prompt, its samples' (tokens, logp, versions), in sample order."""
        return [[self.results[(i, n)] for n in range(samples)] for i in range(prompts)]


def _expand(spans: list[tuple[int, int]], n: int) -> np.ndarray:
    """[n] int32: the version of each response token, from (first index, version) spans."""
    out = np.zeros(n, np.int32)
    for start, version in spans:
        out[start:] = version
    return out


def _spans(versions: np.ndarray) -> list[tuple[int, int]]:
    """The (first index, version) spans of a per-token version array."""
    return [(int(i), int(versions[i])) for i in range(len(versions)) if i == 0 or versions[i] != versions[i - 1]]
