"""One gate per process between a CUDA graph capture and the other threads' GPU work.

A worker captures decode graphs on its engine thread while other threads use the same GPU: the
KV transport maps, copies and synchronises blocks, the swap thread copies between tiers, and a
semi-PD worker's other lane runs its forward pass. Capturing in ``thread_local`` error mode is
not enough: torch's caching allocator, serving an allocation on another thread, polls events
that the capture recorded and so invalidates it (pytorch/pytorch#193982). On an H100 a capture
failed that way, 'operation failed due to a previous error during capture', while a thread
allocated and synchronised on a side stream, and that thread's synchronise failed too.

So GPU work outside the engine thread runs inside ``GPU_GATE.work()`` and a capture inside
``GPU_GATE.capture()``: a capture waits until no other thread is inside ``work`` and keeps new
work out until it ends (a capture takes milliseconds); work sections never wait for each other.
Both are re-entrant per thread, and a thread's own work never blocks its capture (a semi-PD
lane captures inside its own forward section). Work sections hold only device work, never a
wait on a peer, so a capture waits at most for the copies and kernels already under way. Two
threads that each capture inside their own work section would wait for each other: the second
to come raises ``CaptureContended`` instead (a RuntimeError, which the graph runner treats as a
failed capture: that step runs eagerly and the bucket is tried again later).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CaptureContended(RuntimeError):
    """A capture from inside a work section while another thread captures or waits to."""


class GpuGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._capturing: int | None = None  # the capturing thread
        self._waiting = 0  # captures waiting for work sections to end
        self._work: dict[int, int] = {}  # thread -> depth of its work sections
        self.captures = 0
        self.capture_waits = 0  # captures that had to wait for another thread's work

    def _others_working(self, me: int) -> bool:
        return any(t != me for t in self._work)

    @contextmanager
    def capture(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._capturing == me:  # nested capture section of the same thread
                outer = True
            else:
                outer = False
                if me in self._work and (self._capturing is not None or self._waiting):
                    raise CaptureContended("another thread is capturing a CUDA graph")
                self._waiting += 1
                try:
                    if self._capturing is not None or self._others_working(me):
                        self.capture_waits += 1
                    self._cond.wait_for(
                        lambda: self._capturing is None and not self._others_working(me)
                    )
                finally:
                    self._waiting -= 1
                self._capturing = me
                self.captures += 1
        try:
            yield
        finally:
            if not outer:
                with self._cond:
                    self._capturing = None
                    self._cond.notify_all()

    @contextmanager
    def work(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me not in self._work and self._capturing != me:
                self._cond.wait_for(lambda: self._capturing is None and self._waiting == 0)
            self._work[me] = self._work.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                depth = self._work[me] - 1
                if depth:
                    self._work[me] = depth
                else:
                    del self._work[me]
                    self._cond.notify_all()


GPU_GATE = GpuGate()
