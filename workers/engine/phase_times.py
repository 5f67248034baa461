"""Where an engine thread's time goes, phase by phase: a log-bucketed histogram of durations per
named phase (waiting for a lock, a step, the forward pass, the event sink, the time between two
steps), cheap enough to record on every step.

A semi-PD worker keeps one per lane (workers/semi_pd/worker.py, ``lane_times``): its decode
lane's tokens have come out 1.3-2.4x further apart than a colocated worker's in every goodput
run, and these figures say whether a step waited for the storage lock, for its kernels (the
other lane's kernels on the same SMs) or for the host. Percentiles are read from the buckets:
each is the upper edge of the bucket holding that rank, so within one bucket's width (1/8 of a
factor of 2, ~9 %) above the exact value.

A phase may also record its thread's CPU time (``time.thread_time``): ``cpu_share`` is that
over its wall time. A phase the host computes through has a share near 1; one that sat blocked
(on a lock, on the GIL while another thread ran Python, on a sleep) has a low one. A CUDA wait
may spin, so a phase that waits for the device can read high (benchmarks/sync_probe.py tells
whether a phase synchronised).
"""

from __future__ import annotations

import math
import threading

BUCKETS_PER_OCTAVE = 8
LOWEST_S = 1e-6  # durations below this go to the first bucket
NUM_BUCKETS = 8 * 24  # 1 us .. ~16 s


def bucket_of(seconds: float) -> int:
    if seconds <= LOWEST_S:
        return 0
    i = int(math.log2(seconds / LOWEST_S) * BUCKETS_PER_OCTAVE) + 1
    return min(i, NUM_BUCKETS - 1)


def upper_edge(bucket: int) -> float:
    return LOWEST_S * 2.0 ** (bucket / BUCKETS_PER_OCTAVE)


class _Phase:
    __slots__ = ("count", "counts", "cpu", "cpu_wall", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * NUM_BUCKETS
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self.cpu = 0.0  # thread CPU seconds of the adds that gave them
        self.cpu_wall = 0.0  # those adds' wall seconds

    def percentile(self, q: float) -> float:
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(upper_edge(i), self.max)
        return self.max


class PhaseTimes:
    """Thread-safe: the engine thread adds, another thread reads (``summary``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[str, _Phase] = {}
        self._off_lock = 0.0  # this step's seconds without its lock so far (the step's thread)

    def off_lock(self, seconds: float) -> None:
        """A step gave its lock back for ``seconds`` (forward pass, sampling; the wait to take
        it back included): ``take_off_lock`` tells the step's end. Called only by the thread
        that runs the steps, so it needs no lock."""
        self._off_lock += seconds

    def take_off_lock(self) -> float:
        """The seconds ``off_lock`` reported since the last call."""
        seconds, self._off_lock = self._off_lock, 0.0
        return seconds

    def add(self, phase: str, seconds: float, cpu: float | None = None) -> None:
        """One ``phase`` of ``seconds`` (wall); ``cpu``: its thread's CPU seconds, if taken."""
        with self._lock:
            p = self._phases.get(phase)
            if p is None:
                p = self._phases[phase] = _Phase()
            p.counts[bucket_of(seconds)] += 1
            p.count += 1
            p.sum += seconds
            if seconds > p.max:
                p.max = seconds
            if cpu is not None:
                p.cpu += cpu
                p.cpu_wall += seconds

    def summary(self, *, reset: bool = False) -> dict[str, dict[str, float]]:
        """Per phase: count, total_s, and mean / p50 / p90 / p99 / max in milliseconds, and
        ``cpu_share`` where the phase recorded CPU time; ``reset``: start afresh after reading
        (a benchmark's next rate)."""
        out = {}
        with self._lock:
            for name, p in sorted(self._phases.items()):
                out[name] = {
                    "count": float(p.count),
                    "total_s": p.sum,
                    "mean_ms": 1e3 * p.sum / p.count,
                    "p50_ms": 1e3 * p.percentile(0.50),
                    "p90_ms": 1e3 * p.percentile(0.90),
                    "p99_ms": 1e3 * p.percentile(0.99),
                    "max_ms": 1e3 * p.max,
                }
                if p.cpu_wall > 0:
                    out[name]["cpu_share"] = p.cpu / p.cpu_wall
            if reset:
                self._phases = {}
        return out
