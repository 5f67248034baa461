"""KV-aware router: pool -> filters -> weighted scorers -> picker (DESIGN.md, Cluster: Router).

    route_prefill(request, workers, matches) -> RouteDecision | NoWorker
    route_decode(request, workers, matches)  -> RouteDecision | NoWorker

``workers`` is every worker's ``WorkerLoad``; ``matches`` is ``KVDirectory.match`` for the
request's block hashes. The prefill pool is prefill + colocated workers, the decode pool
decode + colocated. A prefill worker needs room for one chunk; a decode worker for the whole
prompt (the handoff reserves every block before P sends). ``PoolRouter`` owns pools and
filters; subclasses (this KV-aware one, the baselines in baselines.py) only choose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import mul

from kvrelay.cluster.routing.config import RouterConfig
from kvrelay.cluster.routing.filters import FilterContext, run_filters
from kvrelay.cluster.routing.kv_directory import PrefixMatch
from kvrelay.cluster.routing.picker import MaxScorePicker
from kvrelay.cluster.routing.scorers import ScoreContext, build_scorers
from kvrelay.cluster.routing.types import (
    NO_MATCH,
    NoWorker,
    RouteDecision,
    RouteRequest,
    RouteResult,
    WorkerLoad,
)
from kvrelay.workers.types import Role

PREFILL_POOL = frozenset({Role.PREFILL, Role.COLOCATED})
DECODE_POOL = frozenset({Role.DECODE, Role.COLOCATED})
Matches = Mapping[str, PrefixMatch]


class PoolRouter:
    """Pool selection and filters; ``_choose`` picks among the survivors (non-empty)."""

    def __init__(self, block_size: int = 16, chunk_tokens: int = 512) -> None:
        if block_size <= 0 or chunk_tokens <= 0:
            raise ValueError("block_size and chunk_tokens must be positive")
        self.block_size = block_size
        self._chunk_blocks = -(-chunk_tokens // block_size)

    def route_prefill(
        self, request: RouteRequest, workers: Sequence[WorkerLoad], matches: Matches
    ) -> RouteResult:
        chunk = self._chunk_blocks
        return self._route(
            request, workers, matches, PREFILL_POOL, "prefill", lambda need: min(need, chunk)
        )

    def route_decode(
        self, request: RouteRequest, workers: Sequence[WorkerLoad], matches: Matches
    ) -> RouteResult:
        return self._route(request, workers, matches, DECODE_POOL, "decode", lambda need: need)

    def _route(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerLoad],
        matches: Matches,
        roles: frozenset[Role],
        pool: str,
        min_free: Callable[[int], int],
    ) -> RouteResult:
        ctx = FilterContext(request, matches, self.block_size, min_free)
        cands, reason = run_filters([w for w in workers if w.role in roles], ctx, pool)
        if not cands:
            return NoWorker(reason)
        return self._choose(request, cands, matches, pool)

    def _choose(
        self, request: RouteRequest, cands: list[WorkerLoad], matches: Matches, pool: str
    ) -> RouteDecision:
        raise NotImplementedError

    def _decision(
        self,
        w: WorkerLoad,
        score: float,
        parts: Mapping[str, float],
        matches: Matches,
        request: RouteRequest,
    ) -> RouteDecision:
        m = matches.get(w.worker_id, NO_MATCH)
        n = request.num_prompt_tokens
        return RouteDecision(
            worker_id=w.worker_id,
            score=score,
            scores_by_scorer=parts,
            matched_tokens=min(m.tokens, n),
            matched_gpu_tokens=min(m.gpu_blocks * self.block_size, n),
        )


class KVAwareRouter(PoolRouter):
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        super().__init__(self.config.block_size, self.config.chunk_tokens)
        self._scorers = build_scorers(self.config)
        self._names = tuple(s[0] for s in self._scorers)
        self._weights = tuple(s[1] for s in self._scorers)
        self._fns = tuple(s[2] for s in self._scorers)
        self._picker = MaxScorePicker(self.config.tie_break, self.config.seed)

    def _choose(
        self, request: RouteRequest, cands: list[WorkerLoad], matches: Matches, pool: str
    ) -> RouteDecision:
        waits = [w.waiting for w in cands]
        ctx = ScoreContext(request, matches, self.block_size, min(waits), max(waits))
        fns, weights = self._fns, self._weights
        # [candidates][scorers], each in [0, 1]
        parts = [[fn(w, ctx) for fn in fns] for w in cands]
        totals = [sum(map(mul, p, weights)) for p in parts]
        i = self._picker.pick([w.worker_id for w in cands], totals)
        named = dict(zip(self._names, parts[i], strict=True))
        return self._decision(cands[i], totals[i], named, matches, request)
