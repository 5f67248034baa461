"""The request table: every in-flight request, its committed tokens and who produces them.

Committed tokens are the ones already handed to the client's stream. A request that moves
(handoff, migration, crash) is resumed from prompt + committed tokens, and events from any
worker but the current owner are dropped, so the client never sees a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvrelay.cluster.backend import GenerateRequest
from kvrelay.workers.output import RequestText
from kvrelay.workers.types import FinishReason, TokenEvent

# phases of a flight
QUEUED, PREFILL, HANDOFF, DECODE, DONE = "queued", "prefill", "handoff", "decode", "done"


@dataclass(slots=True)
class Flight:
    req: GenerateRequest
    text: RequestText
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    committed: list[int] = field(default_factory=list)
    owner: str | None = None  # the worker whose events count
    prefill_worker: str | None = None
    phase: str = QUEUED
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    itl: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    resumes: int = 0  # re-dispatches after a crash or a preemption
    migrations: int = 0
    moving: int = 0  # tasks driving this flight (dispatch, handoff, migration); >0: hands off
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def done(self) -> bool:
        return self.phase == DONE

    def accept(self, event: TokenEvent) -> tuple[TokenEvent, bool]:
        """Commit an owner's event; returns (event with text, stop string hit)."""
        now = time.monotonic()
        if event.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
            elif self.last_token_at is not None:
                gap = (now - self.last_token_at) / len(event.token_ids)
                self.itl.extend([gap] * len(event.token_ids))
            self.last_token_at = now
        self.committed += event.token_ids
        self.cached_tokens = max(self.cached_tokens, event.cached_prompt_tokens)
        out, stop_hit = self.text.process(event)
        if out.finish_reason is not None:
            self.phase = DONE
            self.finish_reason = out.finish_reason
        return out, stop_hit

    def finish(self, reason: FinishReason) -> None:
        """End the stream from the controller's side (abort, unrecoverable error)."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self.finish_reason = reason
        self.queue.put_nowait(TokenEvent(self.request_id, (), "", reason))
