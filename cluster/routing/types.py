"""What the router reads (a snapshot) and what it returns (a typed decision).

The controller builds a ``WorkerLoad`` per worker from the last heartbeat and passes the KV
directory's ``match`` for the request's block hashes; the router does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvrelay.cluster.routing.kv_directory import PrefixMatch
from kvrelay.workers.types import Role


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    block_hashes: tuple[int, ...]  # the prompt's full-block hashes (workers/kv/block_hash.py)
    num_prompt_tokens: int
    tenant: str = ""
    priority: int = 0


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker's figures from its last heartbeat.

    ``free_blocks`` counts GPU-tier blocks a new request can take now: free plus evictable
    cached (``PoolStats.free + PoolStats.cached``).
    """

    worker_id: str
    role: Role
    healthy: bool
    draining: bool
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int  # queue depth
    slo_headroom: float | None = None  # reserved for an SLO scorer
    tenant_load: Mapping[str, int] = field(default_factory=dict)  # reserved for fairness


@dataclass(frozen=True, slots=True)
class RouteDecision:
    worker_id: str
    score: float  # weighted sum of the scorers
    scores_by_scorer: Mapping[str, float]  # each in [0, 1], before weighting
    matched_tokens: int  # prompt tokens the worker already holds (any tier)
    matched_gpu_tokens: int = 0


@dataclass(frozen=True, slots=True)
class NoWorker:
    reason: str  # e.g. "no healthy decode worker", "no decode worker has capacity"


RouteResult = RouteDecision | NoWorker
NO_MATCH = PrefixMatch(blocks=0, gpu_blocks=0, cpu_blocks=0, tokens=0)
