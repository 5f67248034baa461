"""Types that cross the worker boundary: sampling parameters, per-step outputs, pool figures.

Frozen, slotted dataclasses: what the engine emits is a value, never a live object.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Role(str, enum.Enum):
    """What a worker does: prefill and hand off, decode handed-off requests, or both."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"

    @property
    def prefills(self) -> bool:
        return self is not Role.DECODE

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL


ROLES: tuple[str, ...] = tuple(r.value for r in Role)  # the names a role goes by on the wire


class Phase(str, enum.Enum):
    """Where a request is: queued -> prefill -> (handoff, between workers) -> decode -> done.
    A worker reports the first three for its requests; the controller's flights use all five."""

    QUEUED = "queued"  # no KV yet: waiting for prefill
    PREFILL = "prefill"  # prompt partly computed
    HANDOFF = "handoff"  # prefilled; its KV moving to a decode worker
    DECODE = "decode"  # prompt done, generating
    DONE = "done"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached (or the model's context / the KV pool is full)
    ABORT = "abort"  # cancelled by the client or the operator


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated at the edge (frontends); inside, trusted.

    ``temperature == 0`` is greedy. ``top_k == 0``, ``top_p == 1``, ``min_p == 0`` and
    ``repetition_penalty == 1`` are off. A request with ``seed`` draws its randomness from
    (seed, position) only, so it gives the same tokens in any batch and on any worker.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One request's new output from one engine step (a worker sends a list per step)."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens committed this step, in order
    text: str = ""  # the text those tokens add (held back while a stop string may be forming)
    finish_reason: FinishReason | None = None
    # prompt tokens served from cache instead of computed (set on the first event)
    cached_prompt_tokens: int = 0

    def __reduce__(self) -> tuple[type[TokenEvent], tuple[object, ...]]:
        # one constructor call per event: a frozen slotted dataclass otherwise pickles through
        # its generic __getstate__/__setstate__ (dataclasses.fields() per event), ~2.5 us of
        # each event's ~4 us both to pickle and to unpickle, and every token crosses Ray twice;
        # the fields written out (an attrgetter over fields() costs ~10 % more), so a new field
        # must be added here too (tests/unit/test_token_events.py checks)
        return (
            TokenEvent,
            (
                self.request_id,
                self.token_ids,
                self.text,
                self.finish_reason,
                self.cached_prompt_tokens,
            ),
        )


def merge_events(events: Sequence[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one: their tokens and text in order, the last's
    finish reason, the cached prompt tokens (only a request's first event reports them). What a stream that fell
    behind hands on in one piece (one message per wake-up instead of one per step)."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return TokenEvent(
        last.request_id,
        tuple(t for ev in events for t in ev.token_ids),
        "".join(ev.text for ev in events),
        last.finish_reason,
        max(ev.cached_prompt_tokens for ev in events),
    )


@dataclass(frozen=True, slots=True)
class PoolStats:
    total: int
    free: int  # never used or freed without a hash
    used: int  # referenced by at least one request
    cached: int  # unreferenced but holding a hashed block (evictable, LRU)
    extra: dict[str, int] = field(default_factory=dict)


class Tier(str, enum.Enum):
    GPU = "gpu"  # the device pool (host memory on CPU-only workers, same accounting)
    CPU = "cpu"  # the host tier behind it (pinned on CUDA)


class KVEventKind(str, enum.Enum):
    STORED = "stored"  # hashed blocks became available in `tier`
    REMOVED = "removed"  # hashed blocks left `tier` (evicted, dropped)


@dataclass(frozen=True, slots=True)
class KVEvent:
    """A pool's change to the set of hashed blocks it holds; batched to the KV directory with
    the heartbeat. A tier move is REMOVED from one tier plus STORED in the other."""

    kind: KVEventKind
    tier: Tier
    block_hashes: tuple[int, ...]
