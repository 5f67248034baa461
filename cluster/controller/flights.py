"""The request table: every in-flight request, its committed tokens and who produces them.

Committed tokens are the ones already handed to the client's stream. A request that moves
(handoff, migration, crash) is resumed from prompt + committed tokens, and events from any
worker but the current owner are dropped, so the client never sees a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.workers.model.output import RequestText
from kvrelay.workers.types import FinishReason, Phase, TokenEvent


@dataclass(slots=True)
class Flight:
    req: GenerateRequest
    text: RequestText
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    committed: list[int] = field(default_factory=list)
    owner: str | None = None  # the worker whose events count
    phase: Phase = Phase.QUEUED
    moving: int = 0  # tasks driving this flight (dispatch, handoff, migration); >0: hands off
    # set by ``attach``: events go straight to ``sink``, and ``ended`` is done after the last
    sink: Callable[[list[TokenEvent]], None] | None = None
    ended: asyncio.Future[None] | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def done(self) -> bool:
        return self.phase == Phase.DONE

    def accept(self, event: TokenEvent) -> tuple[TokenEvent, bool]:
        """Commit an owner's event; returns (event with text, stop string hit). Latency figures
        are the frontends' to measure (they see what the client sees)."""
        self.committed += event.token_ids
        out, stop_hit = self.text.process(event)
        if out.finish_reason is not None:
            self.phase = Phase.DONE
        return out, stop_hit

    def emit(self, event: TokenEvent) -> None:
        """Hand an accepted event on: to the sink once attached, else to ``queue``."""
        if self.sink is None:
            self.queue.put_nowait(event)
            return
        self.sink([event])
        if event.finish_reason is not None and self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def attach(self, sink: Callable[[list[TokenEvent]], None]) -> asyncio.Future[None]:
        """From now on hand events to ``sink`` as they come (no task wakes per event), the
        queued ones first, up to the last one as a reader of ``queue`` takes them; the future
        is done once the last event went out. ``detach`` goes back to the queue."""
        self.ended = asyncio.get_running_loop().create_future()
        held: list[TokenEvent] = []
        while not self.queue.empty() and not (held and held[-1].finish_reason is not None):
            held.append(self.queue.get_nowait())
        if held:
            sink(held)
            if held[-1].finish_reason is not None:
                self.ended.set_result(None)
        self.sink = sink
        return self.ended

    def detach(self) -> None:
        self.sink = None

    def finish(self, reason: FinishReason) -> None:
        """End the stream from the controller's side (abort, unrecoverable error)."""
        if self.phase == Phase.DONE:
            return
        self.phase = Phase.DONE
        self.emit(TokenEvent(self.request_id, (), "", reason))
