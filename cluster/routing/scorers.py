"""Scorers: each maps a candidate to [0, 1] (higher is better); the router weights them.

* ``prefix``: prompt tokens already cached on the worker, GPU hits worth ``gpu_hit_value``
  per token, CPU hits ``cpu_hit_value`` (a promote copy), over the prompt length.
* ``kv_util``: free fraction of the worker's GPU KV blocks (``1 - used fraction``).
* ``queue``: queue depth, min-max normalised over the candidates (llm-d's queue scorer):
  the shortest queue scores 1, the longest 0, all equal score 1.
* ``tenant``: how little of the request's tenant the worker already serves,
  ``1 / (1 + its requests of that tenant)``: a flooding tenant spreads out instead of
  filling one worker's batch ahead of everyone else (fairness across workers).
* ``slo``: the worker's SLO headroom (``1 - measured step time / ITL SLO``, from the heartbeat),
  so latency-sensitive work goes where the inter-token latency target still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvrelay.cluster.routing.config import RouterConfig
from kvrelay.cluster.routing.kv_directory import PrefixMatch
from kvrelay.cluster.routing.types import NO_MATCH, RouteRequest, WorkerLoad


@dataclass(frozen=True, slots=True)
class ScoreContext:
    request: RouteRequest
    matches: Mapping[str, PrefixMatch]
    block_size: int
    min_waiting: int
    max_waiting: int


ScoreFn = Callable[[WorkerLoad, ScoreContext], float]


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def make_prefix_scorer(gpu_value: float, cpu_value: float) -> ScoreFn:
    def prefix(w: WorkerLoad, ctx: ScoreContext) -> float:
        m = ctx.matches.get(w.worker_id, NO_MATCH)
        n = ctx.request.num_prompt_tokens
        if m.blocks == 0 or n <= 0:
            return 0.0
        worth = (m.gpu_blocks * gpu_value + m.cpu_blocks * cpu_value) * ctx.block_size
        return _clamp(worth / n)

    return prefix


def kv_util(w: WorkerLoad, ctx: ScoreContext) -> float:
    if w.total_blocks <= 0:
        return 0.0
    return _clamp(w.free_blocks / w.total_blocks)


def queue(w: WorkerLoad, ctx: ScoreContext) -> float:
    span = ctx.max_waiting - ctx.min_waiting
    if span <= 0:
        return 1.0
    return _clamp(1.0 - (w.waiting - ctx.min_waiting) / span)


def tenant(w: WorkerLoad, ctx: ScoreContext) -> float:
    return 1.0 / (1.0 + w.tenant_load.get(ctx.request.tenant, 0))


def slo(w: WorkerLoad, ctx: ScoreContext) -> float:
    return 1.0 if w.slo_headroom is None else _clamp(w.slo_headroom)


def build_scorers(cfg: RouterConfig) -> tuple[tuple[str, float, ScoreFn], ...]:
    """(name, weight, fn) for every scorer with a positive weight."""
    all_scorers = (
        ("prefix", cfg.prefix_weight, make_prefix_scorer(cfg.gpu_hit_value, cfg.cpu_hit_value)),
        ("kv_util", cfg.kv_util_weight, kv_util),
        ("queue", cfg.queue_weight, queue),
        ("tenant", cfg.tenant_weight, tenant),
        ("slo", cfg.slo_weight, slo),
    )
    return tuple(s for s in all_scorers if s[1] > 0)
