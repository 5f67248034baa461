"""What the gRPC and HTTP frontends share: auth, validation, admission and one request's stream.

    stream = await core.start(raw, authorization, deadline_s)   # raises ApiError, holds nothing
    try:
        async for event in stream.events(): ...                 # backend TokenEvents
    finally:
        await stream.close()                                    # idempotent; frees everything

``close`` closes the backend iterator (the backend then frees the request's blocks), releases
the stream slot and forgets the request id, whether the stream ended, failed or was abandoned
because the client went away.

Every request that reaches ``start`` is reported once to the optional ``RequestObserver``
(cluster/metrics/recorder.py's ``Metrics`` is one): outcome finished_stop | finished_length | aborted
(Cancel or client gone) | error (the backend failed) | rejected (auth, validation, admission).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from kvrelay.cluster.api.auth import OPEN, ApiKeys, Caller
from kvrelay.cluster.api.backend import ClusterBackend, GenerateRequest
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.api.limits import Admission, FrontendLimits
from kvrelay.cluster.api.validation import RawGenerate, build_request, check_request_id
from kvrelay.workers.types import FinishReason, TokenEvent

log = logging.getLogger(__name__)
_OUTCOME = {
    FinishReason.STOP: "finished_stop",
    FinishReason.LENGTH: "finished_length",
    FinishReason.ABORT: "aborted",
}


class RequestObserver(Protocol):
    """Told about every request once it ends (the signature of ``Metrics``' method)."""

    def observe_request_finished(
        self,
        model: str,
        outcome: str,
        ttft_s: float | None = None,
        itl_s_list: Sequence[float] = (),
        e2e_s: float | None = None,
        queue_s: float | None = None,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Timing:
    queue_s: float
    ttft_s: float  # 0 when no token was produced
    e2e_s: float


class RequestStream:
    """One admitted request. Not reusable: ``events`` may be iterated once."""

    def __init__(self, core: FrontendCore, request: GenerateRequest, t0: float, queue_s: float):
        self._core = core
        self.request = request
        self._t0 = t0
        self._queue_s = queue_s
        self._ttft_s = 0.0
        self._completion = 0
        self._cached = 0
        self._closed = False
        self._iter: AsyncIterator[TokenEvent] | None = None
        self._last_token_t = 0.0
        self._itl: list[float] = []  # gaps between tokens (bounded by max_tokens)
        self._failed = False
        self.finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def usage(self) -> Usage:
        return Usage(len(self.request.prompt_token_ids), self._completion, self._cached)

    def timing(self) -> Timing:
        return Timing(self._queue_s, self._ttft_s, time.monotonic() - self._t0)

    async def events(self) -> AsyncGenerator[TokenEvent, None]:
        if self._core.take_cancel_flag(self.request_id):  # cancelled while queued
            self.finish_reason = FinishReason.ABORT
            yield TokenEvent(self.request_id, (), finish_reason=FinishReason.ABORT)
            return
        self._iter = self._core.backend.generate(self.request)
        try:
            async for event in self._iter:
                self._track(event)
                yield event
                if event.finish_reason is not None:
                    return
                if self._core.take_cancel_flag(self.request_id):  # Cancel won the race
                    self.finish_reason = FinishReason.ABORT
                    yield TokenEvent(self.request_id, (), finish_reason=FinishReason.ABORT)
                    return
        except Exception:
            self._failed = True
            raise

    def _track(self, event: TokenEvent) -> None:
        """Count the event's tokens and time them (a plain call: one async generator fewer
        between the backend and the frontend per chunk)."""
        if event.token_ids:
            now = time.monotonic()
            if not self._ttft_s:
                self._ttft_s = now - self._t0
            else:  # an event of k tokens (a stream that fell behind): k gaps of 1/k each
                k = len(event.token_ids)
                self._itl += [(now - self._last_token_t) / k] * k
            self._last_token_t = now
        self._completion += len(event.token_ids)
        self._cached = max(self._cached, event.cached_prompt_tokens)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self._iter, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._core.finish(self.request_id)
            if self._failed:
                outcome = "error"
            elif self.finish_reason is None:
                outcome = "aborted"  # the client went away (or its deadline passed)
            else:
                outcome = _OUTCOME[self.finish_reason]
            u = self.usage
            self._core.observe(
                self.request.model,
                outcome,
                ttft_s=self._ttft_s or None,
                itl_s_list=self._itl,
                e2e_s=time.monotonic() - self._t0,
                queue_s=self._queue_s,
                prompt_tokens=u.prompt_tokens,
                generation_tokens=u.completion_tokens,
                cached_tokens=min(u.cached_tokens, u.prompt_tokens),
            )


@dataclass(slots=True)
class _InFlight:
    owner: Caller
    cancelled: bool = False


class FrontendCore:
    def __init__(
        self,
        backend: ClusterBackend,
        keys: ApiKeys,
        limits: FrontendLimits,
        observer: RequestObserver | None = None,
    ) -> None:
        self.backend = backend
        self.observer = observer
        self.keys = keys
        self.limits = limits
        self.admission = Admission(limits)
        # request id -> who started it, and whether Cancel was asked; from acceptance to close
        self._in_flight: dict[str, _InFlight] = {}
        self._admitting = True

    def stop_admitting(self) -> None:
        """Graceful shutdown: refuse new requests (UNAVAILABLE); those in flight go on."""
        self._admitting = False

    def authorize(self, authorization: str | None, *, admin: bool) -> Caller:
        return self.keys.check(authorization, admin=admin)

    def observe(self, model: str, outcome: str, **figures: object) -> None:
        if self.observer is None:
            return
        try:
            self.observer.observe_request_finished(model, outcome, **figures)  # type: ignore[arg-type]
        except Exception:  # metrics never break serving
            log.exception("request observer failed")

    async def start(
        self,
        raw: RawGenerate,
        *,
        deadline_s: float | None = None,
        id_prefix: str = "",
        caller: Caller = OPEN,
    ) -> RequestStream:
        """Validate, tokenize and admit ``raw`` (auth is the caller's first step; ``caller`` is
        what it returned, the only one besides admins who may cancel the request)."""
        try:
            return await self._start(raw, deadline_s, id_prefix, caller)
        except ApiError:
            self.observe(raw.model, "rejected")
            raise

    async def _start(
        self, raw: RawGenerate, deadline_s: float | None, id_prefix: str, caller: Caller
    ) -> RequestStream:
        t0, arrival_s = time.monotonic(), time.time()
        if not self._admitting:
            raise ApiError(ErrorCode.UNAVAILABLE, "server is shutting down", retry_after_s=1.0)
        if raw.request_id:
            request_id = check_request_id(raw.request_id)
            if request_id in self._in_flight:
                raise ApiError(
                    ErrorCode.ALREADY_EXISTS,
                    f"request {request_id!r} is already in flight",
                    param="request_id",
                )
        else:
            request_id = id_prefix + uuid.uuid4().hex
        request = replace(
            await build_request(raw, self.backend, self.limits.validation, request_id),
            arrival_s=arrival_s,
        )
        if request_id in self._in_flight:  # another request took the id while we tokenized
            raise ApiError(ErrorCode.ALREADY_EXISTS, f"request {request_id!r} is already in flight")
        self._in_flight[request_id] = _InFlight(caller)
        try:
            await self.backend.admit(request)  # may wait for a worker; 503 / 400 otherwise
            timeout = None if deadline_s is None else deadline_s - time.time()
            await self.admission.acquire(timeout)
        except BaseException:
            del self._in_flight[request_id]
            raise
        return RequestStream(self, request, t0, time.monotonic() - t0)

    def take_cancel_flag(self, request_id: str) -> bool:
        entry = self._in_flight.get(request_id)
        return entry is not None and entry.cancelled

    def finish(self, request_id: str) -> None:
        if self._in_flight.pop(request_id, None) is not None:
            self.admission.release()

    async def cancel(self, request_id: str, caller: Caller = OPEN) -> bool:
        """Cancel an in-flight request; False when this frontend does not know it or ``caller``
        may not cancel it (the same answer: a request id reveals nothing about other users'
        requests). A request this frontend did not start is left to admin keys."""
        entry = self._in_flight.get(request_id)
        if not caller.may_cancel(entry.owner if entry is not None else OPEN):
            return False
        if entry is not None:
            entry.cancelled = True
            with contextlib.suppress(Exception):
                await self.backend.cancel(request_id)
            return True
        return await self.backend.cancel(request_id)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
