"""The controller's admin and operator surface: cluster status, drain and preemption notices,
and the read-only hooks tests, benchmarks and operators use (counters, integrity, directory).

``Admin`` is composed by the controller (controller.py), which exposes its methods on the actor:
everything here reads the shared state and figures or hands work to the preemption executor;
the request path lives in controller.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kvrelay.cluster.api.backend import ClusterStatus, WorkerStatus
from kvrelay.cluster.controller.handoff import Handoffs
from kvrelay.cluster.controller.state import ControllerState, DispatchCounters
from kvrelay.cluster.routing.adapter import Routing
from kvrelay.cluster.sizing.autosize import PoolAutosizer
from kvrelay.cluster.spot.executor import PreemptionExecutor
from kvrelay.cluster.spot.notices import NoticeKind, PreemptionNotice
from kvrelay.workers.engine.config import EngineStats

log = logging.getLogger(__name__)


class Admin:
    def __init__(
        self,
        state: ControllerState,
        counts: DispatchCounters,
        routing: Routing,
        handoffs: Handoffs,
        preemption: PreemptionExecutor,
        autosizer: PoolAutosizer | None,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],  # the controller's background tasks
    ) -> None:
        self.state = state
        self.counts = counts
        self.routing = routing
        self.handoffs = handoffs
        self.preemption = preemption
        self.autosizer = autosizer
        self._spawn = spawn

    # ---- admin ---------------------------------------------------------------------------
    async def cluster_status(self) -> ClusterStatus:
        out = []
        for w in self.state.workers.values():
            hb = w.heartbeat
            kv: dict[str, dict[str, int]] = {}
            running = waiting = 0
            if hb is not None:
                kv = kv_blocks(hb.stats)
                running, waiting = hb.stats.running, hb.stats.waiting
            out.append(
                WorkerStatus(
                    w.info.worker_id, w.role, w.healthy, w.draining, w.info.node_ip, kv,
                    running, waiting,
                )
            )
        return ClusterStatus(tuple(out), sum(not f.done for f in self.state.flights.values()))

    async def drain(self, worker_id: str) -> bool:
        entry = self.state.workers.get(worker_id)
        if entry is None:
            return False
        entry.draining = True
        self.routing.forget(worker_id)
        return True

    async def undrain(self, worker_id: str) -> bool:
        """Route to a drained worker again; False for unknown or failed workers."""
        entry = self.state.workers.get(worker_id)
        if entry is None or not entry.healthy:
            return False
        entry.draining = False
        return True

    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool:
        """A spot notice (admin RPC, Kubernetes watcher, metadata poller, a worker's SIGTERM):
        plan and carry out the moves in the background; returns False for unknown workers."""
        entry = self.state.workers.get(worker_id)
        if entry is None or not entry.healthy:
            return False
        if entry.draining and any(worker_id in r.leaving for r in self.preemption.records):
            return True  # already being handled
        self._spawn(self.preemption.handle({worker_id: deadline_s}))
        return True

    async def on_notice(self, notice: PreemptionNotice) -> list[str]:
        """Map a notice (worker, node or pod) to the workers it takes away, and plan for all
        of them together."""
        if notice.kind is NoticeKind.WORKER:
            hit = [notice.target] if notice.target in self.state.workers else []
        elif notice.kind is NoticeKind.NODE:
            hit = [w for w, e in self.state.workers.items() if e.info.node_name == notice.target]
        else:
            hit = [w for w, e in self.state.workers.items()
                   if e.info.pod_name == notice.target
                   or (notice.node and e.info.node_name == notice.node and not e.info.pod_name)]
        hit = [w for w in hit if self.state.workers[w].healthy and not self.state.workers[w].draining]
        if hit:
            log.warning("preemption notice %s (%s): %s leaving by %.1f s", notice.target,
                        notice.source, hit, notice.deadline_s - time.time())
            self._spawn(self.preemption.handle(dict.fromkeys(hit, notice.deadline_s)))
        return hit

    async def migration_records(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.preemption.records]

    # ---- test and operator hooks ---------------------------------------------------------
    async def debug_flights(self) -> list[dict[str, Any]]:
        """Every request in flight: id, phase, owner, tokens committed, moves in progress, and
        which workers hold it (for operators chasing a stuck request)."""
        return [
            {
                "request_id": f.request_id, "phase": f.phase.value, "owner": f.owner,
                "committed": len(f.committed), "moving": f.moving,
                "assigned": sorted(w for w, e in self.state.workers.items() if f.request_id in e.assigned),
            }
            for f in self.state.flights.values()
        ]

    async def worker_devices(self) -> dict[str, str]:
        """worker -> where its engine computes ("cpu", "cuda:0") and in which dtype."""
        return {
            wid: f"{w.info.device}/{w.info.dtype}" for wid, w in self.state.workers.items() if w.healthy
        }

    async def worker_ids(self) -> dict[str, str]:
        return {wid: w.role for wid, w in self.state.workers.items() if w.healthy}

    async def integrity(self) -> dict[str, dict[str, int]]:
        out = {}
        for wid, w in list(self.state.workers.items()):
            if w.healthy:
                out[wid] = await w.client.call("check_integrity", timeout=30)
        return out

    async def check_state(self) -> dict[str, int]:
        """The registry and request table's invariants (ControllerState.check_integrity)."""
        return self.state.check_integrity()

    async def worker_infos(self) -> dict[str, dict[str, Any]]:
        return {wid: dataclasses.asdict(w.info) for wid, w in self.state.workers.items() if w.healthy}

    async def transport_totals(self) -> dict[str, dict[str, float]]:
        out = {}
        for wid, w in list(self.state.workers.items()):
            if w.healthy:
                out[wid] = await w.client.call("transport_totals", timeout=30)
        return out

    async def match_prefix(self, token_ids: list[int]) -> dict[str, int]:
        """Leading prompt tokens each worker holds, from the KV directory (ops and tests)."""
        matches = self.routing.directory.match(self.routing.hashes(token_ids))
        return {wid: m.tokens for wid, m in matches.items()}

    async def directory_workers(self) -> list[str]:
        return list(self.routing.directory.workers())

    async def clear_prefix_cache(self, worker_id: str) -> None:
        await self.state.workers[worker_id].client.call("clear_prefix_cache", timeout=30)

    async def role_switches(self) -> list[tuple[float, str, str, str]]:
        return list(self.autosizer.switches) if self.autosizer is not None else []

    async def counters(self) -> dict[str, int]:
        return {
            "block_bytes": next((w.info.block_bytes for w in self.state.workers.values()), 0),
            "handoffs": self.handoffs.done,
            "local_prefills": self.counts.local_prefills,
            "pulls": self.counts.pulls,
            "pull_bytes": self.counts.pull_bytes,
            "directory_blocks": self.routing.directory.num_blocks(),
            "directory_workers": len(self.routing.directory.workers()),
            "handoff_refusals": self.handoffs.refusals,
            "handoff_fallbacks": self.handoffs.fallbacks,
            "handoff_bytes": self.handoffs.bytes,
            "resubmissions": self.counts.resubmissions,
            "migrations": self.preemption.migrations_done,
            "migration_recomputes": self.preemption.recomputes_done,
            "in_flight": len(self.state.flights),
            "event_deliveries": self.counts.event_deliveries,
            "event_tokens": self.counts.event_tokens,
        }



def kv_blocks(stats: EngineStats) -> dict[str, dict[str, int]]:
    """tier -> state -> blocks, as /metrics and ClusterStatus report them."""
    out = {"gpu": {"free": stats.pool.free, "used": stats.pool.used, "cached": stats.pool.cached}}
    if stats.cpu_pool is not None:
        c = stats.cpu_pool
        out["cpu"] = {"free": c.free, "used": c.used, "cached": c.cached}
    return out
