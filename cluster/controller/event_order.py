"""Puts each worker's event deliveries back in the order the worker sent them.

A worker hands its engine steps' events to the controller as ``on_events`` calls, numbered from
0 by its sink (``cluster/runtime/actors.py``). The controller is an async Ray actor, and Ray
does not promise that an async actor runs one submitter's calls in submission order. Out of
order, a request's finishing step could be taken before an earlier step of the same request,
whose tokens would then find the request done and be dropped. (An H100 run of
benchmarks/serve_ratio.py had 1 and 65 tokens missing at the clients, out of 8192 and 32768,
while the engine had computed all of them; this reordering is the likely cause, not a proven
one.) Deliveries that arrive early wait here until the ones before them have come.
"""

from __future__ import annotations

from kvrelay.workers.types import TokenEvent


class EventOrder:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}  # per worker: the delivery number expected next
        self._early: dict[str, dict[int, list[TokenEvent]]] = {}

    def accept(self, worker_id: str, seq: int, events: list[TokenEvent]) -> list[TokenEvent]:
        """The events to apply now, in order: this delivery's and those it unblocked; none
        while an earlier delivery of the worker is still missing. A number below the expected
        one (not sent by a live sink) is applied at once rather than lost."""
        expected = self._next.get(worker_id, 0)
        if seq < expected:
            return events
        if seq > expected:
            self._early.setdefault(worker_id, {})[seq] = events
            return []
        ready = list(events)
        early = self._early.get(worker_id, {})
        expected += 1
        while expected in early:
            ready += early.pop(expected)
            expected += 1
        self._next[worker_id] = expected
        return ready

    def waiting(self, worker_id: str) -> int:
        """Deliveries of the worker held back (their predecessor has not arrived)."""
        return len(self._early.get(worker_id, {}))

    def forget(self, worker_id: str) -> None:
        self._next.pop(worker_id, None)
        self._early.pop(worker_id, None)
