"""An asyncio loop's own lag: how late a short sleep wakes. Everything ready on that loop (a
stream's next token, a worker's events) waits about as long, whatever its own cost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence


async def watch_loop_lag(record: Callable[[float], None], interval_s: float = 0.02) -> None:
    """``record(seconds late)`` after every ``interval_s`` sleep; runs until cancelled."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(interval_s)
        record(max(0.0, time.monotonic() - start - interval_s))


def lag_summary_ms(lags: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max (nearest rank) of lag samples in seconds, as ms, and their count
    (``ticks``); zeros without samples."""
    if not lags:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "ticks": 0.0}
    s = sorted(lags)

    def at(q: float) -> float:
        return 1e3 * s[min(len(s) - 1, int(q * len(s)))]

    return {"p50": at(0.5), "p99": at(0.99), "max": 1e3 * s[-1], "ticks": float(len(s))}
