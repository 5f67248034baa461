"""Filters: each keeps the workers that may take the request, or says why none can.

A filter is ``(name, keep)``; the router runs them in order and, when one empties the
candidate list, answers ``NoWorker`` naming it ("no decode worker has capacity").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvrelay.cluster.routing.kv_directory import PrefixMatch
from kvrelay.cluster.routing.types import NO_MATCH, RouteRequest, WorkerLoad


@dataclass(frozen=True, slots=True)
class FilterContext:
    request: RouteRequest
    matches: Mapping[str, PrefixMatch]
    block_size: int
    min_free_blocks: Callable[[int], int]  # blocks the request still needs -> blocks required


KeepFn = Callable[[WorkerLoad, FilterContext], bool]


def healthy(w: WorkerLoad, ctx: FilterContext) -> bool:
    return w.healthy


def not_draining(w: WorkerLoad, ctx: FilterContext) -> bool:
    return not w.draining


def blocks_needed(w: WorkerLoad, ctx: FilterContext) -> int:
    """GPU blocks the prompt still needs on ``w``: CPU-tier hits need a block to promote into."""
    bs = ctx.block_size
    total = -(-ctx.request.num_prompt_tokens // bs)
    return max(0, total - ctx.matches.get(w.worker_id, NO_MATCH).gpu_blocks)


def has_capacity(w: WorkerLoad, ctx: FilterContext) -> bool:
    return w.free_blocks >= ctx.min_free_blocks(blocks_needed(w, ctx))


FILTERS: tuple[tuple[str, KeepFn], ...] = (
    ("is healthy", healthy),
    ("is not draining", not_draining),
    ("has capacity", has_capacity),
)


def run_filters(
    workers: list[WorkerLoad], ctx: FilterContext, pool: str
) -> tuple[list[WorkerLoad], str]:
    """Survivors, and the reason when there are none."""
    if not workers:
        return [], f"no {pool} worker registered"
    for name, keep in FILTERS:
        workers = [w for w in workers if keep(w, ctx)]
        if not workers:
            return [], f"no {pool} worker {name}"
    return workers, ""
