"""Baseline routers for benchmarks, with the KV-aware router's interface, pools and filters.

* ``RoundRobinRouter``: the next eligible worker of the pool, in worker-id order.
* ``LeastLoadedRouter``: fewest running + waiting requests, then most free blocks, then id.
"""

from __future__ import annotations

from kvrelay.cluster.routing.router import Matches, PoolRouter
from kvrelay.cluster.routing.types import RouteDecision, RouteRequest, WorkerLoad


class RoundRobinRouter(PoolRouter):
    def __init__(self, block_size: int = 16, chunk_tokens: int = 512) -> None:
        super().__init__(block_size, chunk_tokens)
        self._turn: dict[str, int] = {}  # pool -> decisions made

    def _choose(
        self, request: RouteRequest, cands: list[WorkerLoad], matches: Matches, pool: str
    ) -> RouteDecision:
        turn = self._turn.get(pool, 0)
        self._turn[pool] = turn + 1
        w = sorted(cands, key=lambda w: w.worker_id)[turn % len(cands)]
        return self._decision(w, 1.0, {}, matches, request)


class LeastLoadedRouter(PoolRouter):
    def _choose(
        self, request: RouteRequest, cands: list[WorkerLoad], matches: Matches, pool: str
    ) -> RouteDecision:
        w = min(cands, key=lambda w: (w.running + w.waiting, -w.free_blocks, w.worker_id))
        return self._decision(w, 1.0, {}, matches, request)
