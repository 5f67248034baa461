"""The controller's routing adapter: heartbeats and the KV directory in, a route plan out.

It keeps the KV directory (fed by the pools' events, batched with the heartbeat), measured
rates per worker (prefill tokens/s, transfer bytes/s), and the configured router (KV-aware,
round robin or least loaded). ``plan`` returns where a request goes:

    colocated  one worker prefills and decodes (no prefill/decode pools, or no split)
    split      prefill on P, then hand the KV off to a decode worker
    local      conditional disaggregation: the decode worker already holds most of the
               prompt, and prefilling the rest there is estimated cheaper than P + handoff
               (each side's measured prefill rate shared by the streams it would delay)
plus, for ``split``, an optional pull of prefix blocks another worker holds, when moving them
is estimated cheaper than recomputing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrelay.cluster.routing.baselines import LeastLoadedRouter, RoundRobinRouter
from kvrelay.cluster.routing.config import RouterConfig
from kvrelay.cluster.routing.cost import (
    PrefillPlace,
    PrefixSource,
    disaggregation,
    pull_or_recompute,
)
from kvrelay.cluster.routing.kv_directory import KVDirectory, PrefixMatch
from kvrelay.cluster.routing.router import KVAwareRouter, PoolRouter
from kvrelay.cluster.routing.types import NO_MATCH, RouteDecision, RouteRequest, WorkerLoad
from kvrelay.workers.kv.block_hash import block_hashes, namespace_hash
from kvrelay.workers.types import Role

ROUTERS = ("kv", "round_robin", "least_loaded")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    router: str = "kv"
    conditional_disagg: bool = True
    prefix_pull: bool = True
    block_size: int = 16
    chunk_tokens: int = 512
    # priors until a worker has been measured
    prefill_tokens_per_s: float = 2000.0
    transfer_bytes_per_s: float = 1e9
    handoff_overhead_s: float = 0.01
    min_pull_tokens: int = 64
    weights: Mapping[str, Any] = field(default_factory=dict)  # RouterConfig: the kv router's

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")


@dataclass(frozen=True, slots=True)
class Pull:
    source: str  # the worker holding the blocks
    block_hashes: tuple[int, ...]  # the blocks to pull, in chain order
    first_block: int  # index of the first pulled block in the prompt


@dataclass(frozen=True, slots=True)
class RoutePlan:
    mode: str  # "colocated" | "split" | "local"
    worker: str  # where the request is submitted first
    matched_tokens: int
    pull: Pull | None = None
    reason: str = ""


@dataclass(slots=True)
class _Rates:
    prefill_tps: float | None = None
    transfer_bps: float | None = None


def make_router(cfg: RoutingConfig) -> PoolRouter:
    if cfg.router == "round_robin":
        return RoundRobinRouter(cfg.block_size, cfg.chunk_tokens)
    if cfg.router == "least_loaded":
        return LeastLoadedRouter(cfg.block_size, cfg.chunk_tokens)
    return KVAwareRouter(
        RouterConfig(**cfg.weights, block_size=cfg.block_size, chunk_tokens=cfg.chunk_tokens)
    )


class Routing:
    def __init__(self, cfg: RoutingConfig, model_id: str, block_bytes: int = 0) -> None:
        self.cfg = cfg
        self.root = namespace_hash(model_id)
        self.directory = KVDirectory(cfg.block_size)
        self.router = make_router(cfg)
        self.block_bytes = block_bytes
        self.rates: dict[str, _Rates] = {}

    # ---- inputs ---------------------------------------------------------------------------
    def hashes(self, prompt_ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(block_hashes(prompt_ids, self.cfg.block_size, self.root))

    def observe(self, worker_id: str, *, prefill_tps: float | None, transfer_bps: float | None) -> None:
        r = self.rates.setdefault(worker_id, _Rates())
        if prefill_tps:
            r.prefill_tps = prefill_tps
        if transfer_bps:
            r.transfer_bps = transfer_bps

    def forget(self, worker_id: str) -> None:
        """A dead or drained worker leaves the directory at once (no route to its blocks)."""
        self.directory.remove_worker(worker_id)
        self.rates.pop(worker_id, None)

    def measured_tps(self, worker_id: str) -> float | None:
        """The worker's measured prefill rate (tokens/s), None before its first prefill."""
        r = self.rates.get(worker_id)
        return r.prefill_tps if r and r.prefill_tps else None

    def prefill_tps(self, worker_id: str) -> float:
        r = self.rates.get(worker_id)
        return (r.prefill_tps if r and r.prefill_tps else None) or self.cfg.prefill_tokens_per_s

    def link_bps(self, *workers: str) -> float:
        measured = [r.transfer_bps for w in workers if (r := self.rates.get(w)) and r.transfer_bps]
        return min(measured) if measured else self.cfg.transfer_bytes_per_s

    # ---- the decision ---------------------------------------------------------------------
    def plan(
        self, request: RouteRequest, loads: Sequence[WorkerLoad], prompt_len: int
    ) -> RoutePlan | None:
        matches = self.directory.match(request.block_hashes) if request.block_hashes else {}
        prefills = [w for w in loads if w.role is Role.PREFILL]
        decodes = [w for w in loads if w.role is Role.DECODE]
        if not prefills or not decodes:
            d = self.router.route_decode(request, loads, matches)
            if not isinstance(d, RouteDecision):
                d = self.router.route_prefill(request, loads, matches)
            if not isinstance(d, RouteDecision):
                return None
            return RoutePlan("colocated", d.worker_id, d.matched_tokens, reason="no P/D split")
        p = self.router.route_prefill(request, prefills, matches)
        d = self.router.route_decode(request, decodes, matches)
        if not isinstance(p, RouteDecision):
            if isinstance(d, RouteDecision):
                return RoutePlan("colocated", d.worker_id, d.matched_tokens, reason="no prefill")
            return None
        if isinstance(d, RouteDecision) and self.cfg.conditional_disagg and d.matched_tokens:
            # effective rates: a prefill chunk on D delays every stream D is decoding, and P's
            # queue delays ours; so the estimate compares the delay each choice imposes in all
            by_id = {w.worker_id: w for w in loads}
            d_share = 1 + by_id[d.worker_id].running
            p_share = 1 + by_id[p.worker_id].waiting + by_id[p.worker_id].running
            est = disaggregation(
                prompt_len,
                min(d.matched_tokens, prompt_len),
                self.prefill_tps(d.worker_id) / d_share,
                self.prefill_tps(p.worker_id) / p_share,
                self.link_bps(p.worker_id, d.worker_id),
                self._kv_bytes_per_token(),
                matched_on_prefill=min(p.matched_tokens, prompt_len),
                handoff_overhead_s=self.cfg.handoff_overhead_s,
            )
            if est.choice is PrefillPlace.LOCAL_ON_DECODE:
                return RoutePlan(
                    "local", d.worker_id, d.matched_tokens,
                    reason=f"local {est.local_s * 1e3:.1f} ms < handoff {est.handoff_s * 1e3:.1f} ms",
                )
        pull = self._pull_for(request, p, matches) if self.cfg.prefix_pull else None
        return RoutePlan("split", p.worker_id, p.matched_tokens, pull=pull)

    def _kv_bytes_per_token(self) -> float:
        return max(1.0, self.block_bytes / self.cfg.block_size)

    def _pull_for(
        self, request: RouteRequest, p: RouteDecision, matches: Mapping[str, PrefixMatch]
    ) -> Pull | None:
        """Blocks a peer holds (in its GPU tier) beyond P's own prefix, if pulling them beats
        recomputing them."""
        bs = self.cfg.block_size
        own = matches.get(p.worker_id, NO_MATCH).blocks
        # never pull the block holding the last prompt token: the prefill must compute one token
        usable = (request.num_prompt_tokens - 1) // bs
        best, best_blocks = None, own
        for wid, m in matches.items():
            held = min(m.gpu_blocks, usable)
            if wid != p.worker_id and held > best_blocks:
                best, best_blocks = wid, held
        if best is None or (best_blocks - own) * bs < self.cfg.min_pull_tokens:
            return None
        est = pull_or_recompute(
            (best_blocks - own) * bs,
            self.prefill_tps(p.worker_id),
            self.link_bps(best, p.worker_id),
            self._kv_bytes_per_token(),
            pull_overhead_s=self.cfg.handoff_overhead_s,
        )
        if est.choice is not PrefixSource.PULL:
            return None
        return Pull(best, request.block_hashes[own:best_blocks], own)
