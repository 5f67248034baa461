"""Executes spot preemptions: a notice in, a migration plan carried out, a record out.

    notice(worker, deadline) ─▶ stop routing to it ─▶ snapshot ─▶ plan_migration (pure)
        ─▶ role switches ─▶ per request: finish in place | migrate KV | recompute

A migrated request is parked on its source (its KV held like a prefill's handoff), tokens the
source produced that the stream has not seen are delivered from the park result, then the KV
goes to the target through the same reserve → send ‖ recv → accept transaction as a handoff.
The client's stream never has a gap or a duplicate: the controller commits tokens by position
and ignores events from anyone but the flight's owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.cluster.metrics.recorder import Metrics
from kvrelay.cluster.spot.planner import plan_migration
from kvrelay.cluster.spot.planner_model import (
    ClusterSnapshot,
    FinishInPlace,
    MigrateKV,
    MigrationPlan,
    Recompute,
    RequestAction,
    RequestSnapshot,
    WorkerSnapshot,
)
from kvrelay.workers.types import Phase, Role, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class MigrationRecord:
    """What one notice led to (ClusterStatus / tests / the benchmark read these)."""

    leaving: dict[str, float]
    planned_at: float
    actions: dict[str, str] = field(default_factory=dict)  # request -> planned action
    outcomes: dict[str, str] = field(default_factory=dict)  # request -> what happened
    switches: list[tuple[str, str, str]] = field(default_factory=list)
    unplaceable: dict[str, str] = field(default_factory=dict)


class RoutingView(Protocol):
    """What the executor asks of routing (cluster/routing/adapter.py)."""

    def forget(self, worker_id: str) -> None: ...

    def prefill_tps(self, worker_id: str) -> float: ...

    def link_bps(self, *workers: str) -> float: ...


class Dispatcher(Protocol):
    """The controller's steps that start a request on a worker (cluster/controller/)."""

    async def submit(self, flight: Flight, target: WorkerEntry, *, prefill_only: bool) -> None: ...

    async def redispatch(self, flight: Flight) -> None: ...


class KVMover(Protocol):
    """The handoff transaction, reused to move a running request's KV (controller/handoff.py)."""

    async def relay(
        self,
        flight: Flight,
        p: WorkerEntry,
        d: WorkerEntry,
        n_blocks: int,
        deadline: float,
        *,
        num_computed: int | None = None,
    ) -> bool: ...

    async def settle(self, flight: Flight) -> None: ...


