"""The engine's host side on small slot tables, without a model or a compile: admission (replica
choice, shared prompt pages, copies of the partial page, headroom), collection, preemption and
resumption, the capacity error, and the one pages-needed rule on host and device."""

import jax.numpy as jnp
import numpy as np
import pytest

from reval_jax.rollout.page_table import CacheGeometry, EngineConfig, KVCacheTooSmall, PageAllocator, pages_needed
from reval_jax.rollout.pages import TRASH
from reval_jax.rollout.scheduler import Readback, Request, Scheduler


def request(index, length, samples=1, limit=8, prompt_id=None):
    prompt = np.arange(10, 10 + length, dtype=np.int32)
    return Request(index, index + 100 if prompt_id is None else prompt_id, prompt, (limit,) * samples,
                   tuple(range(samples)))


def readback(s: Scheduler, **changes) -> Readback:
    """The slot table as the device would return it, with `changes` (and zero tokens / log-probs)."""
    t, g = s.slots, s.geometry
    fields = dict(table=t.table.copy(), pos=t.pos.copy(), length=t.length.copy(), live=t.live.copy(),
                  tokens=np.arange(g.slots * g.max_new_tokens, dtype=np.int32).reshape(g.slots, -1),
                  logp=-np.ones((g.slots, g.max_new_tokens), np.float32))
    fields.update(changes)
    return Readback(**fields)


# two replicas of 2 slots, 6 pages each (+ the trash page), pages of 4 tokens, tables 6 pages wide
TWO = CacheGeometry(slots=4, width=6, replicas=2, pages=7, page_size=4, max_new_tokens=8)


def test_a_request_goes_whole_into_one_replica_and_shares_its_prompt_pages():
    s = Scheduler(TWO, [request(0, 6, samples=2), request(1, 8, samples=2)], stop_ids=(7,))
    batch = s.admit()
    # 6 tokens: one full page and a partial one, plus a copy of it for sample 1 (3 pages), in replica 0
    # (a tie: the first); 8 tokens: two full pages, no copy, in replica 1 (replica 0 has no slot left)
    assert [(a.replica, a.slots) for a in batch] == [(0, [0, 1]), (1, [2, 3])]
    assert list(batch[0].table_row[:3]) == [1, 2, TRASH] and list(batch[0].copies) == [3]
    assert list(batch[1].table_row[:3]) == [1, 2, TRASH] and len(batch[1].copies) == 0
    assert [list(f) for f in s.pages.free] == [[4, 5, 6], [3, 4, 5, 6]] and not s.pending
    assert s.page_copies(batch) == ([[2], []], [[3], []])  # (src, dst) per replica: sample 1's partial page

    first = {(0, 0): (5, -0.5), (0, 1): (7, -0.25), (1, 0): (9, -1.0), (1, 1): (6, -2.0)}
    rows = s.start(batch, first, version=3)
    assert rows.index == [0, 1, 2, 3]
    np.testing.assert_array_equal(rows.table[:, :3], [[1, 2, 0], [1, 3, 0], [1, 2, 0], [1, 2, 0]])
    np.testing.assert_array_equal(rows.pos, [6, 6, 8, 8])
    np.testing.assert_array_equal(rows.last, [5, 7, 9, 6])
    np.testing.assert_array_equal(rows.live, [True, False, True, True])  # 7 is a stop token
    np.testing.assert_array_equal(rows.prompt_id, [100, 100, 101, 101])
    np.testing.assert_array_equal(rows.sample, [0, 1, 0, 1])
    assert s.slots.owner == [(0, 0), (0, 1), (1, 0), (1, 1)] and s.slots.held.all()
    np.testing.assert_array_equal(s.slots.admitted, [0, 1, 2, 3])
    assert s.slots.spans[0] == [(0, 3)]


def test_admission_keeps_a_page_for_every_running_rows_next_step():
    """One replica, 3 pages: after a 1-page request 2 are free, but one is the running row's next
    page, so a 2-page request waits."""
    g = CacheGeometry(slots=4, width=6, replicas=1, pages=4, page_size=4, max_new_tokens=8)
    s = Scheduler(g, [request(0, 4), request(1, 8)])
    assert [a.request.index for a in s.admit()] == [0]
    assert [r.index for r in s.pending] == [1] and s.pages.count(0) == 2


def test_admission_stops_at_prefill_rows():
    s = Scheduler(TWO, [request(i, 3) for i in range(4)], prefill_rows=2)
    assert len(s.admit()) == 2 and len(s.pending) == 2


def test_collect_frees_finished_slots_and_their_pages():
    s = Scheduler(TWO, [request(0, 6, samples=2)], stop_ids=(7,))
    batch = s.admit()
    s.start(batch, {(0, 0): (5, -0.5), (0, 1): (6, -0.25)}, version=0)
    s.switch_version(4)  # new weights before the decode call: both rows' next tokens carry version 4
    read = readback(s, live=np.array([True, False, False, False]), length=np.array([3, 2, 0, 0]),
                    pos=np.array([8, 7, 0, 0]))
    assert s.collect(read) == [1]
    tokens, logp, versions = s.results[(0, 1)]
    np.testing.assert_array_equal(tokens, read.tokens[1, :2])
    np.testing.assert_array_equal(versions, [0, 4])
    assert s.slots.owner[1] is None and not s.slots.held[1] and s.slots.held[0]
    assert list(s.pages.free[0]) == [3, 4, 5, 6]  # sample 1's copy page (3) is free, the shared prompt pages not


