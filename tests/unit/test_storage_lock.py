"""The semi-PD storage lock with the decode lane first (workers/semi_pd/lanes.py, StorageLock):
a holder's ``yield_to_urgent`` lets a waiting urgent acquisition in and takes the lock back
after it, and does nothing with no such waiter; the scheduler offers the lock before each
admission (``Scheduler.yield_point``), and another engine's allocation in between is seen by
the next admission. Real threads and a real pool, no model."""

from __future__ import annotations

import threading
import time

from kvrelay.workers.engine.policy import make_policy
from kvrelay.workers.engine.scheduler import Scheduler
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.semi_pd.lanes import StorageLock
from kvrelay.workers.types import SamplingParams


def _until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_yield_hands_the_lock_to_a_waiting_urgent_acquirer_and_takes_it_back() -> None:
    lock = StorageLock(decode_first=True)
    order: list[str] = []
    assert lock.acquire()
    assert not lock.yield_to_urgent()  # nobody waits: kept
    assert lock.locked() and lock.yields == 0

    def decode() -> None:
        with lock.urgent():
            order.append("decode")

    t = threading.Thread(target=decode, daemon=True)
    t.start()
    _until(lambda: lock._urgent == 1)  # it waits for the lock this thread holds
    assert lock.yield_to_urgent()  # returns holding the lock again, after the decode lane
    order.append("prefill")
    assert lock.locked() and lock.yields == 1
    lock.release()
    t.join(10)
    assert order == ["decode", "prefill"]


def test_plain_acquirers_are_not_let_in() -> None:
    """Only the urgent view's acquisitions are announced: a plain waiter (another prefill-side
    call) does not make the holder yield, and without ``decode_first`` the urgent view is the
    lock itself."""
    lock = StorageLock(decode_first=True)
    lock.acquire()
    got = threading.Event()
    t = threading.Thread(target=lambda: (lock.acquire(), got.set(), lock.release()), daemon=True)
    t.start()
    assert not lock.yield_to_urgent() and not got.is_set()
    lock.release()
    t.join(10)
    assert got.is_set()
    plain = StorageLock()
    assert plain.urgent() is plain


def _seq(rid: str, n: int, base: int) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams(max_tokens=4))


def test_the_scheduler_offers_the_lock_before_each_admission() -> None:
    """Three waiting requests, room for two: the hook runs before each admission attempt, and
    what another engine allocates from the shared pool inside the hook (the decode lane holding
    the lock) is seen by the admissions after it."""
    pool = BlockPool(12, 4)
    s = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64, hash_root=1,
                  policy=make_policy("fcfs"))  # fmt: skip
    for i in range(3):
        s.add(_seq(f"r{i}", 16, 1000 * (i + 1)))  # 4 blocks each
    taken: list[list[int]] = []

    def other_engine() -> None:  # the first offer: the other lane allocates 4 blocks
        if not taken:
            taken.append(pool.allocate(4))

    calls = 0

    def counting() -> None:
        nonlocal calls
        calls += 1
        other_engine()

    s.yield_point = counting
    plan = s.schedule()
    assert [it.seq.request_id for it in plan.scheduled] == ["r0", "r1"]  # r2 found no room
    assert calls == 3 and pool.num_available == 0
    pool.release(taken[0])
