"""What two lanes over one KV storage share: the storage lock (``StorageLock``, which can put
the decode lane first), the forward guard that lets a lane compute without it, one worker's
figures from two engines' (``merge_stats``), the clock of a request's handoff from one lane to
the other (``HandoffClock``), and their process's GIL switch interval (``switch_interval``)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

from kvrelay.workers.engine.config import EngineStats
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.semi_pd.sm_partition import SMPartition
from kvrelay.workers.types import TokenEvent

# The lanes' threads share one GIL. A torch call releases it, and taking it back while the other
# lane runs Python (its step's host work, under the storage lock) waits for CPython's switch
# interval, 5 ms by default: a decode step makes dozens of such calls. The goodput run of
# 2026-12-06 (H100, fixed 50/100 split) showed the decode lane's step at 2.2 ms p50 but
# 9-15 ms p99, its kernels at 4.5-6 ms p99, and 5-8 ms p99 waiting for the storage lock the
# prefill lane held for its host work: the GIL decides how fast either lane gets through.
# KVRELAY_SWITCH_INTERVAL_S sets it exactly (an experiment's knob: the lanes' ``cpu_share`` in
# ``lane_times`` says how much of a phase was spent waiting).
SWITCH_INTERVAL_S = 0.0005


def switch_interval() -> float:
    """The GIL switch interval a semi-PD worker's process runs with: KVRELAY_SWITCH_INTERVAL_S
    when set, else SWITCH_INTERVAL_S unless the process already runs a shorter one."""
    text = os.environ.get("KVRELAY_SWITCH_INTERVAL_S")
    if text is None:
        return min(sys.getswitchinterval(), SWITCH_INTERVAL_S)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"KVRELAY_SWITCH_INTERVAL_S={text!r}: seconds in (0, 1]")
    return value


class Lock(Protocol):
    """What a lane's guards and loop need of the storage lock."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...


class StorageLock:
    """The lock over a semi-PD worker's one storage (pool, CPU tier, copier), with the decode
    lane first if ``decode_first``. A lane gives the lock back for its forward pass and its
    sampling and takes it back after; the prefill lane holds it for its whole ``schedule``
    (admissions, allocations, demotions: 4.5 / 10.6 ms p50 / p99 on an H100 at 128 req/s,
    2026-12-06), so the decode lane taking it back waited that long (its ``relock_wait`` and
    ``sample`` 6-10 ms p99 of a 21-23 ms p99 step: its ITL). With ``decode_first`` the decode
    lane takes it through ``urgent`` and the prefill lane's scheduler hands it over between two
    admissions while the decode lane waits (``yield_to_urgent``), taking it back after.

    Plain ``with lock`` / ``acquire`` / ``release`` is an ordinary acquisition (the prefill
    lane, the worker's own calls)."""

    def __init__(self, decode_first: bool = False) -> None:
        self._lock = threading.Lock()
        self._guard = threading.Lock()  # the waiters' count
        self._urgent = 0  # urgent acquisitions waiting
        self.decode_first = decode_first
        self.yields = 0  # hand-overs to an urgent waiter (``yield_to_urgent``)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def urgent(self) -> Lock:
        """The decode lane's view: its acquisitions are announced to ``yield_to_urgent``
        (``decode_first``; otherwise this lock itself)."""
        return _Urgent(self) if self.decode_first else self

    def _acquire_urgent(self) -> bool:
        with self._guard:
            self._urgent += 1
        try:
            return self._lock.acquire()
        finally:
            with self._guard:
                self._urgent -= 1

    def yield_to_urgent(self) -> bool:
        """Called holding the lock: if an urgent acquisition waits, let it have the lock and
        take it back once it is given back. True if it did."""
        if not self._urgent:
            return False
        self.yields += 1
        self._lock.release()
        # until the waiter holds it (or gave up): taking it back at once would likely win the
        # race against a thread still waking up. sleep(0) hands the GIL over meanwhile
        while self._urgent and not self._lock.locked():
            time.sleep(0)
        self._lock.acquire()
        return True


class _Urgent:
    """``StorageLock.urgent``'s view: the Lock protocol and a context manager."""

    def __init__(self, lock: StorageLock) -> None:
        self._of = lock

    def acquire(self) -> bool:
        return self._of._acquire_urgent()

    def release(self) -> None:
        self._of.release()

    def __enter__(self) -> bool:
        return self._of._acquire_urgent()

    def __exit__(self, *exc: object) -> None:
        self._of.release()


