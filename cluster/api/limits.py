"""Admission control shared by both frontends: a bounded number of concurrent streams and a
bounded FIFO of requests waiting for one. Nothing here grows without bound.

    acquire():  running < max_streams and nobody waiting  -> admitted at once
                len(waiting) < max_queue                  -> wait (FIFO) up to `timeout`
                otherwise                                 -> RESOURCE_EXHAUSTED(retry_after_s)

A released slot passes straight to the oldest waiter (``running`` does not drop), so a burst
cannot overtake the queue.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field

from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.api.validation import ValidationLimits


@dataclass(frozen=True, slots=True)
class FrontendLimits:
    max_streams: int = 256  # requests admitted to the backend at once
    max_queue: int = 1024  # requests waiting for a stream slot
    queue_timeout_s: float = 60.0  # a waiting request gives up after this (RESOURCE_EXHAUSTED)
    retry_after_s: float = 1.0  # the hint sent with RESOURCE_EXHAUSTED / 429
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC message / HTTP body
    validation: ValidationLimits = field(default_factory=ValidationLimits)

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.max_queue < 0:
            raise ValueError("max_streams must be >= 1 and max_queue >= 0")
        if not (math.isfinite(self.retry_after_s) and self.retry_after_s > 0):
            raise ValueError("retry_after_s must be a positive number")
        if self.queue_timeout_s <= 0 or self.max_message_bytes < 1024:
            raise ValueError("queue_timeout_s must be > 0 and max_message_bytes >= 1024")


class Admission:
    def __init__(self, limits: FrontendLimits) -> None:
        self._limits = limits
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)  # every entry is pending: granted and abandoned ones leave

    def _exhausted(self, why: str) -> ApiError:
        return ApiError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"{why}; retry after {self._limits.retry_after_s:g} s",
            retry_after_s=self._limits.retry_after_s,
        )

    async def acquire(self, timeout_s: float | None = None) -> None:
        """Take a stream slot (pair with ``release``) or raise RESOURCE_EXHAUSTED."""
        lim = self._limits
        if self._running < lim.max_streams and not self.waiting:
            self._running += 1
            return
        if self.waiting >= lim.max_queue:
            raise self._exhausted(
                f"server busy: {self._running} streams running, {self.waiting} queued"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        wait_s = lim.queue_timeout_s if timeout_s is None else min(timeout_s, lim.queue_timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(wait_s, 0.0))
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived as we gave up: pass it on
            else:
                fut.cancel()
                self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                raise self._exhausted(f"waited {wait_s:g} s in the queue") from None
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set_result(None)  # hand the slot over; running stays
            return
        self._running -= 1

    def check_integrity(self) -> None:
        assert 0 <= self._running <= self._limits.max_streams, self._running
        assert self.waiting <= self._limits.max_queue, self.waiting
        assert all(not w.done() for w in self._waiters)
