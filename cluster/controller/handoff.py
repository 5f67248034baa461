"""The PD handoff transaction: ``Handoffs``, which the controller (controller.py) composes.

Once the prefill worker parks a request (its first token streamed), ``run`` picks decode
workers in the router's order and runs ``relay`` with each until one takes it::

    D.reserve(n blocks) ─▶ P.send_kv ‖ D.recv_kv ─▶ D.accept_prefilled ─▶ P.finish_handoff

A decode worker that refuses or dies costs one attempt (P still holds the KV); a prefill worker
that dies re-dispatches the request; nobody taking it means it decodes where it was prefilled.
The preemption executor reuses ``relay`` to move a running request's KV. What a handoff needs
from the controller besides the shared state is ``Recovery``: four steps, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.cluster.controller.worker_client import WorkerGone
from kvrelay.cluster.routing.adapter import Routing
from kvrelay.cluster.routing.types import RouteDecision, RouteRequest, WorkerLoad
from kvrelay.workers.types import FinishReason, Phase

log = logging.getLogger(__name__)


class Recovery(Protocol):
    """The controller's steps a handoff falls back on (controller.py)."""

    async def worker_failed(self, worker_id: str, reason: str) -> None: ...

    async def redispatch(self, flight: Flight) -> None: ...

    async def abort_everywhere(self, flight: Flight) -> None: ...

    def load(self, w: WorkerEntry) -> WorkerLoad: ...


