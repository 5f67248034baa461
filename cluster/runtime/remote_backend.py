"""``ClusterBackend`` over the controller's Ray actor handle, for frontends that run in the
driver process (``kvrelay serve``), outside the controller.

    tokens:     one Ray streaming generator per backend (``controller.event_stream``) carries
                the events of all its requests: each item is everything ready when the
                controller's side woke, ``[(request_id, events or error), ...]`` (its events
                pickled by the controller, ``streams.pack``), so Ray objects per second follow
                decode steps, not requests x tokens. A reader task hands each request's events
                to its own queue, after taking every object already there (a reader that fell
                behind wakes each stream once for all of them); the request's stream takes all
                its queue holds when it wakes, as one event (``merge_events``), so a frontend
                that falls behind sends fewer, longer chunks. A request starts with
                ``start_request``; a stream closed early sends ``stop_request``, which aborts
                the request and frees its blocks.
    errors:     an ``ApiError`` the controller raises arrives as itself (UNAVAILABLE, 400, ...)
    controller gone (RayActorError, ActorUnavailableError):
                every call, and every stream in flight, raises UNAVAILABLE with a Retry-After;
                a dead controller (RayActorError) is remembered: readiness is NOT_SERVING and
                new requests are refused at once, so ``kvrelay serve`` can flush the error
                events and exit (cluster/runtime/serve_loop.py).
    controller hung (alive but silent, e.g. SIGSTOP): Ray never fails the awaits on it, so
                ``kvrelay serve``'s liveness probe calls ``give_up``: every await on the
                controller in flight wakes with the same UNAVAILABLE as a death.

The frontends read ``models``, ``tokenizer`` and ``readiness`` synchronously: the first two are
fixed at start; readiness is refreshed by ``watch`` every ``interval_s`` and after every admin
call that changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from kvrelay.cluster.api.backend import (
    ClusterStatus,
    GenerateRequest,
    ModelInfo,
    Readiness,
    TokenizerLike,
)
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.controller.streams import Item, Mailbox, Packed, unpack
from kvrelay.cluster.metrics.loop_lag import watch_loop_lag
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.types import TokenEvent, merge_events

log = logging.getLogger(__name__)
T = TypeVar("T")
REPORT_CAP = 10_000  # delivery times kept a hop between two reports to the controller
# ended requests' figures go to the controller's metrics in one call at most this long after
# the first of them ended (one call per request was a third of a request's calls to the actor
# whose loop every token passes), or as soon as this many wait
OBSERVE_FLUSH_S = 0.1
OBSERVE_BATCH = 256
# this process's hops: the metric's ``hop`` label -> the ``delivery`` phase that times it too
_PHASE_OF_HOP = {"controller_to_frontend": "from_controller", "frontend_loop_lag": "loop_lag"}
RETRY_AFTER_S = 10.0  # a supervisor restarts ``kvrelay serve`` in about its cold start


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class RemoteBackend:
    def __init__(
        self, controller: Any, models: Sequence[ModelInfo], tokenizer: TokenizerLike
    ) -> None:
        self._controller = controller
        self._models = tuple(models)
        self._tokenizer = tokenizer
        self._readiness = Readiness(False, problem="controller not asked yet")
        self.death: str | None = None  # why the controller is gone for good, once it is
        self._gone: asyncio.Future[None] | None = None  # done once ``death`` is set
        self._inboxes: dict[str, Mailbox[list[TokenEvent] | Exception]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stream_id = ""
        self.batches_received = 0  # Ray objects the event stream brought (for benchmarks)
        self.calls: Counter[str] = Counter()  # Ray calls made to the controller, by method
        self.admitted_here = 0  # requests ``admit`` let through without a call
        # a token's time in this process: from_controller (the controller's pack to this
        # reader, needs both clocks to agree) and inbox_wait (routed to its request's inbox
        # until that request's frontend stream takes it); the loop's own lag (watch_loop)
        self.delivery = PhaseTimes()
        # the same times, not yet sent to the controller's kvrelay_event_delivery_seconds
        # (``watch`` sends them about once a second; at most REPORT_CAP kept a hop meanwhile)
        self._unreported: dict[str, list[float]] = {hop: [] for hop in _PHASE_OF_HOP}
        # ended requests' figures not yet sent (``observe_request_finished``)
        self._observed: list[tuple[str, str, dict[str, Any]]] = []
        self._observe_timer: asyncio.TimerHandle | None = None

    # ---- read synchronously by the frontends ----------------------------------------------
    def models(self) -> Sequence[ModelInfo]:
        return self._models

    def tokenizer(self, model: str) -> TokenizerLike:
        return self._tokenizer

    def readiness(self) -> Readiness:
        return self._readiness

    async def refresh(self) -> Readiness:
        try:
            self._readiness = await self._call("readiness")
        except ApiError as err:
            self._readiness = Readiness(False, problem=err.message)
        return self._readiness

    async def watch(self, interval_s: float = 0.2, report_s: float = 1.0) -> None:
        """Readiness from the controller every ``interval_s``; this process's delivery times
        to its metrics every ``report_s``."""
        reported = time.monotonic()
        while self.death is None:
            try:
                await self.refresh()
            except Exception:  # a readiness probe never takes the frontends down
                log.exception("readiness from the controller failed")
            if time.monotonic() - reported >= report_s:
                reported = time.monotonic()
                try:
                    await self._report_delivery()
                except Exception:  # figures lost, nothing else
                    log.warning("delivery times not reported to the controller", exc_info=True)
            await asyncio.sleep(interval_s)

    async def _report_delivery(self) -> None:
        for hop, times in self._unreported.items():
            if times:
                self._unreported[hop] = []
                await self._call("observe_delivery", hop, times)

    def _unreported_time(self, hop: str, seconds: float) -> None:
        self.delivery.add(_PHASE_OF_HOP[hop], seconds)
        times = self._unreported[hop]
        if len(times) < REPORT_CAP:  # a controller that stopped answering: keep the first
            times.append(seconds)

    async def watch_loop(self) -> None:
        """Record this event loop's lag as ``loop_lag`` (cluster/metrics/loop_lag.py): what
        every stream on this loop waits besides its own work; runs until cancelled."""
        await watch_loop_lag(lambda late: self._unreported_time("frontend_loop_lag", late))

    # ---- calls ------------------------------------------------------------------------------
    def _unavailable(self, why: str) -> ApiError:
        return ApiError(
            ErrorCode.UNAVAILABLE,
            f"{why}; retry after {RETRY_AFTER_S:g} s",
            retry_after_s=RETRY_AFTER_S,
        )

    def give_up(self, why: str) -> None:
        """The controller is gone for good (dead, or hung past ``kvrelay serve``'s liveness
        probes): readiness NOT_SERVING, every await on it in flight and every later call raise
        UNAVAILABLE. Call on the frontends' event loop."""
        if self.death is None:
            self.death = why
            self._readiness = Readiness(False, problem=why)
            log.error("%s: in-flight and new requests get UNAVAILABLE", why)
            for inbox in self._inboxes.values():  # the streams waiting on their next events
                inbox.put(self._unavailable(why))
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def _unless_gone(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, unless the controller is given up on first (UNAVAILABLE)."""
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.death is not None:
                self._gone.set_result(None)
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((task, self._gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled (its client went away)
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            raise self._unavailable(self.death or "the controller is gone")
        return task.result()

    def _translate(self, exc: Exception) -> Exception:
        """The error a frontend should raise for a failed controller call."""
        if isinstance(exc, RayActorError):
            self.give_up(f"the controller died ({_first_line(exc)})")
            return self._unavailable(self.death or "the controller died")
        if isinstance(exc, ActorUnavailableError):  # may come back (restarting, network)
            return self._unavailable(f"the controller is unreachable ({_first_line(exc)})")
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, ApiError):
            return exc.cause
        return exc

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.death is not None:
            raise self._unavailable(self.death)
        self.calls[method] += 1
        try:
            return await self._unless_gone(
                getattr(self._controller, method).remote(*args, **kwargs)
            )
        except (RayActorError, ActorUnavailableError, RayTaskError) as exc:
            raise self._translate(exc) from exc

    async def admit(self, request: GenerateRequest) -> None:
        """While the controller's last readiness (``watch`` refreshes it every 0.2 s) says
        ready and the prompt fits the longest it holds, admitted here without a call: the
        controller's dispatch still waits (bounded) for a worker with room and answers
        UNAVAILABLE as its ``admit`` would. Otherwise the controller's ``admit`` decides
        (it waits for a worker, or refuses a prompt no pool can hold)."""
        ready = self._readiness
        limit = ready.largest_prompt
        if ready.ready and limit is not None and len(request.prompt_token_ids) <= limit:
            self.admitted_here += 1
            return
        await self._call("admit", request)

    def _read_events(self) -> None:
        """Start the reader of this backend's event stream unless it runs."""
        if self._reader is None or self._reader.done():
            self._stream_id = uuid.uuid4().hex
            self._reader = asyncio.create_task(self._read(self._stream_id))

    async def _read(self, stream_id: str) -> None:
        stream = self._controller.event_stream.remote(stream_id)
        try:
            while True:
                try:
                    ref = await self._unless_gone(stream.__anext__())
                except StopAsyncIteration:
                    raise self._unavailable("the controller closed the event stream") from None
                items = self._unpack(await self._unless_gone(ref))
                try:  # objects that came while this loop was busy are taken now, before any
                    # request's stream wakes: each stream sends their tokens as one chunk
                    while stream.next_ready():
                        items += self._unpack(ray.get(next(stream)))
                finally:  # an error in a later object goes after the events before it
                    for rid, item in items:
                        inbox = self._inboxes.get(rid)
                        if inbox is not None:  # else its client went away
                            inbox.put(item)
        except (RayActorError, ActorUnavailableError, RayTaskError, ApiError) as exc:
            err = self._translate(exc) if not isinstance(exc, ApiError) else exc
            for inbox in self._inboxes.values():  # every request in flight ends with it
                inbox.put(err)
        finally:
            with contextlib.suppress(Exception):
                ray.cancel(stream)

    def _unpack(self, packed: Packed) -> list[Item]:
        self.batches_received += 1
        self._unreported_time("controller_to_frontend", max(0.0, time.time() - packed[2]))
        return unpack(packed)

    @property
    def open_streams(self) -> int:
        """Requests whose events the reader still routes (their streams have not ended)."""
        return len(self._inboxes)

    async def close(self) -> None:
        """Stop reading the event stream (the frontends are stopping); the ended requests'
        figures still waiting go to the controller first."""
        self.flush_observed()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        if self.death is not None:
            raise self._unavailable(self.death)
        rid = request.request_id
        if rid in self._inboxes:
            raise ValueError(f"request id {rid!r} is already in flight")
        inbox: Mailbox[list[TokenEvent] | Exception] = Mailbox(self.delivery, "inbox_wait")
        self._inboxes[rid] = inbox
        self._read_events()
        finished = False
        try:
            await self._call("start_request", self._stream_id, request)
            error: Exception | None = None
            while error is None:
                # all that came while the frontend was busy: one event (``give_up`` and a
                # failed stream put their error here, after the events that came before it)
                events: list[TokenEvent] = []
                for item in await inbox.take():
                    if isinstance(item, Exception):
                        error = item
                        break
                    events += item
                if not events:
                    continue
                event = merge_events(events)
                # the controller ended the request: nothing to stop, also when the frontend
                # closes this generator at the last event instead of asking for more
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
            raise error
        finally:
            del self._inboxes[rid]
            if not finished and self.death is None:  # the client went away (or an error)
                self.calls["stop_request"] += 1
                with contextlib.suppress(Exception):
                    self._controller.stop_request.remote(rid)

    async def cancel(self, request_id: str) -> bool:
        return bool(await self._call("cancel", request_id))

    async def cluster_status(self) -> ClusterStatus:
        status: ClusterStatus = await self._call("cluster_status")
        return status

    # these change readiness: the caller's next /ready must already tell (read your writes)
    async def drain(self, worker_id: str) -> bool:
        done = bool(await self._call("drain", worker_id))
        await self.refresh()
        return done

    async def undrain(self, worker_id: str) -> bool:
        done = bool(await self._call("undrain", worker_id))
        await self.refresh()
        return done

    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool:
        done = bool(await self._call("notify_preemption", worker_id, deadline_s))
        await self.refresh()
        return done

    # ---- metrics: the registry is the controller's ------------------------------------------
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
    ) -> None:
        """``RequestObserver``: the figures wait for the next fire-and-forget call, which takes
        every request ended within ``OBSERVE_FLUSH_S`` of the first (``OBSERVE_BATCH`` at most);
        without a running event loop to time that, the call goes now."""
        if self.death is not None:
            return
        figures = {
            "ttft_s": ttft_s, "itl_s_list": list(itl_s_list), "e2e_s": e2e_s,
            "queue_s": queue_s, "prompt_tokens": prompt_tokens,
            "generation_tokens": generation_tokens, "cached_tokens": cached_tokens,
        }  # fmt: skip
        self._observed.append((model, outcome, figures))
        if len(self._observed) >= OBSERVE_BATCH:
            self.flush_observed()
        elif self._observe_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_observed()
                return
            self._observe_timer = loop.call_later(OBSERVE_FLUSH_S, self.flush_observed)

    def flush_observed(self) -> None:
        """Send the waiting figures now, in one call (none: no call)."""
        if self._observe_timer is not None:
            self._observe_timer.cancel()
            self._observe_timer = None
        batch, self._observed = self._observed, []
        if batch and self.death is None:
            self.calls["observe_requests_finished"] += 1
            self._controller.observe_requests_finished.remote(batch)

    async def render_metrics(self) -> bytes:
        body: bytes = await self._call("render_metrics")
        return body
