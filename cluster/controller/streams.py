"""One event stream per frontend process, carrying the events of all its requests.

A frontend process (``kvrelay serve``'s driver, through ``RemoteBackend``) opens one stream
(``serve``, a Ray streaming generator) and starts its requests on it (``start``); every item the
stream yields is ``[(request_id, events or the request's error), ...]``: everything ready when
the stream woke, so one Ray object per decode step, not per request per token; a request's
events in it are merged into one (``merge_events``: a reader that fell behind gets k tokens in
one event), its error after them. What crosses Ray is ``pack``'s: the events as plain rows
pickled with the C pickler, the errors left to Ray (``unpack`` restores the list).

    start(stream, request) ─▶ a pump task runs the request (``run_request``), which hands its
                              events to the stream's outbox as they come; an error ends up
                              there too, for that request only
    stop(request_id)       ─▶ the pump is cancelled: the request is aborted, its blocks freed
    the stream closes      ─▶ every request still on it is stopped; a later ``start`` on it
                              is refused (UNAVAILABLE), so no pump runs into an unread outbox
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.types import TokenEvent, events_from_bytes, events_to_bytes, merge_events

Item = tuple[str, list[TokenEvent] | Exception]
# the events pickled; the errors; the sender's time.time() (the reader's ``from_controller``)
Packed = tuple[bytes, list[tuple[str, Exception]], float]
# runs a request to its end, handing its events to the callback as they come
Run = Callable[[GenerateRequest, Callable[[list[TokenEvent]], None]], Awaitable[None]]
T = TypeVar("T")


class Mailbox(Generic[T]):
    """Items for one reader that takes all of them at each wake-up: ``put`` appends (never
    waits; wakes the reader if it waits), ``take`` returns everything put since the last take,
    in order, and waits only while there is nothing. Both ends of the event stream read this
    way; an ``asyncio.Queue`` cost a ``put_nowait`` and a ``get_nowait`` per item (~15 % of
    ``controller_bench``'s cProfile) to hand over the same list.

    ``times``: each ``take`` records, as ``phase``, how long its oldest item waited in the box
    (the reader's lag: its event loop busy elsewhere)."""

    __slots__ = ("_items", "_phase", "_since", "_times", "_waiter")

    def __init__(self, times: PhaseTimes | None = None, phase: str = "mailbox_wait") -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None  # the reader's, while it waits
        self._times = times
        self._phase = phase
        self._since = 0.0  # when the oldest item still here was put (monotonic s)

    def put(self, item: T) -> None:
        if not self._items and self._times is not None:
            self._since = time.monotonic()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[T]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        if self._times is not None:
            self._times.add(self._phase, time.monotonic() - self._since)
        return items

    def __len__(self) -> int:
        return len(self._items)


class EventStreams:
    """``times``: each stream's outbox records its reader's lag as ``stream_wait``."""

    def __init__(self, run: Run, times: PhaseTimes | None = None) -> None:
        self._run = run
        self._times = times
        self._outboxes: dict[str, Mailbox[Item]] = {}
        self._pumps: dict[str, tuple[str, asyncio.Task[None]]] = {}  # request id -> stream, pump
        self._closed: set[str] = set()  # streams that ended (one per frontend process gone)

    async def serve(self, stream_id: str) -> AsyncIterator[list[Item]]:
        box = self._outboxes.setdefault(stream_id, self._mailbox())
        try:
            while True:
                yield _merged(await box.take())
        finally:
            self._closed.add(stream_id)
            del self._outboxes[stream_id]
            for rid, (sid, _) in list(self._pumps.items()):
                if sid == stream_id:
                    self.stop(rid)

    def start(self, stream_id: str, request: GenerateRequest) -> None:
        rid = request.request_id
        if stream_id in self._closed:
            raise ApiError(ErrorCode.UNAVAILABLE, "this frontend's event stream has closed")
        if rid in self._pumps:
            raise ValueError(f"request id {rid!r} is already in flight")
        # the stream's generator may start after its first request does (two Ray calls)
        box = self._outboxes.setdefault(stream_id, self._mailbox())
        task = asyncio.create_task(self._pump(box, request))
        self._pumps[rid] = (stream_id, task)
        task.add_done_callback(lambda _: self._forget(rid, task))

    def _mailbox(self) -> Mailbox[Item]:
        return Mailbox(self._times, "stream_wait")

    def stop(self, request_id: str) -> bool:
        entry = self._pumps.pop(request_id, None)
        if entry is None:
            return False
        entry[1].cancel()  # run_request's ``finally`` aborts the request everywhere
        return True

    def held(self) -> tuple[int, int]:
        """(requests with a pump, items waiting in the outboxes): both 0 when idle and read."""
        return len(self._pumps), sum(map(len, self._outboxes.values()))

    def _forget(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self._pumps.get(request_id, (None, None))[1] is task:
            del self._pumps[request_id]

    async def _pump(self, box: Mailbox[Item], request: GenerateRequest) -> None:
        rid = request.request_id
        try:
            await self._run(request, lambda events: box.put((rid, events)))
        except Exception as exc:  # this request's error, for this request only
            box.put((rid, exc))


def _merged(items: list[Item]) -> list[Item]:
    """One event per request (its events in order, merged), then the errors (a request's error
    is its last item, so it stays after its events)."""
    events: dict[str, list[TokenEvent]] = {}
    errors: list[Item] = []
    for rid, item in items:
        if isinstance(item, Exception):
            errors.append((rid, item))
        elif rid in events:  # a new list: the first one is the emitter's
            events[rid] = events[rid] + item
        else:  # the usual case at one delivery a wake-up: the request's only item
            events[rid] = item
    merged: list[Item] = [
        (rid, evs if len(evs) == 1 else [merge_events(evs)]) for rid, evs in events.items() if evs
    ]
    return merged + errors


def pack(items: list[Item]) -> Packed:
    """A stream item as it crosses Ray: the requests' events as plain rows pickled here with
    the C pickler (``events_to_bytes``: 128 events ~25 us; Ray's cloudpickle calls its Python
    ``reducer_override`` per object: ~200 us), the errors as objects for Ray to send as it
    does. ``_merged`` gives each request one event, which carries the request's id, and puts
    the errors last, so ``unpack`` keeps the order."""
    events = [ev for _, item in items if not isinstance(item, Exception) for ev in item]
    errors = [(rid, item) for rid, item in items if isinstance(item, Exception)]
    return events_to_bytes(events), errors, time.time()


def unpack(packed: Packed) -> list[Item]:
    blob, errors, _ = packed
    # from our own controller actor, as Ray's objects are
    items: list[Item] = [(ev.request_id, [ev]) for ev in events_from_bytes(blob)]
    return items + list(errors)