def test_a_replica_out_of_pages_preempts_its_newest_row_which_resumes_with_its_tokens():
    g = CacheGeometry(slots=2, width=4, replicas=1, pages=4, page_size=4, max_new_tokens=8)
    s = Scheduler(g, [request(0, 4), request(1, 4)])
    batch = s.admit()
    assert [list(a.table_row[:1]) for a in batch] == [[1], [2]]
    s.start(batch, {(0, 0): (5, -0.5), (1, 0): (6, -0.5)}, version=2)
    # row 0 took the last free page (3) at position 4 and reached 8; row 1 needs one at position 4
    read = readback(s, table=np.array([[1, 3, 0, 0], [2, 0, 0, 0]]), pos=np.array([8, 4]),
                    length=np.array([5, 1]), live=np.array([True, True]))
    assert s.collect(read) == [] and list(s.pages.free[0]) == []
    assert s.preempt(read) == [1]  # the newest row goes back to the queue, its page is free again
    assert list(s.pages.free[0]) == [2] and not s.slots.held[1] and (s.slots.table[1] == TRASH).all()
    resumed = s.pending[0]
    assert (resumed.index, resumed.prompt_id, resumed.samples, resumed.limits) == (1, 101, (0,), (8,))
    np.testing.assert_array_equal(resumed.tokens, read.tokens[1, :1])
    np.testing.assert_array_equal(resumed.versions, [2])
    np.testing.assert_array_equal(resumed.sequence, list(resumed.prompt))  # its one token is fed next
    # it needs its sequence's page and one for its own next step, after row 0's next page: 3 > 1 free
    assert s.admit() == []


def test_a_row_no_replica_can_hold_is_the_capacity_error():
    g = CacheGeometry(slots=2, width=4, replicas=1, pages=2, page_size=4, max_new_tokens=8)
    s = Scheduler(g, [request(0, 4)])
    s.start(s.admit(), {(0, 0): (5, -0.5)}, version=0)
    read = readback(s, pos=np.array([4, 0]), live=np.array([True, False]))
    s.collect(read)
    with pytest.raises(KVCacheTooSmall, match=r"the KV cache \(1 pages of 4 tokens\) cannot hold one sequence of 4"):
        s.preempt(read)
    waiting = Scheduler(g, [request(0, 9, samples=1)])  # 3 pages
    assert waiting.admit() == []
    with pytest.raises(KVCacheTooSmall, match="one request of 9 prompt tokens and 1 samples: raise EngineConfig"):
        waiting.running()
    assert not Scheduler(g, []).running()


def test_refill_threshold():
    s = Scheduler(TWO, [request(0, 3, samples=2)], refill=0.25)
    assert s.refill_at() == 2  # the waiting request's samples
    s.pending.clear()
    assert s.refill_at() == TWO.slots + 1  # nothing waits: never leave early


def test_geometry_and_its_capacity_error():
    g = CacheGeometry.of(EngineConfig(slots=4, page_size=4, cache_tokens=96), samples=2, max_new_tokens=8,
                         prompt_bucket=16)
    assert (g.width, g.replicas, g.pages, g.rows, g.cached_tokens) == (6, 1, 25, 4, 96)
    default = CacheGeometry.of(EngineConfig(slots=4, page_size=4), samples=2, max_new_tokens=8, prompt_bucket=16)
    assert default.pages == 1 + 4 * 6  # every slot's longest sequence
    with pytest.raises(KVCacheTooSmall, match="cannot hold one sequence of prompt bucket 16 "
                                              r"\+ max_new_tokens 8 \(6 pages\): raise EngineConfig.cache_tokens"):
        CacheGeometry.of(EngineConfig(slots=4, page_size=4, cache_tokens=20), samples=2, max_new_tokens=8,
                         prompt_bucket=16)


def test_the_page_allocator_frees_what_no_held_slot_references():
    a = PageAllocator(TWO)
    table = np.zeros((4, 6), np.int32)
    table[0, :2], table[1, :2], table[2, :1] = [1, 2], [1, 5], [6]
    a.refresh(table, np.array([True, False, True, False]))
    assert [list(f) for f in a.free] == [[3, 4, 5, 6], [1, 2, 3, 4, 5]]
    assert list(a.take(0, 2)) == [3, 4] and a.count(0) == 2
    free, n_free = a.stack()
    np.testing.assert_array_equal(n_free, [2, 5])
    np.testing.assert_array_equal(free.reshape(2, 7)[:, :5], [[5, 6, 0, 0, 0], [1, 2, 3, 4, 5]])


def test_pages_needed_is_one_rule_on_host_and_device():
    rng = np.random.RandomState(0)
    table = rng.randint(0, 3, (16, 5)).astype(np.int32)
    pos = rng.randint(0, 24, 16).astype(np.int32)
    live = rng.rand(16) < 0.7
    host = pages_needed(table, pos, live, 4)
    device = pages_needed(jnp.asarray(table), jnp.asarray(pos), jnp.asarray(live), 4)
    assert isinstance(host, np.ndarray) and host.any() and not host.all()
    np.testing.assert_array_equal(host, np.asarray(device))
    col = np.minimum(pos // 4, 4)
    np.testing.assert_array_equal(host, live & (pos % 4 == 0) & (table[np.arange(16), col] == TRASH))
