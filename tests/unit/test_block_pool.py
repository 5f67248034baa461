"""BlockPool invariants under a randomized allocate / share / free / evict stress."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvrelay.workers.kv.block_pool import BlockPool, PoolError
from kvrelay.workers.types import KVEventKind


def test_allocate_release_cache_and_hit() -> None:
    pool = BlockPool(4, 16)
    a = pool.allocate(2)
    assert pool.commit(a[0], 111) and pool.commit(a[1], 222)
    pool.release(reversed(a))
    assert pool.stats().cached == 2 and pool.stats().free == 2
    assert pool.lookup([111, 222, 333]) == a
    pool.acquire(a)
    assert pool.stats().used == 2
    pool.check_integrity()


def test_eviction_is_lru_and_reported() -> None:
    evicted: list[list[tuple[int, int]]] = []
    pool = BlockPool(3, 16, on_evict=evicted.append)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, (1, 2, 3), strict=True):
        pool.commit(b, h)
    pool.release([blocks[1]])  # released first: least recently used
    pool.release([blocks[0]])
    pool.drain_events()
    got = pool.allocate(1)
    assert got == [blocks[1]]
    assert evicted == [[(blocks[1], 2)]]
    assert pool.lookup([2]) == []
    (event,) = pool.drain_events()
    assert event.kind is KVEventKind.REMOVED and event.block_hashes == (2,)
    pool.check_integrity()


def test_duplicate_hash_keeps_one_owner() -> None:
    pool = BlockPool(2, 16)
    a, b = pool.allocate(2)
    assert pool.commit(a, 7)
    assert not pool.commit(b, 7)
    pool.release([b])
    assert pool.stats().free == 1  # the duplicate is not cached
    pool.check_integrity()


def test_contract_violations_raise() -> None:
    pool = BlockPool(2, 16)
    with pytest.raises(PoolError):
        pool.allocate(3)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(PoolError):
        pool.release([a])
    with pytest.raises(PoolError):
        pool.acquire([a])  # free, not cached
    assert pool.stats().free == 2


class PoolMachine(RuleBasedStateMachine):
    """Requests allocate, share prefixes, commit hashes, free and get evicted at random; a
    reference model of ownership is checked against the pool after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(12, 4)
        self.owned: dict[int, list[int]] = {}  # request -> blocks it holds a reference on
        self.next_req = 0

    @rule(n=st.integers(1, 5))
    def allocate(self, n: int) -> None:
        if not self.pool.can_allocate(n):
            with pytest.raises(PoolError):
                self.pool.allocate(n)
            return
        self.owned[self.next_req] = self.pool.allocate(n)
        self.next_req += 1

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), h=st.integers(0, 20))
    def commit(self, data: st.DataObject, h: int) -> None:
        req = data.draw(st.sampled_from(sorted(self.owned)))
        if self.owned[req]:
            block = data.draw(st.sampled_from(self.owned[req]))
            if self.pool.block_hash(block) is None:
                self.pool.commit(block, h)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def share_prefix(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(sorted(self.owned)))
        hashes = [self.pool.block_hash(b) for b in self.owned[req]]
        prefix = []
        for h in hashes:
            if h is None:
                break
            prefix.append(h)
        hits = self.pool.lookup(prefix)
        revive = sum(self.pool.ref_count(b) == 0 for b in hits)
        if self.pool.can_allocate(revive):
            self.pool.acquire(hits)
            self.owned[self.next_req] = list(hits)
            self.next_req += 1

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(sorted(self.owned)))
        self.pool.release(reversed(self.owned.pop(req)))

    @rule()
    def revive_cached(self) -> None:
        cached = [
            b
            for b in range(self.pool.num_blocks)
            if self.pool.ref_count(b) == 0 and self.pool.block_hash(b) is not None
        ]
        if cached:
            self.pool.acquire(cached[:1])
            self.owned[self.next_req] = cached[:1]
            self.next_req += 1

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for blocks in self.owned.values():
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        for b in range(self.pool.num_blocks):
            assert self.pool.ref_count(b) == refs.get(b, 0)
        s = self.pool.stats()
        assert s.free + s.used + s.cached == s.total


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_check_owned_names_blocks_owned_twice_or_by_nobody() -> None:
    from kvrelay.workers.kv.tiers import check_owned

    pool = BlockPool(8, 4)
    a, b = pool.allocate(2)
    pool.acquire([a])  # a shared prefix block: two holders, ref 2
    check_owned(pool, [a, a, b])
    with pytest.raises(AssertionError, match=f"block {b} owned twice: ref 1, held 2"):
        check_owned(pool, [a, a, b, b])
    with pytest.raises(AssertionError, match=f"block {b} owned by nobody: ref 1, held 0"):
        check_owned(pool, [a, a])
    pool.release([b, a, a])
    check_owned(pool, [])


def _state(pool: BlockPool) -> tuple[object, ...]:
    stored = [
        h for e in pool.drain_events() for h in e.block_hashes if e.kind is KVEventKind.STORED
    ]
    return [pool.block_hash(b) for b in range(pool.num_blocks)], pool.stats(), stored


@settings(max_examples=60, deadline=None)
@hypothesis.given(
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 5)), min_size=0, max_size=24)
)
def test_commit_many_is_commit_one_by_one_in_one_event(pairs: list[tuple[int, int]]) -> None:
    """Same hashes, owners and stored hashes (in order) as ``commit`` per pair, one event; an
    error (an unreferenced block, another hash on a hashed block) raises at the same pair,
    with what was stored before it logged."""
    one, many = BlockPool(16, 4), BlockPool(16, 4)
    for p in (one, many):
        p.allocate(10)  # blocks 0-9 referenced, 10-15 free
    want_error = None
    for b, h in pairs:
        try:
            one.commit(b, 1000 + h)
        except PoolError as exc:
            want_error = str(exc)
            break
    got_error = None
    try:
        many.commit_many([b for b, _ in pairs], [1000 + h for _, h in pairs])
    except PoolError as exc:
        got_error = str(exc)
    assert got_error == want_error
    events = list(many.event_log)
    assert len(events) <= 1
    assert _state(one) == _state(many)
