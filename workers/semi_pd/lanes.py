"""What two lanes over one KV storage share: the forward guard that lets a lane compute without
the storage lock, one worker's figures from two engines' (``merge_stats``), the clock of a
request's handoff from one lane to the other (``HandoffClock``), and their process's GIL switch
interval (``switch_interval``)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

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


@contextmanager
def forward_unlocked(
    lock: threading.Lock,
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
