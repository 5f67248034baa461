"""The controller: worker registry and health, the request table, routing, the PD handoff
and recovery. It answers what ``ClusterBackend`` asks (admit, readiness, cancel, the admin
calls); the frontends run in the driver process and reach it through ``RemoteBackend``
(cluster/runtime/remote_backend.py), the events of all its requests crossing Ray on one stream
(``event_stream``, streams.py), so a controller that dies cannot take the frontends' sockets
with it.

A request's path (DESIGN.md)::

    generate ─▶ route P ─▶ P.submit(prefill_only) ─▶ first token event (P parks the request)
            ─▶ handoff task: D.reserve ─▶ P.send_kv ‖ D.recv_kv ─▶ D.accept_prefilled ─▶ P.finish
            ─▶ D's events stream to the client until the finish reason

With only colocated workers, or when every decode worker refuses, the request decodes where
it was prefilled. A dead worker's requests are re-dispatched from prompt + committed tokens.

Split by responsibility (this folder): the registry and request table are state.py's
ControllerState; the handoff transaction is in handoff.py, heartbeats and worker figures in
health.py, the admin and operator surface in admin.py; this file keeps dispatch and recovery.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from kvrelay.cluster.api.backend import (
    ClusterStatus,
    GenerateRequest,
    ModelInfo,
    Readiness,
    TokenizerLike,
)
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.controller.admin import Admin
from kvrelay.cluster.controller.capacity import PoolMember, largest_prompt, readiness, servable
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.event_order import EventOrder
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.handoff import Handoffs
from kvrelay.cluster.controller.health import HealthMonitor
from kvrelay.cluster.controller.state import ControllerState, DispatchCounters, WorkerEntry
from kvrelay.cluster.controller.streams import EventStreams, Packed, pack
from kvrelay.cluster.controller.worker_client import WorkerClient, WorkerGone
from kvrelay.cluster.metrics.loop_lag import watch_loop_lag
from kvrelay.cluster.metrics.recorder import Metrics
from kvrelay.cluster.routing.adapter import Pull, RoutePlan, Routing
from kvrelay.cluster.routing.types import RouteRequest, WorkerLoad
from kvrelay.cluster.sizing.autosize import PoolAutosizer
from kvrelay.cluster.spot.executor import PreemptionExecutor
from kvrelay.cluster.spot.notices import PreemptionNotice
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.model.output import RequestText
from kvrelay.workers.types import FinishReason, Phase, Role, TokenEvent, merge_events
from kvrelay.workers.worker import WorkerInfo

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, config: ControllerConfig, tokenizer: TokenizerLike) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self.state = ControllerState()
        self.counts = DispatchCounters()
        self.metrics = Metrics(models=[config.model.id])
        self.routing = Routing(config.routing, config.model.id)
        self._ids = itertools.count()
        self._event_order = EventOrder()  # workers' event deliveries, put back in order
        self.handoffs = Handoffs(config, self.state, self.routing, self, self._ids)
        self.preemption = PreemptionExecutor(
            self.state, self.routing, self.metrics, self, self.handoffs
        )
        self.autosizer = (
            PoolAutosizer(self.state, self.routing, config.autosize) if config.autosize else None
        )
        self.health = HealthMonitor(
            config, self.state, self.routing, self.metrics, self.autosizer, self.worker_failed
        )
        self.admin = Admin(
            self.state, self.counts, self.routing, self.handoffs, self.preemption,
            self.autosizer, self._spawn,
        )
        # a token's time in this process: from_worker (the worker's sink call to its delivery
        # here), stream_wait (ready here until the frontend's event stream takes it) and the
        # loop's own lag (loop_lag: every event here waits as long)
        self.delivery = PhaseTimes()
        self.streams = EventStreams(self.run_request, self.delivery)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._health is None:
            self._health = asyncio.create_task(self.health.run())
            if self.autosizer is not None:
                self._spawn(self.autosizer.run())
            self._spawn(watch_loop_lag(self._loop_lag))

    def _loop_lag(self, late_s: float) -> None:
        self.delivery.add("loop_lag", late_s)
        self.metrics.observe_delivery("controller_loop_lag", (late_s,))

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> None:
        """A background task (a migration, the autosizer): kept until done, its failure logged
        (nobody awaits it, so it would otherwise vanish)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=exc)

    # ---- registry ------------------------------------------------------------------------
    async def register(self, client: WorkerClient) -> WorkerInfo:
        info: WorkerInfo = await client.call("info")
        self.state.workers[info.worker_id] = WorkerEntry(client, info, info.role)
        self.routing.block_bytes = info.block_bytes
        log.info("worker %s registered as %s on %s", info.worker_id, info.role, info.node_ip)
        return info

    async def worker_failed(self, worker_id: str, reason: str) -> None:
        entry = self.state.workers.get(worker_id)
        if entry is None or not entry.healthy:
            return
        log.warning("worker %s failed: %s", worker_id, reason)
        entry.healthy = False
        self.routing.forget(worker_id)  # no route to its blocks from now on
        entry.client.kill()
        self.metrics.forget_worker(worker_id)
        self.state.workers.pop(worker_id, None)
        self._event_order.forget(worker_id)
        for rid in list(entry.assigned):
            flight = self.state.flights.get(rid)
            # a flight some task is moving is that task's to recover; the others restart
            if flight is not None and not flight.done and not flight.moving:
                if flight.owner == worker_id:
                    await self.redispatch(flight)

    # ---- readiness and admission -----------------------------------------------------------
    def members(self) -> list[PoolMember]:
        return [
            PoolMember(w.info.worker_id, w.role, w.healthy, w.draining, w.info.num_blocks)
            for w in self.state.workers.values()
        ]

    def readiness(self) -> Readiness:
        """Whether every configured pool can take work, and the longest prompt the pools hold
        (a frontend's ``admit`` checks a prompt against it without a call while ready)."""
        members = self.members()
        return replace(
            readiness(members, dict(self.config.pool_sizes)),
            largest_prompt=largest_prompt(members, self.config.routing.block_size),
        )

    def _unavailable(self, why: str) -> ApiError:
        retry = max(1.0, self.config.admission_wait_s / 2)
        return ApiError(ErrorCode.UNAVAILABLE, f"{why}; retry after {retry:g} s",
                        retry_after_s=retry)

    async def _wait_for(self, cond: Any, budget_s: float) -> bool:
        """Poll ``cond()`` (a registry question, microseconds) until true or the budget ends."""
        deadline = time.monotonic() + budget_s
        pause = 0.02
        while not cond():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.25)
        return True

    async def admit(self, request: GenerateRequest) -> None:
        """Wait (bounded) until some worker can take requests, then check the prompt against
        the pools' capacity. Raises UNAVAILABLE or INVALID_ARGUMENT (see backend.py)."""
        if not await self._wait_for(lambda: servable(self.members()),
                                    self.config.admission_wait_s):
            raise self._unavailable(f"no worker can take requests ({self.readiness().reason()})")
        limit = largest_prompt(self.members(), self.config.routing.block_size)
        n = len(request.prompt_token_ids)
        if limit is not None and n > limit:
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"prompt of {n} tokens is longer than the largest KV pool can hold "
                f"({limit} tokens); shorten it or serve with a larger --kv-cache-gb",
                param="prompt",
            )

    # ---- requests ------------------------------------------------------------------------
    def models(self) -> Sequence[ModelInfo]:
        return [self.config.model]

    async def generate_batches(self, request: GenerateRequest) -> AsyncIterator[list[TokenEvent]]:
        """The request's events, each item every event ready when the stream wakes, merged
        into one (``merge_events``: a reader that fell behind gets one event of k tokens, not k
        events); ``Cluster.generate`` reads it as a Ray streaming generator. The last event has
        ``finish_reason`` set. Closing it early (``ray.cancel`` of the generator) aborts the
        request and frees its blocks everywhere."""
        flight = self._open(request)
        try:
            await self._dispatch(flight)
            while True:
                batch = [await flight.queue.get()]
                while not flight.queue.empty() and batch[-1].finish_reason is None:
                    batch.append(flight.queue.get_nowait())
                yield [merge_events(batch)]
                if batch[-1].finish_reason is not None:
                    return
        finally:
            await self._close(flight)

    async def run_request(
        self, request: GenerateRequest, emit: Callable[[list[TokenEvent]], None]
    ) -> None:
        """``generate_batches`` for the event streams (streams.py): the request's events go to
        ``emit`` from ``on_events`` itself once it is dispatched, not through a task woken per
        event (~13 us each here, more than the rest of a token's work in this process). Until
        then, and when dispatch fails, they wait in the flight's queue as they do for
        ``generate_batches``. Returns after the last event; cancelling it (``stop_request``)
        aborts the request and frees its blocks everywhere."""
        flight = self._open(request)
        try:
            await self._dispatch(flight)
            await flight.attach(emit)
        finally:
            flight.detach()  # an abort below is not the client's to see (it went away)
            await self._close(flight)

    def _open(self, request: GenerateRequest) -> Flight:
        if request.request_id in self.state.flights:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        flight = Flight(request, RequestText(self._tokenizer, request.sampling,
                                             request.prompt_token_ids))
        self.state.flights[request.request_id] = flight
        if self.autosizer is not None:
            self.autosizer.on_arrival(len(request.prompt_token_ids), request.sampling.max_tokens)
        return flight

    async def _close(self, flight: Flight) -> None:
        if not flight.done:  # the client went away: free its blocks everywhere
            flight.finish(FinishReason.ABORT)
            await self.abort_everywhere(flight)
        self.state.release(flight)

    # one stream per frontend process for the events of all its requests (streams.py)
    async def event_stream(self, stream_id: str) -> AsyncIterator[Packed]:
        async for items in self.streams.serve(stream_id):
            yield pack(items)

    async def start_request(self, stream_id: str, request: GenerateRequest) -> None:
        self.streams.start(stream_id, request)

    async def stop_request(self, request_id: str) -> bool:
        return self.streams.stop(request_id)

    async def cancel(self, request_id: str) -> bool:
        flight = self.state.flights.get(request_id)
        if flight is None or flight.done:
            return False
        flight.finish(FinishReason.ABORT)
        await self.abort_everywhere(flight)
        return True

    async def abort_everywhere(self, flight: Flight) -> None:
        for w in list(self.state.workers.values()):
            if flight.request_id in w.assigned and w.healthy:
                try:
                    await w.client.call("abort", flight.request_id, timeout=10)
                except (WorkerGone, TimeoutError):
                    pass

    async def _dispatch(self, flight: Flight) -> None:
        """Start (or resume, from prompt + committed tokens) a flight on the best workers;
        a worker found dead on the way is failed and the next best one is tried."""
        flight.moving += 1
        try:
            await self._dispatch_once(flight)
        finally:
            flight.moving -= 1
        await self.handoffs.settle(flight)

    async def _dispatch_once(self, flight: Flight) -> None:
        while not flight.done:
            tokens = list(flight.req.prompt_token_ids) + flight.committed
            request = RouteRequest(
                flight.request_id, self.routing.hashes(tokens), len(tokens),
                flight.req.tenant, flight.req.priority,
            )
            plan = self._route(request, len(tokens))
            if plan is None:  # nobody has room now: wait (bounded) for a worker that has
                if not await self._wait_for(
                    lambda r=request, n=len(tokens): self._route(r, n) is not None,
                    self.config.admission_wait_s,
                ):
                    flight.finish(FinishReason.ABORT)
                    raise self._unavailable("no healthy worker with room for the request")
                continue
            target = self.state.workers[plan.worker]
            split = plan.mode == "split"
            if plan.pull is not None:
                await self._pull(flight, plan.pull, target)
            # the phase is set before the call: the worker's first token may reach this loop
            # before its answer to submit does, and that event must start the handoff
            flight.phase = Phase.PREFILL if split else Phase.DECODE
            try:
                await self.submit(flight, target, prefill_only=split)
            except WorkerGone as exc:
                flight.phase = Phase.QUEUED
                target.assigned.discard(flight.request_id)
                await self.worker_failed(target.info.worker_id, f"submit: {exc}")
                continue
            except BaseException:
                flight.phase = Phase.QUEUED  # refused (a prompt too large for it): not running there
                raise
            if plan.mode == "local":
                self.counts.local_prefills += 1
            return

    def _route(self, request: RouteRequest, num_tokens: int) -> RoutePlan | None:
        loads = [self.load(w) for w in self.state.workers.values() if w.healthy and not w.draining]
        return self.routing.plan(request, loads, num_tokens)

    def load(self, w: WorkerEntry) -> WorkerLoad:
        hb = w.heartbeat
        total = w.info.num_blocks
        free = total
        running = waiting = 0
        if hb is not None:
            free = hb.stats.pool.free + hb.stats.pool.cached
            running, waiting = hb.stats.running, hb.stats.waiting
        # requests routed since the last heartbeat count as queued work
        waiting = max(waiting, len(w.assigned) - running)
        tenants: dict[str, int] = {}
        for rid in w.assigned:
            flight = self.state.flights.get(rid)
            if flight is not None:
                tenants[flight.req.tenant] = tenants.get(flight.req.tenant, 0) + 1
        step = hb.decode_step_s if hb is not None else None
        headroom = None if step is None else 1.0 - step / self.config.itl_slo_s
        return WorkerLoad(
            w.info.worker_id, Role(w.role), w.healthy, w.draining, free, total, running, waiting,
            slo_headroom=headroom, tenant_load=tenants,
        )

    async def _pull(self, flight: Flight, pull: Pull, p: WorkerEntry) -> bool:
        """Cross-worker reuse: move prefix blocks a peer holds into P's cache before P's
        prefill, instead of recomputing them. Best effort: on any failure P recomputes."""
        src = self.state.workers.get(pull.source)
        if src is None or not src.healthy:
            return False
        res_id = f"{flight.request_id}#pull{next(self._ids)}"
        timeout = self.config.pull_timeout_s
        pid, sid = p.info.worker_id, src.info.worker_id
        try:
            blocks = await p.client.call(
                "reserve", res_id, len(pull.block_hashes), time.time() + timeout, timeout=30
            )
            if blocks is None:
                return False
            tid = res_id.replace("#", "/")
            send, recv = self.handoffs.start_transfer(
                src, ("send_prefix", list(pull.block_hashes), pid, tid),
                p, ("recv_kv", res_id, sid, tid), timeout,
            )  # fmt: skip
            await asyncio.wait((send, recv), return_when=asyncio.FIRST_EXCEPTION)
            if not (send.done() and recv.done()) or send.exception() or recv.exception():
                send.cancel()
                recv.cancel()
                await p.client.call("unreserve", res_id, timeout=10)
                return False
            await p.client.call("commit_prefix", res_id, list(pull.block_hashes), timeout=30)
        except Exception as exc:
            log.info("pull for %s failed, recomputing: %r", flight.request_id, exc)
            return False
        self.counts.pulls += 1
        self.counts.pull_bytes += int(recv.result())
        return True

    async def submit(self, flight: Flight, target: WorkerEntry, *, prefill_only: bool) -> None:
        req = flight.req
        flight.owner = target.info.worker_id
        target.assigned.add(req.request_id)
        await target.client.call(
            "submit", req.request_id, list(req.prompt_token_ids), req.sampling,
            output_ids=list(flight.committed), tenant=req.tenant, priority=req.priority,
            prefill_only=prefill_only, arrival_s=req.arrival_s,
        )

    async def redispatch(self, flight: Flight) -> None:
        """The owner is gone: resume from prompt + committed tokens on survivors."""
        self.counts.resubmissions += 1
        self.metrics.record_resubmission(flight.req.model)
        flight.owner = None
        for w in self.state.workers.values():
            if flight.request_id in w.assigned and w.healthy:
                w.assigned.discard(flight.request_id)
                self._spawn(self._quiet_abort(w, flight.request_id))
        try:
            await self._dispatch(flight)
        except Exception as exc:  # never leave a client waiting on a stream that cannot move
            log.error("request %s lost: %r", flight.request_id, exc)
            flight.finish(FinishReason.ABORT)

    async def _quiet_abort(self, w: WorkerEntry, rid: str) -> None:
        try:
            await w.client.call("abort", rid, timeout=10)
        except Exception:
            pass

    # ---- events from workers -------------------------------------------------------------
    async def on_events(
        self, worker_id: str, events: list[TokenEvent], seq: int | None = None
    ) -> None:
        """One call per delivery of a worker's events: one step's tokens for all its requests,
        or consecutive steps' in step order (``workers/engine/outbox.py``). ``seq`` numbers the
        worker's deliveries; they are applied in that order (event_order.py), whatever order
        the actor runs the calls in. None, or a worker no longer registered (late calls of a
        failed one, nothing of it left to order): applied as it comes."""
        self.counts.event_deliveries += 1
        self.counts.event_tokens += sum(len(e.token_ids) for e in events)
        if seq is not None and worker_id in self.state.workers:
            events = self._event_order.accept(worker_id, seq, events)
        for event in events:
            flight = self.state.flights.get(event.request_id)
            if flight is None or flight.done:
                # the request ended here before the worker heard of it (a deadline or cancel
                # whose abort overtook the submit): the worker holds blocks for nobody
                entry = self.state.workers.get(worker_id)
                if entry is not None and event.finish_reason is None:
                    self._spawn(self._quiet_abort(entry, event.request_id))
                continue
            if flight.owner != worker_id:
                continue  # stale: the request moved
            out, stop_hit = flight.accept(event)
            flight.emit(out)
            if stop_hit:
                self._spawn(self.abort_everywhere(flight))
            elif flight.phase == Phase.PREFILL and out.finish_reason is None:
                flight.phase = Phase.HANDOFF
                flight.owner = None  # nothing streams until a decode worker takes over
                flight.moving += 1  # the handoff task owns the flight from here
                self._spawn(self.handoffs.run(flight, worker_id))

    # ---- the admin surface (admin.py), exposed on the actor ------------------------------
    async def delivery_times(self, reset: bool = False) -> dict[str, Any]:
        """Where a token's time between an engine and the frontends goes, per hop: each live
        worker's sender (``outbox_wait``, ``sink_call``: workers/engine/outbox.py) under
        ``workers``, and this process's ``from_worker`` (the sink's call to its delivery here;
        needs the worker's clock to agree with this host's), ``stream_wait`` (until the
        frontend's event stream takes it) and ``loop_lag`` (this loop waking late) under
        ``controller``; each phase's count, total and mean / p50 / p90 / p99 / max ms
        (phase_times.py). ``reset``: start afresh after."""
        workers = {}
        for wid, w in list(self.state.workers.items()):
            if w.healthy:
                try:
                    workers[wid] = await w.client.call("delivery_times", reset, timeout=30)
                except (WorkerGone, TimeoutError) as exc:  # the others' figures still count
                    log.warning("delivery times of %s: %r", wid, exc)
        return {"controller": self.delivery.summary(reset=reset), "workers": workers}

    async def cluster_status(self) -> ClusterStatus:
        return await self.admin.cluster_status()

    async def drain(self, worker_id: str) -> bool:
        return await self.admin.drain(worker_id)

    async def undrain(self, worker_id: str) -> bool:
        return await self.admin.undrain(worker_id)

    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool:
        return await self.admin.notify_preemption(worker_id, deadline_s)

    async def on_notice(self, notice: PreemptionNotice) -> list[str]:
        return await self.admin.on_notice(notice)

    async def migration_records(self) -> list[dict[str, Any]]:
        return await self.admin.migration_records()

    async def debug_flights(self) -> list[dict[str, Any]]:
        return await self.admin.debug_flights()

    async def worker_devices(self) -> dict[str, str]:
        return await self.admin.worker_devices()

    async def worker_ids(self) -> dict[str, str]:
        return await self.admin.worker_ids()

    async def integrity(self) -> dict[str, dict[str, int]]:
        return await self.admin.integrity()

    async def check_state(self) -> dict[str, int]:
        """The request table's figures (``admin.check_state``), and what the event path holds:
        requests with a pump, events waiting in the streams' outboxes, deliveries held back
        for an earlier one. All zero once every request has ended and its events were read."""
        figures = await self.admin.check_state()
        figures["pumps"], figures["outbox_items"] = self.streams.held()
        figures["early_deliveries"] = sum(map(self._event_order.waiting, self.state.workers))
        return figures

    async def worker_infos(self) -> dict[str, dict[str, Any]]:
        return await self.admin.worker_infos()

    async def transport_totals(self) -> dict[str, dict[str, float]]:
        return await self.admin.transport_totals()

    async def match_prefix(self, token_ids: list[int]) -> dict[str, int]:
        return await self.admin.match_prefix(token_ids)

    async def directory_workers(self) -> list[str]:
        return await self.admin.directory_workers()

    async def clear_prefix_cache(self, worker_id: str) -> None:
        return await self.admin.clear_prefix_cache(worker_id)

    async def role_switches(self) -> list[tuple[float, str, str, str]]:
        return await self.admin.role_switches()

    async def counters(self) -> dict[str, int]:
        return await self.admin.counters()
