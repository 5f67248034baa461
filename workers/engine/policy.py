"""Scheduling policies: whom the engine's scheduler serves first and whom it preempts.

Protocol, called by the scheduler once per step (pure apart from the policy's own counters):

1. ``preempt_victims(running, waiting, now, free_blocks)`` -> running ids to preempt, in order,
   so the most deserving waiting request fits. ``[]`` when nobody should be preempted or when
   preempting every candidate would still not make room (a preemption must buy something).
2. ``order(requests, now)`` -> every id, in service order. The scheduler keeps/admits from the
   head while the token budget and KV blocks last; when blocks run out it preempts from the
   tail of this order.
3. ``on_served(tenant, prefill_tokens, decode_tokens)`` after the step: accounting.
4. ``behind_waiting(request, now)``: True for a running request at the tail of the order that
   gets its tokens only after the waiting requests are admitted (the scheduler's step 5).
5. ``static_order`` / ``static_once_started``: whether the scheduler may reuse an order of the
   same running requests (always / once every one of them has its first token).

``RequestView.num_blocks`` is what the request holds (running) or needs to resume (waiting).

Policies: FCFS (arrival order), Priority (priority, then arrival; lower priority = more
important), Deadline (arrival order, but a request without its first token whose
time-to-first-token target already passed goes behind those that can still make theirs, 4.
included) and Fair = the Virtual Token Counter (Sheng et al., OSDI'24): a counter per tenant
grows by ``w_p·prefill + w_d·decode`` served; the backlogged tenant with the smallest counter
goes first; a tenant that becomes backlogged (after ``idle_s`` without requests) is lifted to
the smallest counter among the active ones (so idling earns no credit); a running tenant more
than ``bound`` ahead of a waiting one is preempted, which keeps backlogged tenants within a
bounded service difference. ``now`` is in seconds, on the clock of ``arrival_time``
(``time.monotonic``: Fair's ``idle_s`` and Deadline's targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class RequestView:
    request_id: str
    tenant: str
    priority: int  # lower = more important
    arrival_time: float
    prompt_tokens: int
    computed_tokens: int  # prompt tokens already prefilled (0 after a recompute preemption)
    output_tokens: int  # generated so far
    num_blocks: int  # held (running) or needed to resume (waiting)
    is_running: bool


class SchedulingPolicy(Protocol):
    name: str
    # ``order`` depends only on fields a request never changes (arrival, priority, id): the
    # scheduler may reuse its last order while the set of requests is the same
    static_order: bool
    # ... so does its order of requests that all have their first token (a decode batch)
    static_once_started: bool

    def order(self, requests: Sequence[RequestView], now: float) -> list[str]: ...

    def on_served(self, tenant: str, prefill_tokens: int, decode_tokens: int) -> None: ...

    def preempt_victims(
        self,
        running: Sequence[RequestView],
        waiting: Sequence[RequestView],
        now: float,
        free_blocks: int = 0,
    ) -> list[str]: ...

    def behind_waiting(self, r: RequestView, now: float) -> bool:
        """True: the running ``r`` (at the tail of ``order``) gets its tokens after the
        waiting requests are admitted, not before."""
        ...


def _arrival_key(r: RequestView) -> tuple[float, str]:
    return (r.arrival_time, r.request_id)


def _enough(victims: Sequence[RequestView], need: int, free_blocks: int) -> list[str]:
    """The shortest prefix of ``victims`` that frees room for ``need`` blocks, or []."""
    if free_blocks >= need:
        return []
    out, freed = [], free_blocks
    for v in victims:
        out.append(v.request_id)
        freed += v.num_blocks
        if freed >= need:
            return out
    return []


class FCFSPolicy:
    """Arrival order. No preemption of its own: out of memory, the scheduler preempts the
    tail of the order, i.e. the latest arrival."""

    name = "fcfs"
    static_order = True
    static_once_started = True

    def order(self, requests: Sequence[RequestView], now: float) -> list[str]:
        return [r.request_id for r in sorted(requests, key=_arrival_key)]

    def on_served(self, tenant: str, prefill_tokens: int, decode_tokens: int) -> None:
        return None

    def behind_waiting(self, r: RequestView, now: float) -> bool:
        return False

    def preempt_victims(
        self,
        running: Sequence[RequestView],
        waiting: Sequence[RequestView],
        now: float,
        free_blocks: int = 0,
    ) -> list[str]:
        return []


class PriorityPolicy:
    """Priority, then arrival. A waiting request preempts strictly less important running
    ones (least important, latest first)."""

    name = "priority"
    static_order = True
    static_once_started = True

    @staticmethod
    def _key(r: RequestView) -> tuple[int, float, str]:
        return (r.priority, r.arrival_time, r.request_id)

    def order(self, requests: Sequence[RequestView], now: float) -> list[str]:
        return [r.request_id for r in sorted(requests, key=self._key)]

    def on_served(self, tenant: str, prefill_tokens: int, decode_tokens: int) -> None:
        return None

    def behind_waiting(self, r: RequestView, now: float) -> bool:
        return False

    def preempt_victims(
        self,
        running: Sequence[RequestView],
        waiting: Sequence[RequestView],
        now: float,
        free_blocks: int = 0,
    ) -> list[str]:
        if not waiting:
            return []
        head = min(waiting, key=self._key)
        worse = [r for r in running if r.priority > head.priority]
        worse.sort(key=lambda r: (-r.priority, -r.arrival_time, r.request_id))
        return _enough(worse, head.num_blocks, free_blocks)


class DeadlinePolicy(FCFSPolicy):
    """Arrival order, except that a request without its first token whose time-to-first-token
    target (``arrival + ttft_s``) has passed is served after every request that can still make
    its own: under a burst past the engine's prefill rate, FCFS lets every queued request
    finish its prefill a little late (a queue that grows past the target fails all of them),
    this one fails the requests that already missed and keeps serving the rest on time — the
    attainment an SLO counts (the goodput benchmark's measure). That holds for admitted
    prefills too: the scheduler hands the step's token budget to running sequences in this
    order, so a late prompt's remaining chunks wait behind on-time ones (and, out of blocks,
    it is the one preempted). A late request is not dropped: it keeps its arrival order among
    the late ones, and one waiting longer than ``starve_s`` (default ten targets) rejoins
    arrival order ahead of the on-time ones, so a sustained overload delays it by a bounded
    time, never forever. Requests with a first token (decodes, preempted or swapped ones) keep
    arrival order: their time-to-first-token is settled. No preemption of its own (FCFS's)."""

    name = "deadline"
    static_order = False  # a request turns late with time ...
    static_once_started = True  # ... until its first token: a decode batch keeps its order

    def __init__(self, ttft_s: float = 2.0, starve_s: float | None = None) -> None:
        starve = 10.0 * ttft_s if starve_s is None else starve_s
        if not (ttft_s > 0 and math.isfinite(ttft_s)) or not starve >= ttft_s:
            raise ValueError("ttft_s must be finite and > 0, starve_s >= ttft_s")
        self.ttft_s, self.starve_s = ttft_s, starve

    def late(self, r: RequestView, now: float) -> bool:
        """No first token, past its target, not yet starved."""
        return r.output_tokens == 0 and self.ttft_s < now - r.arrival_time <= self.starve_s

    def order(self, requests: Sequence[RequestView], now: float) -> list[str]:
        def key(r: RequestView) -> tuple[bool, float, str]:
            return (self.late(r, now), r.arrival_time, r.request_id)

        return [r.request_id for r in sorted(requests, key=key)]

    def behind_waiting(self, r: RequestView, now: float) -> bool:
        return self.late(r, now)  # an admitted late prompt lets on-time ones in first


class FairPolicy:
    """Virtual Token Counter. ``bound`` (U) is in weighted tokens."""

    name = "fair"
    static_order = False  # virtual token counters move every step
    static_once_started = False

    def __init__(
        self,
        w_prefill: float = 1.0,
        w_decode: float = 2.0,
        bound: float = 256.0,
        idle_s: float = 0.5,
    ):
        if w_prefill < 0 or w_decode < 0 or w_prefill + w_decode == 0 or bound < 0 or idle_s < 0:
            raise ValueError("weights must be >= 0 (not both 0), bound and idle_s >= 0")
        self.w_prefill, self.w_decode, self.bound = w_prefill, w_decode, bound
        self.idle_s = idle_s
        self.counters: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}  # tenant -> last `now` it had a live request

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def _lift(self, requests: Sequence[RequestView], now: float) -> None:
        """A tenant not seen for more than ``idle_s`` (or never) starts at the smallest counter
        among the tenants active within ``idle_s``, never below its own.

        Backlog is judged by recency rather than by one call's contents so that a scheduler
        may show the policy its running and its waiting requests in separate calls (or skip
        one in a step) without tenants flickering in and out of the backlog; the price is
        that a tenant idle for less than ``idle_s`` keeps its counter."""
        present = {r.tenant for r in requests}
        fresh = {t for t in present if now - self._last_seen.get(t, -math.inf) > self.idle_s}
        active = [
            c
            for t, c in self.counters.items()
            if t not in fresh and now - self._last_seen.get(t, -math.inf) <= self.idle_s
        ]
        floor = min(active, default=0.0)
        for t in fresh:
            self.counters[t] = max(self.counters.get(t, 0.0), floor)
        for t in present:
            self._last_seen[t] = now

    def order(self, requests: Sequence[RequestView], now: float) -> list[str]:
        self._lift(requests, now)
        # merge tenant queues by projected counter: a tenant's next request is charged its
        # remaining prefill plus one decode step before the tenant is compared again
        queues: dict[str, list[RequestView]] = {}
        for r in sorted(requests, key=lambda r: (not r.is_running, *_arrival_key(r))):
            queues.setdefault(r.tenant, []).append(r)
        projected = {t: self.counters[t] for t in queues}
        heads = dict.fromkeys(queues, 0)
        out: list[str] = []
        while len(out) < len(requests):
            t = min(
                (t for t in queues if heads[t] < len(queues[t])), key=lambda t: (projected[t], t)
            )
            r = queues[t][heads[t]]
            heads[t] += 1
            out.append(r.request_id)
            projected[t] += self.w_prefill * (r.prompt_tokens - r.computed_tokens) + self.w_decode
        return out

    def on_served(self, tenant: str, prefill_tokens: int, decode_tokens: int) -> None:
        if prefill_tokens < 0 or decode_tokens < 0:
            raise ValueError("served token counts must be >= 0")
        self.counters[tenant] = (
            self.counter(tenant) + self.w_prefill * prefill_tokens + self.w_decode * decode_tokens
        )

    def behind_waiting(self, r: RequestView, now: float) -> bool:
        return False

    def preempt_victims(
        self,
        running: Sequence[RequestView],
        waiting: Sequence[RequestView],
        now: float,
        free_blocks: int = 0,
    ) -> list[str]:
        if not waiting or not running:
            return []
        self._lift([*running, *waiting], now)
        starved = min({r.tenant for r in waiting}, key=lambda t: (self.counters[t], t))
        head = min((r for r in waiting if r.tenant == starved), key=_arrival_key)
        floor = self.counters[starved] + self.bound
        ahead = [r for r in running if self.counters[r.tenant] > floor]
        # most over-served tenant first, its latest arrival first
        ahead.sort(key=lambda r: (-self.counters[r.tenant], -r.arrival_time, r.request_id))
        return _enough(ahead, head.num_blocks, free_blocks)

    def check_integrity(self) -> None:
        for t, c in self.counters.items():
            if not math.isfinite(c) or c < 0:
                raise AssertionError(f"tenant {t!r}: counter {c}")
        if not set(self._last_seen) <= set(self.counters):
            raise AssertionError("a tenant seen has no counter")


T = TypeVar("T")


def order_fn(
    policy: SchedulingPolicy, view: Callable[[T], RequestView]
) -> Callable[[Sequence[T], float], list[T]]:
    """Adapt a policy to a scheduler that orders its own objects (the engine's sequences,
    as the Scheduler does with its sequences); ``view`` maps one to a RequestView."""

    def order(items: Sequence[T], now: float) -> list[T]:
        by_id: dict[str, T] = {}
        views: list[RequestView] = []
        for x in items:
            v = view(x)
            by_id[v.request_id] = x
            views.append(v)
        return [by_id[rid] for rid in policy.order(views, now)]

    return order


POLICIES: dict[str, Callable[[float], SchedulingPolicy]] = {
    "fcfs": lambda ttft_s: FCFSPolicy(),
    "priority": lambda ttft_s: PriorityPolicy(),
    "deadline": DeadlinePolicy,
    "fair": lambda ttft_s: FairPolicy(),
}


def make_policy(name: str, ttft_s: float = 2.0) -> SchedulingPolicy:
    """The policy called ``name``; ``ttft_s``: the deadline policy's time-to-first-token target."""
    try:
        return POLICIES[name](ttft_s)
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}"
        ) from None
