"""The controller's admin and operator surface: cluster status, drain and preemption notices,
and the read-only hooks tests, benchmarks and operators use (counters, integrity, directory).

A mixin of ``Controller`` (cluster/controller.py), split out by responsibility: everything here
reads the controller's state or hands work to its executors; the request path lives there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from kvrelay.cluster.backend import ClusterStatus, WorkerStatus
from kvrelay.cluster.notices import NoticeKind, PreemptionNotice
from kvrelay.workers.engine import EngineStats

if TYPE_CHECKING:
    from kvrelay.cluster.autosize import PoolAutosizer
    from kvrelay.cluster.controller import WorkerEntry
    from kvrelay.cluster.flights import Flight
    from kvrelay.cluster.preemption import PreemptionExecutor
    from kvrelay.cluster.routing import Routing

log = logging.getLogger(__name__)


class ControllerAdmin:
    # state owned by Controller
    workers: dict[str, WorkerEntry]
    flights: dict[str, Flight]
    routing: Routing
    preemption: PreemptionExecutor
    autosizer: PoolAutosizer | None
    handoffs_done: int
    local_prefills: int
    handoff_refusals: int
    handoff_bytes: int
    resubmissions: int
    pulls_done: int
    pull_bytes: int
    migrations_done: int
    recomputes_done: int

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    # ---- admin ---------------------------------------------------------------------------
    async def cluster_status(self) -> ClusterStatus:
        out = []
        for w in self.workers.values():
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
        return ClusterStatus(tuple(out), sum(not f.done for f in self.flights.values()))

    async def drain(self, worker_id: str) -> bool:
        entry = self.workers.get(worker_id)
        if entry is None:
            return False
        entry.draining = True
        self.routing.forget(worker_id)
        return True

    async def undrain(self, worker_id: str) -> bool:
        """Route to a drained worker again; False for unknown or failed workers."""
        entry = self.workers.get(worker_id)
        if entry is None or not entry.healthy:
            return False
        entry.draining = False
        return True

    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool:
        """A spot notice (admin RPC, Kubernetes watcher, metadata poller, a worker's SIGTERM):
        plan and carry out the moves in the background; returns False for unknown workers."""
        entry = self.workers.get(worker_id)
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
            hit = [notice.target] if notice.target in self.workers else []
        elif notice.kind is NoticeKind.NODE:
            hit = [w for w, e in self.workers.items() if e.info.node_name == notice.target]
        else:
            hit = [w for w, e in self.workers.items()
                   if e.info.pod_name == notice.target
                   or (notice.node and e.info.node_name == notice.node and not e.info.pod_name)]
        hit = [w for w in hit if self.workers[w].healthy and not self.workers[w].draining]
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
                "request_id": f.request_id, "phase": f.phase, "owner": f.owner,
                "committed": len(f.committed), "moving": f.moving,
                "assigned": sorted(w for w, e in self.workers.items() if f.request_id in e.assigned),
            }
            for f in self.flights.values()
        ]

    async def worker_devices(self) -> dict[str, str]:
        """worker -> where its engine computes ("cpu", "cuda:0") and in which dtype."""
        return {
            wid: f"{w.info.device}/{w.info.dtype}" for wid, w in self.workers.items() if w.healthy
        }

    async def worker_ids(self) -> dict[str, str]:
        return {wid: w.role for wid, w in self.workers.items() if w.healthy}

    async def integrity(self) -> dict[str, dict[str, int]]:
        out = {}
        for wid, w in list(self.workers.items()):
            if w.healthy:
                out[wid] = await w.client.call("check_integrity", timeout=30)
        return out

    async def worker_infos(self) -> dict[str, dict[str, Any]]:
        return {wid: dataclasses.asdict(w.info) for wid, w in self.workers.items() if w.healthy}

    async def transport_totals(self) -> dict[str, dict[str, float]]:
        out = {}
        for wid, w in list(self.workers.items()):
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
        await self.workers[worker_id].client.call("clear_prefix_cache", timeout=30)

    async def role_switches(self) -> list[tuple[float, str, str, str]]:
        return list(self.autosizer.switches) if self.autosizer is not None else []

    async def counters(self) -> dict[str, int]:
        return {
            "block_bytes": next((w.info.block_bytes for w in self.workers.values()), 0),
            "handoffs": self.handoffs_done,
            "local_prefills": self.local_prefills,
            "pulls": self.pulls_done,
            "pull_bytes": self.pull_bytes,
            "directory_blocks": self.routing.directory.num_blocks(),
            "directory_workers": len(self.routing.directory.workers()),
            "handoff_refusals": self.handoff_refusals,
            "handoff_bytes": self.handoff_bytes,
            "resubmissions": self.resubmissions,
            "migrations": self.migrations_done,
            "migration_recomputes": self.recomputes_done,
            "in_flight": len(self.flights),
        }



def kv_blocks(stats: EngineStats) -> dict[str, dict[str, int]]:
    """tier -> state -> blocks, as /metrics and ClusterStatus report them."""
    out = {"gpu": {"free": stats.pool.free, "used": stats.pool.used, "cached": stats.pool.cached}}
    if stats.cpu_pool is not None:
        c = stats.cpu_pool
        out["cpu"] = {"free": c.free, "used": c.used, "cached": c.cached}
    return out
