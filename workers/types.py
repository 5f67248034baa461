"""Types that cross the worker boundary: sampling parameters, per-step outputs, pool figures.

Frozen, slotted dataclasses (``TokenEvent``: a NamedTuple): what the engine emits is a value,
never a live object.
"""

from __future__ import annotations

import enum
import functools
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


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


class TokenEvent(NamedTuple):
    """One request's new output from one engine step (a worker sends a list per step).

    A NamedTuple, not a frozen dataclass: every token is one on each hop of the served path
    (the engine, the controller's unpickling and its text, the driver's unpickling), and a
    tuple is built in ~0.27 us where the slotted dataclass's ``__init__`` took ~0.62 (its
    ``object.__setattr__`` per field). Across processes it travels as plain rows
    (``events_to_bytes``)."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens committed this step, in order
    text: str = ""  # the text those tokens add (held back while a stop string may be forming)
    finish_reason: FinishReason | None = None
    # prompt tokens served from cache instead of computed (set on the first event)
    cached_prompt_tokens: int = 0


# a row (``tuple(event)``) back into an event, in C: no Python frame per event
_event_from_row = functools.partial(tuple.__new__, TokenEvent)


def events_to_bytes(events: Sequence[TokenEvent]) -> bytes:
    """Events as they cross a process boundary: plain tuples pickled by the C pickler. A
    NamedTuple (as the dataclass before it) pickles through a Python hook per event
    (``__getnewargs__``: ~0.75 us an event); its rows take ~0.2 us to convert and pickle, and
    ``events_from_bytes`` ~0.35 us to rebuild (the dataclass's ``__reduce__``: 0.57 / 0.72)."""
    return pickle.dumps(list(map(tuple, events)), protocol=5)


def events_from_bytes(blob: bytes) -> list[TokenEvent]:
    """``events_to_bytes``'s events, equal and in order (from our own processes only)."""
    return list(map(_event_from_row, pickle.loads(blob)))


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