@contextmanager
def forward_unlocked(
    lock: Lock,
    partition: SMPartition,
    *,
    synchronize: bool = True,
    times: PhaseTimes | None = None,
    phases: bool = True,
) -> Iterator[None]:
    """Around a lane's forward pass (and an overlapped lane's wait for its tokens): the other
    lane may use the storage meanwhile. ``synchronize``: the lock comes back only once this
    lane's kernels are done (so a block freed next is not in use); False for the overlapped
    decode lane, which leaves its step running and holds its releases back instead
    (workers/engine/deferred.py). ``times``: records ``forward`` (issue and, synchronised, the
    kernels) and ``relock_wait`` (taking the lock back) unless ``phases`` is False, and reports
    the whole time without the lock to the step's ``held`` figure (``PhaseTimes.off_lock``)."""
    t0 = time.perf_counter()
    lock.release()
    try:
        with GPU_GATE.work():  # the other lane may be capturing a decode graph
            yield
            if synchronize:
                partition.synchronize()
    finally:
        t1 = time.perf_counter()
        lock.acquire()
        if times is not None:
            t2 = time.perf_counter()
            times.off_lock(t2 - t0)
            if phases:
                times.add("forward", t1 - t0)
                times.add("relock_wait", t2 - t1)


LANE_EXTRAS = ("overlap_discarded_tokens", "overlap_held_blocks", "overlap_held_commits")


def merge_stats(prefill: EngineStats, decode: EngineStats) -> EngineStats:
    """One worker's figures from its two lanes: per-lane counters add up; the storage's (pool,
    CPU pool, tier and copier extras) are the same object seen twice, so they are taken once."""
    return replace(
        decode,
        running=prefill.running + decode.running,
        waiting=prefill.waiting + decode.waiting,
        handoff=prefill.handoff + decode.handoff,
        prompt_tokens_computed=prefill.prompt_tokens_computed + decode.prompt_tokens_computed,
        decode_tokens_computed=prefill.decode_tokens_computed + decode.decode_tokens_computed,
        preemptions=prefill.preemptions + decode.preemptions,
        prefix_query_tokens=prefill.prefix_query_tokens + decode.prefix_query_tokens,
        prefix_hit_tokens=prefill.prefix_hit_tokens + decode.prefix_hit_tokens,
        steps=prefill.steps + decode.steps,
        extra={
            **prefill.extra,
            **decode.extra,
            # per lane: either may run the overlapped step (its held releases and commits)
            **{k: prefill.extra.get(k, 0) + decode.extra.get(k, 0) for k in LANE_EXTRAS},
        },
        prefix_hit_tokens_cpu=prefill.prefix_hit_tokens_cpu + decode.prefix_hit_tokens_cpu,
        swaps_out=prefill.swaps_out + decode.swaps_out,
        swaps_in=prefill.swaps_in + decode.swaps_in,
        swap_bytes=prefill.swap_bytes + decode.swap_bytes,
        recompute_preemptions=prefill.recompute_preemptions + decode.recompute_preemptions,
    )


class HandoffClock:
    """Per request, the parts of its handoff inside a semi-PD worker, recorded as phases of the
    decode lane's ``PhaseTimes``: ``adopt_wait`` (handed over by the prefill lane, its first
    token queued, to adopted by the decode lane), ``first_decode`` (adopted to its first decode
    event queued) and their sum ``handoff_gap``: the client's first inter-token gap less the
    delivery. Figures, not state: a request that leaves before its first decode event is dropped
    by ``forget`` (an abort), or with every pending one past ``KEPT``."""

    KEPT = 4096

    def __init__(self, times: PhaseTimes) -> None:
        self.times = times
        self._lock = threading.Lock()
        self._handed: dict[str, float] = {}
        self._adopted: dict[str, tuple[float, float]] = {}

    def handed(self, request_id: str) -> None:
        with self._lock:
            self._bound(self._handed)
            self._handed[request_id] = time.perf_counter()

    def adopted(self, request_id: str) -> None:
        now = time.perf_counter()
        with self._lock:
            handed = self._handed.pop(request_id, None)
            if handed is None:
                return
            self._bound(self._adopted)
            self._adopted[request_id] = (handed, now)
        self.times.add("adopt_wait", now - handed)

    def emitted(self, events: list[TokenEvent]) -> None:
        """The decode lane's events of a step: the adopted requests' first ones end their clocks."""
        if not self._adopted:
            return
        now = time.perf_counter()
        with self._lock:
            found = [at for ev in events if (at := self._adopted.pop(ev.request_id, None))]
        for handed, adopted in found:
            self.times.add("first_decode", now - adopted)
            self.times.add("handoff_gap", now - handed)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._handed.pop(request_id, None)
            self._adopted.pop(request_id, None)

    def _bound(self, pending: dict[str, Any]) -> None:
        if len(pending) >= self.KEPT:
            pending.clear()
