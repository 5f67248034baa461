"""Can the cluster take requests, and could it ever hold this one? Pure: a snapshot of the
worker registry in, an answer out (the controller adapts it; tests call it directly).

* ``readiness``: the pools the operator configured each have at least one healthy worker that
  is not draining. That is what ``/ready`` and gRPC health ``SERVING`` mean.
* ``servable``: some healthy, non-draining worker exists, so a request can be routed at all
  (with a pool missing, the router runs it on one worker: slower, never wrong).
* ``largest_prompt``: the longest prompt the registered pools can hold. The engine needs
  ``prompt + 1`` tokens of blocks on the worker that prefills it and on the one that decodes
  it, so the bound is the smaller of the largest prefill-capable and decode-capable pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvrelay.cluster.api.backend import Readiness

PREFILL_CAPABLE = frozenset({"prefill", "colocated"})
DECODE_CAPABLE = frozenset({"decode", "colocated"})


@dataclass(frozen=True, slots=True)
class PoolMember:
    worker_id: str
    role: str
    healthy: bool
    draining: bool
    num_blocks: int


def _usable(m: PoolMember) -> bool:
    return m.healthy and not m.draining


def readiness(members: Iterable[PoolMember], pool_sizes: Mapping[str, int]) -> Readiness:
    """``pool_sizes``: role -> configured size; empty means "any one worker will do"."""
    usable = [m for m in members if _usable(m)]
    wanted = [role for role, n in pool_sizes.items() if n > 0]
    if not wanted:
        return Readiness(bool(usable), () if usable else ("any",))
    missing = tuple(r for r in wanted if not any(m.role == r for m in usable))
    return Readiness(not missing, missing)


def servable(members: Iterable[PoolMember]) -> bool:
    return any(_usable(m) for m in members)


def largest_prompt(members: Iterable[PoolMember], block_size: int) -> int | None:
    """Tokens of the longest prompt some prefill and some decode pool can hold; None while no
    usable worker is registered (nothing to measure against yet)."""
    usable = [m for m in members if _usable(m)]
    if not usable:
        return None
    prefill = [m.num_blocks for m in usable if m.role in PREFILL_CAPABLE]
    decode = [m.num_blocks for m in usable if m.role in DECODE_CAPABLE]
    # one worker alone runs a request end to end (the router's fallback): its pool is the bound
    blocks = min(max(prefill), max(decode)) if prefill and decode else max(
        m.num_blocks for m in usable
    )
    return blocks * block_size - 1