class Handoffs:
    def __init__(
        self,
        config: ControllerConfig,
        state: ControllerState,
        routing: Routing,
        recovery: Recovery,
        ids: Iterator[int],  # transfer ids, shared with the controller's prefix pulls
    ) -> None:
        self.config = config
        self.state = state
        self.routing = routing
        self.recovery = recovery
        self._ids = ids
        self.done = 0  # handoffs completed
        self.refusals = 0  # reservations a decode worker refused
        self.fallbacks = 0  # handoffs nobody took: decoded where they were prefilled
        self.bytes = 0  # KV bytes received by decode workers

    async def run(self, flight: Flight, prefill_id: str) -> None:
        rid = flight.request_id
        try:
            p = self.state.workers.get(prefill_id)
            if p is None or not p.healthy:
                raise WorkerGone(prefill_id)
            n_blocks = await p.client.call("handoff_size", rid, timeout=30)
            deadline = time.time() + self.config.handoff_timeout_s
            tried: set[str] = set()
            while not flight.done:
                d = self._choose_decode(flight, tried, p)
                if d is None:
                    break
                tried.add(d.info.worker_id)
                if await self.relay(flight, p, d, n_blocks, deadline):
                    return
            if flight.done:
                await p.client.call("abort", rid, timeout=10)
                return
            # nobody took it: decode where it was prefilled
            self.fallbacks += 1
            flight.owner = prefill_id
            flight.phase = Phase.DECODE
            await p.client.call("continue_local", rid, timeout=30)
        except WorkerGone as exc:
            await self.recovery.worker_failed(prefill_id, f"during handoff: {exc}")
            if not flight.done:
                await self.recovery.redispatch(flight)
        except Exception as exc:
            log.exception("handoff of %s failed", rid)
            if not flight.done:
                flight.finish(FinishReason.ABORT)
                await self.recovery.abort_everywhere(flight)
                log.error("request %s aborted: %r", rid, exc)
        finally:
            flight.moving -= 1
            await self.settle(flight)

    def start_transfer(
        self,
        sender: WorkerEntry,
        send: tuple[Any, ...],
        receiver: WorkerEntry,
        recv: tuple[Any, ...],
        timeout: float,
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Both sides of one transfer, started together: ``send`` / ``recv`` are the method and
        its arguments, each side gets ``timeout`` (seconds, its own deadline) last. Each call is
        bounded by that deadline plus ``transfer_slack_s``: a side still silent then is wedged,
        and its future fails with TimeoutError."""
        bound = timeout + self.config.transfer_slack_s
        return (
            asyncio.ensure_future(sender.client.call(*send, timeout, timeout=bound)),
            asyncio.ensure_future(receiver.client.call(*recv, timeout, timeout=bound)),
        )

    async def settle(self, flight: Flight) -> None:
        """A move just ended: if the worker it left the flight on died meanwhile (its failure
        was handled while the move held the flight), restart the flight now."""
        if flight.moving or flight.done or flight.owner is None:
            return
        owner = self.state.workers.get(flight.owner)
        if owner is None or not owner.healthy:
            await self.recovery.redispatch(flight)

    def _choose_decode(
        self, flight: Flight, tried: set[str], p: WorkerEntry
    ) -> WorkerEntry | None:
        """The router's pick among decode workers not tried yet for this handoff whose pool can
        hold the request as far as ``p``'s could: a smaller one would end it early (LENGTH)."""
        tokens = list(flight.req.prompt_token_ids) + flight.committed
        request = RouteRequest(flight.request_id, self.routing.hashes(tokens), len(tokens))
        need = min(
            len(flight.req.prompt_token_ids) + flight.req.sampling.max_tokens, p.info.max_seq_tokens
        )
        loads = [
            self.recovery.load(w)
            for w in self.state.pool("decode")
            if w.info.worker_id not in tried and w.info.max_seq_tokens >= need
        ]
        matches = self.routing.directory.match(request.block_hashes)
        decision = self.routing.router.route_decode(request, loads, matches)
        if not isinstance(decision, RouteDecision):
            return None
        return self.state.workers.get(decision.worker_id)

    async def relay(
        self,
        flight: Flight,
        p: WorkerEntry,
        d: WorkerEntry,
        n_blocks: int,
        deadline: float,
        *,
        num_computed: int | None = None,
    ) -> bool:
        """One handoff attempt to ``d``; False when d refused or died (p still holds the KV).
        Raises WorkerGone when p died."""
        rid, did, pid = flight.request_id, d.info.worker_id, p.info.worker_id
        try:
            blocks = await d.client.call("reserve", rid, n_blocks, deadline, timeout=30)
        except (WorkerGone, TimeoutError) as exc:
            await self.recovery.worker_failed(did, f"reserve: {exc}")
            return False
        if blocks is None:
            self.refusals += 1
            return False
        d.assigned.add(rid)
        transfer_id = f"{rid}/{next(self._ids)}"
        timeout = max(1.0, deadline - time.time())
        send, recv = self.start_transfer(
            p, ("send_kv", rid, did, transfer_id), d, ("recv_kv", rid, pid, transfer_id), timeout
        )
        # a side that dies ends the attempt at once; the other side's call runs out on its own
        await asyncio.wait((send, recv), return_when=asyncio.FIRST_EXCEPTION)
        p_err = send.exception() if send.done() else None
        d_err = recv.exception() if recv.done() else None
        if isinstance(p_err, WorkerGone):
            recv.cancel()
            await self._unreserve(d, rid)
            raise p_err
        if isinstance(d_err, WorkerGone):
            send.cancel()
            d.assigned.discard(rid)
            await self.recovery.worker_failed(did, f"recv: {d_err}")
            return False
        if p_err is not None or d_err is not None:
            log.warning("handoff %s failed: send=%r recv=%r", rid, p_err, d_err)
            send.cancel()
            recv.cancel()
            await self._unreserve(d, rid)
            return False
        received = int(recv.result())
        if flight.done:
            await self._unreserve(d, rid)
            return True
        req = flight.req
        flight.owner = did
        flight.phase = Phase.DECODE
        try:
            await d.client.call(
                "accept_prefilled", rid, list(req.prompt_token_ids), list(flight.committed),
                req.sampling, tenant=req.tenant, priority=req.priority, num_computed=num_computed,
                arrival_s=req.arrival_s, timeout=30,
            )
        except WorkerGone as exc:  # d died holding the copy; p still holds the KV: not p's fault
            flight.owner, flight.phase = None, Phase.HANDOFF
            d.assigned.discard(rid)
            await self.recovery.worker_failed(did, f"accept: {exc}")
            return False
        p.assigned.discard(rid)
        self.done += 1
        self.bytes += received
        try:
            await p.client.call("finish_handoff", rid, timeout=30)
        except WorkerGone:
            pass  # the request already lives on d
        return True

    async def _unreserve(self, d: WorkerEntry, rid: str) -> None:
        d.assigned.discard(rid)
        try:
            await d.client.call("unreserve", rid, timeout=10)
        except (WorkerGone, TimeoutError):
            pass
