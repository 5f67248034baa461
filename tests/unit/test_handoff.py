"""Handoff transaction bookkeeping: decode reservations and prefill sends."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvrelay.workers.handoff import (
    DecodeHandoffs,
    HandoffError,
    PrefillHandoffs,
    Refusal,
    RefusalReason,
    Reservation,
)
from kvrelay.workers.kv.block_pool import BlockPool

TOTAL = 12


class FakePool:
    """A strict free list: double frees and foreign ids fail loudly."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free_ids = list(range(total))

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_ids):
            return None
        out, self.free_ids = self.free_ids[:n], self.free_ids[n:]
        return out

    def free(self, ids) -> None:
        for b in ids:
            assert 0 <= b < self.total and b not in self.free_ids, f"bad free of {b}"
            self.free_ids.append(b)


def test_reserve_commit_abort_expire_return_blocks() -> None:
    pool = FakePool(8)
    d = DecodeHandoffs(pool.allocate, pool.free)
    r = d.reserve("a", 3, deadline=10.0)
    assert isinstance(r, Reservation) and len(r.block_ids) == 3
    assert d.reserve("a", 1, deadline=10.0) == Refusal("a", RefusalReason.DUPLICATE)
    assert d.reserve("big", 6, deadline=10.0) == Refusal("big", RefusalReason.NO_BLOCKS)
    assert d.reserve("late", 1, deadline=1.0, now=2.0).reason is RefusalReason.DEADLINE_PASSED
    b = d.reserve("b", 2, deadline=5.0)
    assert isinstance(b, Reservation)
    assert d.expire(now=5.0) == ["b"] and len(pool.free_ids) == 5
    assert d.commit("a") == r.block_ids and len(pool.free_ids) == 5  # engine owns them now
    assert d.abort("a") is False
    with pytest.raises(HandoffError):
        d.commit("a")
    d.check_integrity()
    assert d.reserved_blocks == 0


def test_pool_handing_out_a_held_block_is_refused_loudly() -> None:
    d = DecodeHandoffs(lambda n: [0] * n, lambda ids: None)
    with pytest.raises(HandoffError):
        d.reserve("x", 2, deadline=1.0)


def test_with_the_real_block_pool() -> None:
    pool = BlockPool(4, 16)
    d = DecodeHandoffs(lambda n: pool.allocate(n) if pool.can_allocate(n) else None, pool.release)
    r = d.reserve("a", 3, deadline=1.0)
    assert isinstance(r, Reservation)
    assert isinstance(d.reserve("b", 2, deadline=1.0), Refusal)
    assert d.expire(now=1.0) == ["a"]
    pool.check_integrity()
    assert pool.stats().free == 4


def test_prefill_sends() -> None:
    p = PrefillHandoffs()
    p.begin("a", "d0", [1, 2], deadline=3.0)
    p.begin("b", "d1", [2, 5], deadline=9.0)  # shared prefix block 2 is fine on P
    with pytest.raises(HandoffError):
        p.begin("a", "d0", [7], deadline=3.0)
    with pytest.raises(HandoffError):
        p.begin("c", "d0", [4, 4], deadline=3.0)
    assert [s.request_id for s in p.expire(now=3.0)] == ["a"]
    assert p.peer_lost("d1")[0].block_ids == (2, 5)
    with pytest.raises(HandoffError):
        p.acked("b")
    p.begin("c", "d0", [4], deadline=3.0)
    assert p.acked("c").peer == "d0" and p.outstanding() == []
    p.check_integrity()


class DecodeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = FakePool(TOTAL)
        self.d = DecodeHandoffs(self.pool.allocate, self.pool.free)
        self.engine: set[int] = set()  # committed blocks, owned by the engine
        self.next_id = 0

    @rule(n=st.integers(1, 5), deadline=st.floats(0, 10))
    def reserve(self, n: int, deadline: float) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        free_before = len(self.pool.free_ids)
        out = self.d.reserve(rid, n, deadline)
        if isinstance(out, Refusal):
            assert out.reason is RefusalReason.NO_BLOCKS and n > free_before
        else:
            assert len(out.block_ids) == n

    @precondition(lambda self: self.d.open_requests())
    @rule(data=st.data())
    def commit(self, data) -> None:
        rid = data.draw(st.sampled_from(self.d.open_requests()))
        ids = self.d.commit(rid)
        assert not self.engine & set(ids)
        self.engine |= set(ids)

    @precondition(lambda self: self.d.open_requests())
    @rule(data=st.data())
    def abort(self, data) -> None:
        assert self.d.abort(data.draw(st.sampled_from(self.d.open_requests())))

    @rule(now=st.floats(0, 10))
    def expire(self, now: float) -> None:
        for rid in self.d.expire(now):
            assert self.d.get(rid) is None
        assert all(self.d.get(r).deadline > now for r in self.d.open_requests())

    @precondition(lambda self: self.engine)
    @rule()
    def engine_finishes(self) -> None:
        self.pool.free(sorted(self.engine))
        self.engine.clear()

    @invariant()
    def nothing_leaks(self) -> None:
        self.d.check_integrity()
        held = [b for r in self.d.open_requests() for b in self.d.get(r).block_ids]
        everything = held + self.pool.free_ids + sorted(self.engine)
        assert sorted(everything) == list(range(TOTAL))


TestDecodeMachine = DecodeMachine.TestCase
TestDecodeMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