class PreemptionExecutor:
    def __init__(
        self,
        state: ControllerState,
        routing: RoutingView,
        metrics: Metrics,
        dispatcher: Dispatcher,
        kv: KVMover,
    ) -> None:
        self.state = state
        self.routing = routing
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.kv = kv
        self.records: list[MigrationRecord] = []
        self.migrations_done = 0
        self.recomputes_done = 0

    async def handle(self, leaving: dict[str, float]) -> MigrationRecord:
        for wid in leaving:
            entry = self.state.workers.get(wid)
            if entry is not None:
                entry.draining = True
                self.routing.forget(wid)
        plan = plan_migration(await self._snapshot(leaving))
        record = MigrationRecord(dict(leaving), time.time())
        self.records.append(record)
        for sw in plan.switches:
            entry = self.state.workers.get(sw.worker_id)
            if entry is not None:
                await entry.client.call("set_role", sw.to_role.value, timeout=30)
                entry.role = sw.to_role.value
                record.switches.append((sw.worker_id, sw.from_role.value, sw.to_role.value))
        for u in plan.unplaceable:
            record.unplaceable[u.request_id] = f"{u.reason.value}: {u.detail}"
        record.actions = {a.request_id: _describe(a) for a in plan.actions}
        await asyncio.gather(*(self._execute(a, leaving, record) for a in plan.actions))
        return record

    # ---- snapshot -------------------------------------------------------------------------
    async def _snapshot(self, leaving: dict[str, float]) -> ClusterSnapshot:
        workers: list[WorkerSnapshot] = []
        requests: list[RequestSnapshot] = []
        for wid, w in list(self.state.workers.items()):
            if not w.healthy:
                continue
            hb = w.heartbeat
            free = used = 0
            step_s, tps = 0.05, self.routing.prefill_tps(wid)
            if hb is not None:
                free, used = hb.stats.pool.free + hb.stats.pool.cached, hb.stats.pool.used
                step_s = hb.decode_step_s or step_s
            else:
                free = w.info.num_blocks
            if wid in leaving:
                free = 0  # a leaving worker takes nothing new
            workers.append(WorkerSnapshot(
                wid, Role(w.role), free, used, w.info.block_bytes, w.info.max_seq_tokens, step_s,
                tps,
            ))
            if wid not in leaving:
                continue
            for r in await w.client.call("requests_info", timeout=30):
                flight = self.state.flights.get(r.request_id)
                if flight is None or flight.done or flight.moving or flight.owner != wid:
                    continue
                requests.append(RequestSnapshot(
                    r.request_id, wid, Phase(r.phase), r.prompt_tokens, r.tokens_done,
                    r.tokens_left, r.kv_blocks, r.kv_blocks * w.info.block_bytes,
                ))
        return ClusterSnapshot(
            now=time.time(),
            workers=tuple(workers),
            requests=tuple(requests),
            leaving={w: d for w, d in leaving.items() if w in {x.worker_id for x in workers}},
            bandwidth_bps=self.routing.link_bps(*leaving),
        )

    # ---- actions --------------------------------------------------------------------------
    async def _execute(
        self, action: RequestAction, leaving: dict[str, float], record: MigrationRecord
    ) -> None:
        if isinstance(action, FinishInPlace):
            record.outcomes[action.request_id] = "finished_in_place"
            self.metrics.record_migration("finished_in_place")
            return
        flight = self.state.flights.get(action.request_id)
        src = self.state.workers.get(action.source)
        dst = self.state.workers.get(action.target)
        if flight is None or flight.done:  # it ended since the snapshot
            record.outcomes[action.request_id] = "finished_before_move"
            return
        # a worker it needed failed since: it stays where it is, restarted by the source's
        # failure (now, or when the source leaves)
        if src is None or dst is None:
            gone = action.source if src is None else action.target
            record.outcomes[action.request_id] = f"not_moved: {gone} gone"
            return
        if flight.moving or flight.owner != action.source:
            # since the snapshot the request moved on by itself (a prefill finished and its
            # handoff task now carries the KV off the leaving worker): that task owns it
            record.outcomes[action.request_id] = "moved_by_handoff"
            return
        flight.moving += 1
        t0 = time.time()
        try:
            outcome = await self._move(flight, action, src, dst, leaving[action.source])
        except Exception as exc:
            log.exception("migration of %s failed", action.request_id)
            outcome = f"failed: {exc!r}"
            if not flight.done:
                await self.dispatcher.redispatch(flight)
        finally:
            flight.moving -= 1
        if (late := time.time() - leaving[action.source]) > 0:  # the instance may be gone
            log.warning("moving %s off %s (%s) took %.1f s, %.1f s past the notice's deadline",
                        action.request_id, action.source, outcome, time.time() - t0, late)
        record.outcomes[action.request_id] = outcome
        self.metrics.record_migration(outcome if outcome in ("migrated", "recomputed") else "failed")
        await self.kv.settle(flight)

    async def _move(
        self,
        flight: Flight,
        action: MigrateKV | Recompute,
        src: WorkerEntry,
        dst: WorkerEntry,
        deadline: float,
    ) -> str:
        rid = flight.request_id
        flight.owner = None  # from here the park result, not late events, carries the tokens
        parked = await src.client.call("park", rid, timeout=30)
        if parked is not None:
            outputs, num_computed = parked
            self._deliver(flight, outputs)
            if flight.done:
                await src.client.call("finish_handoff", rid, timeout=30)
                return "finished_in_place"
            if isinstance(action, MigrateKV):
                n_blocks = await src.client.call("handoff_size", rid, timeout=30)
                if await self.kv.relay(flight, src, dst, n_blocks, deadline, num_computed=num_computed):
                    src.assigned.discard(rid)
                    self.migrations_done += 1
                    return "migrated"
            await src.client.call("finish_handoff", rid, timeout=30)
        else:
            await src.client.call("abort", rid, timeout=30)
        src.assigned.discard(rid)
        await self.dispatcher.submit(flight, dst, prefill_only=False)  # recompute prompt + committed tokens
        flight.phase = Phase.DECODE  # it decodes where it is recomputed: no handoff follows
        self.recomputes_done += 1
        return "recomputed"

    @staticmethod
    def _deliver(flight: Flight, outputs: list[int]) -> None:
        """Tokens the source produced that the stream has not seen yet (events in flight)."""
        missing = outputs[len(flight.committed):]
        if missing:
            out, _ = flight.accept(TokenEvent(flight.request_id, tuple(missing)))
            flight.emit(out)


def _describe(action: RequestAction) -> str:
    if isinstance(action, FinishInPlace):
        return "finish_in_place"
    if isinstance(action, MigrateKV):
        return f"migrate->{action.target}"
    return f"recompute->{action.target}"


__all__ = ["MigrationPlan", "MigrationRecord", "PreemptionExecutor"]
