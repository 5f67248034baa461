"""PhaseTimes: bucketed percentiles against numpy's exact ones on the same samples; a phase's
CPU share against a blocked and a computing thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from kvrelay.workers.engine.phase_times import BUCKETS_PER_OCTAVE, PhaseTimes, bucket_of, upper_edge
from kvrelay_testing.clock import spin

WIDTH = 2 ** (1 / BUCKETS_PER_OCTAVE)  # a bucket's upper edge over its lower


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_are_within_one_bucket_above_the_exact_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = np.exp(rng.normal(np.log(5e-3), 1.2, size=5000))  # ~5 ms, a heavy tail
    t = PhaseTimes()
    for x in samples:
        t.add("cycle", float(x))
    s = t.summary()["cycle"]
    assert s["count"] == 5000
    assert s["total_s"] == pytest.approx(samples.sum())
    assert s["max_ms"] == pytest.approx(1e3 * samples.max())
    for q in (50, 90, 99):
        exact = 1e3 * float(np.percentile(samples, q, method="inverted_cdf"))
        assert exact <= s[f"p{q}_ms"] <= exact * WIDTH * 1.0001, q


def test_bucket_edges_hold_their_values() -> None:
    for x in (2e-6, 1e-4, 3.3e-3, 0.05, 1.7):
        b = bucket_of(x)
        assert upper_edge(b - 1) <= x <= upper_edge(b) * 1.0000001


def test_reset_starts_afresh_and_threads_may_add_while_another_reads() -> None:
    t = PhaseTimes()
    stop = threading.Event()

    def add() -> None:
        while not stop.is_set():
            t.add("step", 1e-3)

    th = threading.Thread(target=add)
    th.start()
    try:
        seen = [t.summary(reset=True).get("step", {}).get("count", 0.0) for _ in range(50)]
    finally:
        stop.set()
        th.join()
    rest = t.summary().get("step", {}).get("count", 0.0)  # none since the last reset: 0
    assert sum(seen) + rest > 0
    t.add("step", 1e-3)
    assert t.summary(reset=True) and t.summary() == {}


def _share(fn: Callable[[], object]) -> float:
    t = PhaseTimes()
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    t.add("phase", time.perf_counter() - t0, time.thread_time() - c0)
    return t.summary()["phase"]["cpu_share"]


def test_cpu_share_tells_a_computing_phase_from_a_blocked_one() -> None:
    t = PhaseTimes()
    t.add("wall_only", 1e-3)
    assert "cpu_share" not in t.summary()["wall_only"]
    assert _share(lambda: threading.Event().wait(0.05)) < 0.2  # blocked: no CPU
    assert max(_share(lambda: spin(0.02)) for _ in range(3)) > 0.3  # computing
