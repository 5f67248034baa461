"""An asyncio loop's own lag: how late a short sleep wakes. Everything ready on that loop (a
stream's next token, a worker's events) waits about as long, whatever its own cost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def watch_loop_lag(record: Callable[[float], None], interval_s: float = 0.02) -> None:
    """``record(seconds late)`` after every ``interval_s`` sleep; runs until cancelled."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(interval_s)
        record(max(0.0, time.monotonic() - start - interval_s))
